"""proto: every message round-trips, and every malformed input is ProtocolError, never a crash."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vesta import proto
from vesta.errors import ProtocolError
from vesta.proto import Beacon, Error, GossipEntry, GpuInfo, Kind, NodeStatus, Ping, Pong
from vesta.spec import FileInfo

FP = "0123456789abcdef" * 2
FP2 = "fedcba9876543210" * 2
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_status(**changes: Any) -> NodeStatus:
    base: dict[str, Any] = {
        "name": "desk",
        "fingerprint": FP,
        "host": "",
        "port": 7777,
        "dport": 7778,
        "version": "0.1.0",
        "cores": 4,
        "cpu_pct": 12.5,
        "cpu_per_core": (10, 20, 5, 15),
        "load1": 0.75,
        "mem_total_mb": 16000,
        "mem_avail_mb": 9000,
        "offered_cores": 2.4,
        "offered_mem_mb": 1024,
        "spare_cores": 2.0,
        "power": "grid",
        "willingness": 1.0,
        "battery_pct": 88.0,
        "temp_c": 41.5,
        "gpus": (GpuInfo("RTX 3060", 12288, 512, 3.0),),
        "labels": ("gpu", "x86_64"),
        "uptime_s": 123.0,
    }
    base.update(changes)
    return NodeStatus(**base)


def make_beacon(**changes: Any) -> Beacon:
    base: dict[str, Any] = {
        "status": make_status(),
        "ts": 1_700_000_000.25,
        "boot": 1_700_000_000_000_000_000,
        "seq": 42,
        "interval_ms": 1000,
        "pubkey": bytes(range(32)),
        "gossip": (GossipEntry(FP2, "192.168.1.20", 7778),),
    }
    base.update(changes)
    return Beacon(**base)


def pack(kind: int, body: object, version: object = proto.PROTO_VERSION) -> bytes:
    data: bytes = msgpack.packb([version, kind, body], use_bin_type=True)
    return data


def beacon_body() -> dict[str, Any]:
    return copy.deepcopy(make_beacon().to_wire())


def decode_error(data: bytes) -> ProtocolError:
    """Decode ``data`` expecting ProtocolError; any other exception propagates and fails the test."""
    with pytest.raises(ProtocolError) as info:
        proto.decode(data)
    return info.value


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "msg",
    [
        make_beacon(),
        make_beacon(status=make_status(battery_pct=None, temp_c=None, gpus=(), labels=()), gossip=()),
        make_beacon(status=make_status(host="10.0.0.5", power="battery", willingness=0.35)),
        Ping(rid=7, ts=1_700_000_000.5),
        Pong(rid=7, ts=1_700_000_000.5, name="laptop"),
        Error(rid=7, reason="capacity", message="no spare cores"),
        Error(rid=0, reason="policy"),
    ],
    ids=["beacon", "beacon-minimal", "beacon-battery", "ping", "pong", "error", "error-no-message"],
)
def test_round_trip_gives_an_equal_message(msg: proto.Message) -> None:
    data = proto.encode(msg)
    assert isinstance(data, bytes)
    decoded = proto.decode(data)
    assert type(decoded) is type(msg)
    assert decoded == msg


def test_envelope_is_version_kind_body() -> None:
    version, kind, body = msgpack.unpackb(proto.encode(Ping(rid=1, ts=2.0)))
    assert (version, kind, body) == (proto.PROTO_VERSION, int(Kind.PING), {"rid": 1, "ts": 2.0})


def test_kinds_are_stable_wire_numbers() -> None:
    # Append only: changing these numbers breaks every deployed node.
    assert [(k.name, k.value) for k in Kind] == [
        ("BEACON", 1), ("PING", 2), ("PONG", 3), ("ERROR", 4), ("OFFER", 5), ("ACCEPT", 6), ("REFUSE", 7),
        ("PROGRESS", 8), ("OUTPUT", 9), ("RESULT", 10), ("CANCEL", 11), ("RECORDS_REQUEST", 12), ("RECORDS", 13),
        ("FILE_CHUNK", 14)]


def test_decoded_beacon_uses_tuples_and_part_types() -> None:
    b = proto.decode(proto.encode(make_beacon()))
    assert isinstance(b, Beacon)
    assert isinstance(b.status.cpu_per_core, tuple)
    assert isinstance(b.status.labels, tuple)
    assert b.status.gpus == (GpuInfo("RTX 3060", 12288, 512, 3.0),)
    assert b.gossip == (GossipEntry(FP2, "192.168.1.20", 7778),)


# ---------------------------------------------------------------- garbage and envelope


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",                                  # the one byte msgpack never uses
        b"\xff" * 7,
        b"\x93\x01",                              # array of 3, truncated
        b"\xdd\xff\xff\xff\xff",                  # array claiming 4 billion items
        b"\xdb\xff\xff\xff\xff",                  # str claiming 4 GiB
        b"\x91" * 5000,                           # nesting deeper than the unpacker allows
        b"not msgpack at all, just text",
        b"\x93\x01\x02\x81\xa1x\xc4\x01",         # bin value truncated
        b"\x93\x01\x02\x81\xa1x\xa2\xff\xfe",     # invalid UTF-8 in a str
    ],
    ids=["empty", "c1", "ff", "truncated", "huge-array", "huge-str", "deep", "text", "bin-trunc", "bad-utf8"],
)
def test_garbage_bytes_are_protocol_errors(data: bytes) -> None:
    decode_error(data)


def test_trailing_bytes_after_a_valid_message_are_rejected() -> None:
    decode_error(proto.encode(Ping(rid=1, ts=1.0)) + b"\x00")


@pytest.mark.parametrize(
    "envelope",
    [
        {"version": 1},
        5,
        "beacon",
        [1, 2],
        [1, 2, {"rid": 1, "ts": 1.0}, "extra"],
        [],
        [1, 2, [1, 1.0]],              # body a list, not a map
        [1, 2, None],
        [1, 2, "rid=1"],
    ],
    ids=["map", "int", "str", "two", "four", "empty", "body-list", "body-nil", "body-str"],
)
def test_wrong_envelope_shape(envelope: object) -> None:
    decode_error(msgpack.packb(envelope, use_bin_type=True))


def test_non_string_map_keys_are_rejected() -> None:
    decode_error(msgpack.packb([1, 2, {1: 1, "rid": 1, "ts": 1.0}], use_bin_type=True))


@pytest.mark.parametrize("version", [0, 2, 255, -1, "1", None, [1]])
def test_wrong_version(version: object) -> None:
    err = decode_error(pack(int(Kind.PING), {"rid": 1, "ts": 1.0}, version=version))
    assert "version" in str(err)


@pytest.mark.parametrize("kind", [0, 5, 99, -1, "ping", None, [2], 2.5])
def test_unknown_kind(kind: object) -> None:
    decode_error(pack(kind, {"rid": 1, "ts": 1.0}))  # type: ignore[arg-type]


# ---------------------------------------------------------------- missing and extra fields


@pytest.mark.parametrize(
    ("kind", "body", "missing"),
    [
        (Kind.PING, {"ts": 1.0}, "rid"),
        (Kind.PING, {"rid": 1}, "ts"),
        (Kind.PONG, {"rid": 1, "ts": 1.0}, "name"),
        (Kind.ERROR, {"rid": 1}, "reason"),
        (Kind.PING, {}, "rid"),
    ],
)
def test_missing_required_field(kind: Kind, body: dict[str, Any], missing: str) -> None:
    err = decode_error(pack(int(kind), body))
    assert missing in str(err)


@pytest.mark.parametrize("field", ["status", "ts", "boot", "seq", "interval_ms", "pubkey"])
def test_beacon_missing_required_field(field: str) -> None:
    body = beacon_body()
    del body[field]
    decode_error(pack(int(Kind.BEACON), body))


@pytest.mark.parametrize(
    "field",
    ["name", "fingerprint", "host", "port", "dport", "version", "cores", "cpu_pct", "load1",
     "mem_total_mb", "mem_avail_mb", "offered_cores", "offered_mem_mb", "spare_cores", "power", "willingness"],
)
def test_status_missing_required_field(field: str) -> None:
    body = beacon_body()
    del body["status"][field]
    err = decode_error(pack(int(Kind.BEACON), body))
    assert field in str(err)


def test_optional_fields_may_be_missing() -> None:
    body = beacon_body()
    del body["gossip"]
    for name in ("battery_pct", "temp_c", "gpus", "labels", "uptime_s", "cpu_per_core"):
        del body["status"][name]
    b = proto.decode(pack(int(Kind.BEACON), body))
    assert isinstance(b, Beacon)
    assert b.gossip == ()
    assert b.status.battery_pct is None and b.status.temp_c is None
    assert b.status.gpus == () and b.status.labels == () and b.status.cpu_per_core == ()
    assert b.status.uptime_s == 0.0
    e = proto.decode(pack(int(Kind.ERROR), {"rid": 3, "reason": "ledger"}))
    assert e == Error(rid=3, reason="ledger", message="")


def test_unknown_extra_fields_are_ignored() -> None:
    body = beacon_body()
    body["from_the_future"] = [1, 2, 3]
    body["status"]["new_metric"] = {"x": 1}
    assert proto.decode(pack(int(Kind.BEACON), body)) == make_beacon()
    ping = proto.decode(pack(int(Kind.PING), {"rid": 5, "ts": 1.0, "hops": 3}))
    assert ping == Ping(rid=5, ts=1.0)


# ---------------------------------------------------------------- field types and ranges


def _set(body: dict[str, Any], path: str, value: object) -> None:
    *parents, last = path.split(".")
    target: Any = body
    for p in parents:
        target = target[p]
    target[last] = value


GOSSIP = [FP2, "10.0.0.2", 7778]
GPU = ["gpu", 1024, 0, 0.0]

BAD_BEACON_FIELDS: list[tuple[str, object]] = [
    # ranges
    ("status.port", -1),
    ("status.port", 0),
    ("status.port", 65536),
    ("status.dport", 70000),
    ("status.cores", 0),
    ("status.cores", proto.MAX_CORES + 1),
    ("status.cpu_pct", 150),
    ("status.cpu_pct", -0.5),
    ("status.cpu_pct", math.nan),
    ("status.cpu_pct", math.inf),
    ("status.load1", -math.inf),
    ("status.willingness", 1.5),
    ("status.offered_cores", math.nan),
    ("status.battery_pct", 101.0),
    ("status.temp_c", math.inf),
    ("status.mem_total_mb", -1),
    ("status.cpu_per_core", [10, 101]),
    ("status.cpu_per_core", [10, -1]),
    ("status.uptime_s", -1.0),
    ("ts", math.nan),
    ("ts", -1.0),
    ("seq", -1),
    ("boot", -5),
    ("interval_ms", 5),
    ("interval_ms", 3_600_001),
    # bool where int (or number) expected
    ("status.port", True),
    ("status.cores", True),
    ("status.cpu_pct", False),
    ("status.cpu_per_core", [True, 3]),
    ("seq", True),
    ("interval_ms", True),
    # wrong types
    ("status", "not a map"),
    ("status", [1, 2, 3]),
    ("status.name", 5),
    ("status.name", b"desk"),
    ("status.port", "7777"),
    ("status.port", 7777.0),
    ("status.cpu_pct", "12"),
    ("status.host", None),
    ("status.power", 1),
    ("status.power", "nuclear"),
    ("status.cpu_per_core", "10,20"),
    ("status.cpu_per_core", {"a": 1}),
    ("status.labels", "gpu"),
    ("status.labels", [1, 2]),
    ("status.gpus", "gpu"),
    ("status.gpus", [5]),
    ("status.gpus", [["gpu"]]),
    ("status.gpus", [["gpu", "1024", 0, 0.0]]),
    ("status.gpus", [["gpu", 1024, 0, 0.0, "extra"]]),
    ("status.gpus", [["gpu", 1024, 0, 101.0]]),
    ("status.battery_pct", "full"),
    ("ts", "yesterday"),
    ("seq", 1.5),
    ("pubkey", "k" * 32),
    ("pubkey", list(range(32))),
    ("gossip", "peer"),
    ("gossip", [5]),
    ("gossip", [[FP2, "10.0.0.2"]]),
    ("gossip", [[FP2, "", 7778]]),
    ("gossip", [[FP2, "10.0.0.2", 0]]),
    ("gossip", [["nope", "10.0.0.2", 7778]]),
    # names, fingerprints, lengths
    ("status.name", ""),
    ("status.name", "x" * (proto.MAX_NAME + 1)),
    ("status.name", "my laptop"),
    ("status.name", "../../etc"),
    ("status.name", "-lead"),
    ("status.name", "a/b"),
    ("status.name", "caf\u00e9"),
    ("status.name", "a\x00b"),
    ("status.fingerprint", "abc"),
    ("status.fingerprint", "0123456789ABCDEF" * 2),
    ("status.fingerprint", "g" * 32),
    ("status.fingerprint", FP + "00"),
    ("status.fingerprint", ""),
    ("status.host", "h" * (proto.MAX_HOST + 1)),
    ("status.version", "v" * (proto.MAX_VERSION + 1)),
    ("status.labels", ["l"] * (proto.MAX_LABELS + 1)),
    ("status.labels", ["l" * (proto.MAX_LABEL + 1)]),
    ("status.gpus", [GPU] * (proto.MAX_GPUS + 1)),
    ("status.cpu_per_core", [1] * (proto.MAX_CORES + 1)),
    ("gossip", [GOSSIP] * (proto.MAX_GOSSIP + 1)),
    ("pubkey", b"\x00" * 31),
    ("pubkey", b"\x00" * 33),
    ("pubkey", b""),
]


@pytest.mark.parametrize(("path", "value"), BAD_BEACON_FIELDS, ids=[f"{p}={v!r}"[:60] for p, v in BAD_BEACON_FIELDS])
def test_bad_beacon_field_is_protocol_error(path: str, value: object) -> None:
    body = beacon_body()
    _set(body, path, value)
    decode_error(pack(int(Kind.BEACON), body))


def test_limits_are_inclusive() -> None:
    """Exactly at each limit is still valid, so the rejections above are the limits and not something else."""
    body = beacon_body()
    _set(body, "status.name", "n" * proto.MAX_NAME)
    _set(body, "status.labels", ["l" * proto.MAX_LABEL] * proto.MAX_LABELS)
    _set(body, "status.gpus", [GPU] * proto.MAX_GPUS)
    _set(body, "gossip", [GOSSIP] * proto.MAX_GOSSIP)
    _set(body, "status.cpu_pct", 100)
    _set(body, "status.port", 65535)
    _set(body, "interval_ms", 10)
    b = proto.decode(pack(int(Kind.BEACON), body))
    assert isinstance(b, Beacon)
    assert len(b.gossip) == proto.MAX_GOSSIP and len(b.status.gpus) == proto.MAX_GPUS
    assert b.status.name == "n" * proto.MAX_NAME


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        (Kind.PING, {"rid": -1, "ts": 1.0}),
        (Kind.PING, {"rid": (1 << 63) + 1, "ts": 1.0}),
        (Kind.PING, {"rid": True, "ts": 1.0}),
        (Kind.PING, {"rid": 1.0, "ts": 1.0}),
        (Kind.PING, {"rid": "1", "ts": 1.0}),
        (Kind.PING, {"rid": 1, "ts": math.nan}),
        (Kind.PING, {"rid": 1, "ts": math.inf}),
        (Kind.PING, {"rid": 1, "ts": None}),
        (Kind.PONG, {"rid": 1, "ts": 1.0, "name": "bad name"}),
        (Kind.PONG, {"rid": 1, "ts": 1.0, "name": ""}),
        (Kind.PONG, {"rid": 1, "ts": 1.0, "name": 7}),
        (Kind.ERROR, {"rid": 1, "reason": ""}),
        (Kind.ERROR, {"rid": 1, "reason": "r" * 33}),
        (Kind.ERROR, {"rid": 1, "reason": None}),
        (Kind.ERROR, {"rid": 1, "reason": "policy", "message": "m" * (proto.MAX_REASON + 1)}),
        (Kind.ERROR, {"rid": 1, "reason": "policy", "message": 5}),
    ],
)
def test_bad_small_message_fields(kind: Kind, body: dict[str, Any]) -> None:
    decode_error(pack(int(kind), body))


# ---------------------------------------------------------------- fuzz


def _check_outcome(data: bytes) -> None:
    """decode either refuses with ProtocolError or returns a valid message that round-trips."""
    try:
        msg = proto.decode(data)
    except ProtocolError:
        return
    assert isinstance(msg, tuple(proto._BY_KIND.values()))   # any kind whose required fields happen to be there
    msg.validate()
    assert proto.decode(proto.encode(msg)) == msg


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _check_outcome(data)


_VALID_BEACON = proto.encode(make_beacon())

_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(_VALID_BEACON) - 1), st.integers(0, 7)),
    st.tuples(st.just("insert"), st.integers(0, len(_VALID_BEACON)), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, len(_VALID_BEACON) - 1), st.just(0)),
    st.tuples(st.just("set"), st.integers(0, len(_VALID_BEACON) - 1), st.integers(0, 255)),
)


@FUZZ
@given(st.lists(_mutation, min_size=1, max_size=6))
def test_fuzz_mutated_beacon(mutations: list[tuple[str, int, int]]) -> None:
    data = bytearray(_VALID_BEACON)
    for op, pos, val in mutations:
        pos = min(pos, len(data) - 1) if op != "insert" else min(pos, len(data))
        if pos < 0:
            break
        if op == "flip":
            data[pos] ^= 1 << val
        elif op == "insert":
            data.insert(pos, val)
        elif op == "delete":
            del data[pos]
        else:
            data[pos] = val
    _check_outcome(bytes(data))


_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
_value = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=5), max_leaves=10)
_FIELD_NAMES = sorted(
    {f for cls in (Beacon, NodeStatus, Ping, Pong, Error, GpuInfo, GossipEntry) for f in cls.__dataclass_fields__}
)


@settings(FUZZ, max_examples=200)
@given(
    st.sampled_from([int(k) for k in Kind]),
    st.dictionaries(st.sampled_from(_FIELD_NAMES), _value, max_size=3),
    st.dictionaries(st.sampled_from(_FIELD_NAMES), _value, max_size=3),
)
def test_fuzz_structured_bodies(kind: int, changes: dict[str, Any], status_changes: dict[str, Any]) -> None:
    """Well-formed envelopes of any kind: a valid beacon body with known field names set to values of any shape."""
    body = beacon_body()
    body.update(changes)
    if isinstance(body.get("status"), dict):
        body["status"].update(status_changes)
    _check_outcome(pack(kind, body))


_BEACON_PATHS = sorted(make_beacon().to_wire()) + [f"status.{f}" for f in sorted(make_status().to_wire())]


@FUZZ
@given(st.sampled_from(_BEACON_PATHS), _value)
def test_fuzz_one_beacon_field(path: str, value: object) -> None:
    """Every single field of a valid beacon, top level or in its status, set to a value of any shape."""
    body = beacon_body()
    _set(body, path, value)
    _check_outcome(pack(int(Kind.BEACON), body))


# ---------------------------------------------------------------- job messages

def test_job_messages_round_trip() -> None:
    msgs: list[proto.Message] = [
        proto.Offer(rid=3, job_id="jabc123", spec=proto.CpuSpec(5 * proto.CPU_UNIT), chunk=2, start=1, count=4,
                    submitter="desk"),
        proto.Offer(rid=4, job_id="jabc123", spec=proto.MemSpec(mib=512, ms=5000)),
        proto.Offer(rid=5, job_id="jabc123", spec=proto.ExecSpec(("piwork", "20"), timeout_s=60.0)),
        proto.Accept(rid=3, node="pi4"),
        proto.Accept(rid=3, node="pi4", have=("ab" * 32,)),   # a sweep's shared input the host kept
        proto.Offer(rid=6, job_id="jabc123", spec=proto.ExecSpec(
            ("cat", "big"), inputs=(FileInfo("big", 3, "cd" * 32),), share="s0123456789", shared=1)),
        proto.Refuse(rid=3, reason="capacity", message="busy"),
        proto.Progress(rid=3, done=1000),
        proto.Output(rid=5, stream="stderr", data=b"\x00\xffpartial line"),
        proto.Result(rid=3, ok=True, node="pi4", hostname="pi4.lan", digests=(b"\x01" * 32, b"\x02" * 32),
                     iterations=2_000_000, elapsed_s=1.5, cpu_s=1.4),
        proto.Result(rid=5, ok=True, node="pi4", exit_code=3),
        proto.Result(rid=5, ok=False, node="pi4", signal=9, error="timed out after 5s"),
        proto.Cancel(rid=3),
    ]
    for msg in msgs:
        assert proto.decode(proto.encode(msg)) == msg


@pytest.mark.parametrize("bad", [
    dict(kind="gpu"),                                          # unknown kind
    dict(job_id="../etc"),                                     # job id with path characters
    dict(kind="cpu", iterations=0, count=1),                   # empty job
    dict(kind="cpu", iterations=proto.CPU_UNIT, start=1, count=1),   # units beyond the job
    dict(kind="cpu", iterations=10, count=0),                  # empty chunk
    dict(kind="mem", mib=0, ms=1),
    dict(kind="mem", mib=proto.MAX_MEM_MIB + 1, ms=1),
    dict(kind="exec", argv=()),                                # no command
    dict(kind="exec", argv=("",)),                             # empty program
    dict(kind="exec", argv=("sh", "a\x00b")),                  # NUL inside an argument
    dict(kind="exec", argv=("x",) * (proto.MAX_ARGV + 1)),
    dict(kind="exec", argv=("x", "y" * (proto.MAX_ARG + 1))),
    dict(kind="exec", argv=("true",), timeout_s=-1.0),
    dict(kind="exec", argv=("true",), share="../x"),            # a share names a cache directory: no paths
    dict(kind="exec", argv=("true",), share="s1", shared=1),    # more shared inputs than inputs
])
def test_bad_offers_are_protocol_errors(bad: dict[str, object]) -> None:
    base: dict[str, object] = {"rid": 1, "job_id": "j1", "kind": "cpu", "iterations": 10, "count": 1}
    base.update(bad)
    if isinstance(base.get("argv"), tuple):
        base["argv"] = list(base["argv"])  # type: ignore[call-overload]
    with pytest.raises(ProtocolError):
        proto.decode(pack(int(Kind.OFFER), base))


@pytest.mark.parametrize("msg", [
    proto.Refuse(rid=1, reason="because"),
    proto.Output(rid=1, stream="stdin", data=b""),
    proto.Output(rid=1, stream="stdout", data=b"x" * (proto.MAX_OUTPUT_CHUNK + 1)),
    proto.Result(rid=1, ok=True, node="a", digests=(b"short",)),
    proto.Result(rid=1, ok=True, node="a", exit_code=999),
    proto.Accept(rid=1, node="bad name"),
    proto.Accept(rid=1, node="a", have=("not a digest",)),
    proto.Accept(rid=1, node="a", have=("ab" * 32,) * (proto.MAX_INPUTS + 1)),
])
def test_bad_job_replies_are_protocol_errors(msg: proto.Message) -> None:
    with pytest.raises(ProtocolError):
        proto.decode(proto.encode(msg))


def test_records_messages_round_trip_and_reject_bad_rows() -> None:
    req = proto.RecordsRequest(rid=7, limit=20, hosted=True)
    assert proto.decode(proto.encode(req)) == req
    rows = ({"id": "j1", "kind": "cpu", "state": "succeeded", "created": 1.5, "args": {"iterations": 3}},)
    rec = proto.Records(rid=7, node="pi4", rows=rows)
    assert proto.decode(proto.encode(rec)) == rec
    for bad in (proto.RecordsRequest(rid=1, limit=0), proto.RecordsRequest(rid=1, limit=proto.MAX_RECORDS + 1),
                proto.Records(rid=1, node="pi4", rows=("not a map",)),  # type: ignore[arg-type]
                proto.Records(rid=1, node="pi4", rows=({"k" * 40: 1},)),
                proto.Records(rid=1, node="bad name", rows=())):
        with pytest.raises(ProtocolError):
            proto.decode(proto.encode(bad))


def test_advertised_capacity_is_clamped_on_receipt_to_what_a_node_can_plausibly_have() -> None:
    """A member advertising 4,096 spare cores, a petabyte and an impossible hash rate is believed only as
    far as a real machine could go, and never beyond its own figures (spare <= offered <= cores)."""
    from vesta import status as st
    liar = make_status(cores=4096, cpu_per_core=(0,) * 4096, offered_cores=4096.0, spare_cores=4096.0,
                       mem_total_mb=1 << 30, mem_avail_mb=1 << 30, offered_mem_mb=1 << 30, hash_rate=1e13)
    got = proto.decode(proto.encode(make_beacon(status=liar)))
    assert isinstance(got, Beacon)
    s = got.status
    assert (s.cores, len(s.cpu_per_core), s.offered_cores, s.spare_cores) == (st.PLAUSIBLE_CORES,) * 2 + (
        float(st.PLAUSIBLE_CORES),) * 2
    assert s.mem_total_mb == s.mem_avail_mb == s.offered_mem_mb == st.PLAUSIBLE_MEM_MB
    assert s.hash_rate == st.PLAUSIBLE_HASH_RATE
    inconsistent = make_status(cores=2, cpu_per_core=(0, 0), offered_cores=2.0, spare_cores=2.0,
                               mem_total_mb=1000, mem_avail_mb=5000, offered_mem_mb=4000)
    got = proto.decode(proto.encode(make_beacon(status=dataclasses.replace(inconsistent, offered_cores=1.5))))
    assert isinstance(got, Beacon)
    assert (got.status.spare_cores, got.status.mem_avail_mb, got.status.offered_mem_mb) == (1.5, 1000, 1000)
    honest = make_status()
    assert honest.plausible() is honest
