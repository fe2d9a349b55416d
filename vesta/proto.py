"""Messages between nodes: one frozen dataclass per message, msgpack on the wire.

Envelope: ``[PROTO_VERSION, kind, {field: value}]``. ``decode()`` is the only
way in: anything malformed becomes ``ProtocolError`` and every field is range
checked in ``validate()`` before the rest of the daemon sees it. Fields with a
default may be missing on the wire and unknown keys are ignored, so a newer
node can add fields without breaking an older one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, ClassVar, cast

import msgpack

from vesta.checks import (
    FINGERPRINT_HEX,
    MAX_NAME,
    MAX_PATH,
    MAX_PATH_DEPTH,
    check_bool,
    check_fingerprint,
    check_int,
    check_job_id,
    check_list,
    check_name,
    check_num,
    check_rel_path,
    check_sha256_hex,
    check_str,
)
from vesta.checks import build as _build
from vesta.errors import Dropped, InvalidJob, ProtocolError
from vesta.spec import (
    JOB_KINDS,
    MAX_ARG,
    MAX_ARGV,
    MAX_FILE_BYTES,
    MAX_INPUTS,
    MAX_ITERATIONS,
    MAX_MEM_MIB,
    CpuSpec,
    ExecSpec,
    FileInfo,
    MemSpec,
    Spec,
    spec_from_wire,
)
from vesta.status import (
    MAX_CORES,
    MAX_GPUS,
    MAX_HOST,
    MAX_LABEL,
    MAX_LABELS,
    MAX_VERSION,
    POWER_MODES,
    GossipEntry,
    GpuInfo,
    NodeStatus,
)

__all__ = [   # re-exported: the limits and parts that messages carry
    "FINGERPRINT_HEX", "JOB_KINDS", "MAX_ARG", "MAX_ARGV", "MAX_CORES", "MAX_FILE_BYTES", "MAX_GPUS", "MAX_HOST",
    "MAX_INPUTS", "MAX_ITERATIONS", "MAX_LABEL", "MAX_LABELS", "MAX_MEM_MIB", "MAX_NAME", "MAX_PATH", "MAX_PATH_DEPTH",
    "MAX_VERSION", "POWER_MODES", "CpuSpec", "ExecSpec", "FileInfo", "GossipEntry", "GpuInfo", "MemSpec", "NodeStatus",
    "Spec", "check_fingerprint", "check_job_id", "check_name", "check_rel_path", "check_sha256_hex"]

PROTO_VERSION = 1

# Limits checked before anything is built from outside input (a node's status: see ``status``).
MAX_GOSSIP = 32          # peers listed per beacon; keeps a beacon near one UDP datagram
MAX_REASON = 200
CPU_UNIT = 1 << 20                # iterations per cpu unit (see vesta.workloads)
MAX_UNITS_PER_CHUNK = 1 << 16
MAX_OUTPUT_CHUNK = 64 * 1024      # bytes of stdout/stderr per Output message
MAX_FILE_PIECE = 256 * 1024       # bytes of a file per FileChunk message
REFUSE_REASONS = ("capacity", "exec_disabled", "not_allowed", "not_found", "memory", "ledger", "hours",
                  "policy", "busy", "invalid")



class Kind(IntEnum):
    """Message kinds. Append only: the numbers are on the wire."""

    BEACON = 1
    PING = 2
    PONG = 3
    ERROR = 4
    OFFER = 5
    ACCEPT = 6
    REFUSE = 7
    PROGRESS = 8
    OUTPUT = 9
    RESULT = 10
    CANCEL = 11
    RECORDS_REQUEST = 12
    RECORDS = 13
    FILE_CHUNK = 14


# Field checks (shared with the control socket and the config): see ``checks``.
_str, _int, _num, _bool, _list = check_str, check_int, check_num, check_bool, check_list


# ---------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Beacon:
    """Periodic announcement (every node -> broadcast, seeds and gossip targets, UDP).

    ``boot`` (start time in ns) and ``seq`` order beacons across restarts:
    a receiver accepts only (boot, seq) greater than what it last saw.
    """

    KIND: ClassVar[Kind] = Kind.BEACON
    status: NodeStatus
    ts: float             # sender's wall clock, seconds since the epoch
    boot: int
    seq: int
    interval_ms: int      # the sender's beacon interval: receivers time it out from this
    pubkey: bytes         # sender's Ed25519 public key; the envelope is signed with it
    gossip: tuple[GossipEntry, ...] = ()
    leaving: bool = False  # the sender is shutting down: drop it now (an older node ignores it and times out)

    def validate(self) -> None:
        self.status.validate()
        _num("beacon.ts", self.ts, 0, 1e11)
        _int("beacon.boot", self.boot, 0, 1 << 63)
        _int("beacon.seq", self.seq, 0, 1 << 63)
        _int("beacon.interval_ms", self.interval_ms, 10, 3_600_000)
        if not isinstance(self.pubkey, bytes) or len(self.pubkey) != 32:
            raise ProtocolError("beacon.pubkey must be 32 bytes")
        for entry in _list("beacon.gossip", self.gossip, MAX_GOSSIP):
            entry.validate()
        _bool("beacon.leaving", self.leaving)

    def to_wire(self) -> dict[str, Any]:
        return {
            "status": self.status.to_wire(),
            "ts": self.ts,
            "boot": self.boot,
            "seq": self.seq,
            "interval_ms": self.interval_ms,
            "pubkey": self.pubkey,
            "gossip": [[g.fingerprint, g.host, g.dport] for g in self.gossip],
            **({"leaving": True} if self.leaving else {}),
        }

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Beacon:
        body = dict(body)
        body["status"] = NodeStatus.from_wire(body.get("status"))
        gossip = _list("beacon.gossip", body.get("gossip", []), MAX_GOSSIP)
        try:
            body["gossip"] = tuple(GossipEntry(*g) for g in gossip)
        except TypeError as exc:
            raise ProtocolError(f"beacon.gossip malformed: {exc}") from exc
        return cast(Beacon, _build(cls, body, "beacon"))


@dataclass(frozen=True, slots=True)
class Ping:
    """Liveness and round-trip probe over a peer link (either side -> the other)."""

    KIND: ClassVar[Kind] = Kind.PING
    rid: int
    ts: float

    def validate(self) -> None:
        _int("ping.rid", self.rid, 0, 1 << 63)
        _num("ping.ts", self.ts, 0, 1e11)


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to a Ping, echoing its ts, with the responder's status."""

    KIND: ClassVar[Kind] = Kind.PONG
    rid: int
    ts: float
    name: str

    def validate(self) -> None:
        _int("pong.rid", self.rid, 0, 1 << 63)
        _num("pong.ts", self.ts, 0, 1e11)
        check_name("pong.name", self.name)


@dataclass(frozen=True, slots=True)
class Error:
    """A request could not be served (responder -> requester); ``reason`` is one word."""

    KIND: ClassVar[Kind] = Kind.ERROR
    rid: int
    reason: str
    message: str = ""

    def validate(self) -> None:
        _int("error.rid", self.rid, 0, 1 << 63)
        _str("error.reason", self.reason, 32, empty=False)
        _str("error.message", self.message, MAX_REASON)


@dataclass(frozen=True, slots=True)
class Offer:
    """A chunk of a job proposed to a host (submitter -> host). The host answers Accept or Refuse,
    then Progress/Output while it runs and one Result, all carrying the same rid.

    On the wire the spec's fields are flat beside the offer's own, with ``kind`` naming the spec:
    ``{rid, job_id, kind, chunk, submitter, iterations, start, count}`` for cpu, ``{..., mib, ms}`` for mem,
    ``{..., argv, timeout_s, mem_mib, inputs, output_cap}`` for exec."""

    KIND: ClassVar[Kind] = Kind.OFFER
    rid: int
    job_id: str
    spec: Spec
    chunk: int = 0
    start: int = 0                # cpu: first unit of this chunk (units are cut from spec.iterations)
    count: int = 0                # cpu: units in this chunk
    submitter: str = ""           # the submitter's node name, for the host's logs and records
    output_cap: int = 0           # exec: bytes of $VESTA_OUTPUT the submitter takes back (0: none)

    @property
    def kind(self) -> str:
        return self.spec.KIND

    def validate(self) -> None:
        _int("offer.rid", self.rid, 0, 1 << 63)
        check_job_id("offer.job_id", self.job_id)
        if not isinstance(self.spec, (CpuSpec, MemSpec, ExecSpec)):
            raise ProtocolError("offer.spec must be a job specification")
        try:
            self.spec.validate()
        except InvalidJob as exc:
            raise ProtocolError(f"offer: {exc}") from None
        _int("offer.chunk", self.chunk, 0, 1 << 31)
        if self.submitter:
            check_name("offer.submitter", self.submitter)
        _int("offer.output_cap", self.output_cap, 0, MAX_FILE_BYTES)
        if isinstance(self.spec, CpuSpec):
            _int("offer.count", self.count, 1, MAX_UNITS_PER_CHUNK)
            _int("offer.start", self.start, 0, MAX_ITERATIONS)
            if (self.start + self.count - 1) * CPU_UNIT >= self.spec.iterations:
                raise ProtocolError("offer units lie beyond the job's iterations")
        elif not isinstance(self.spec, ExecSpec) and self.output_cap:
            raise ProtocolError("offer.inputs and offer.output_cap are for exec jobs")

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Offer:
        body = dict(body)
        kind = body.get("kind")
        if kind not in JOB_KINDS:
            raise ProtocolError(f"offer.kind unknown: {kind!r}")
        if kind != "exec" and body.get("inputs"):
            raise ProtocolError("offer.inputs and offer.output_cap are for exec jobs")
        try:
            body["spec"] = spec_from_wire(kind, body)
        except InvalidJob as exc:
            raise ProtocolError(f"offer: {exc}") from None
        return cast(Offer, _build(cls, body, "offer"))

    def to_wire(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "spec"}
        return body | {"kind": self.kind} | self.spec.to_wire()


@dataclass(frozen=True, slots=True)
class Accept:
    """The host admitted an offer and is running it (host -> submitter)."""

    KIND: ClassVar[Kind] = Kind.ACCEPT
    rid: int
    node: str
    have: tuple[str, ...] = ()    # exec: SHA-256 (hex) of inputs the host has already (a sweep's shared --put)

    def validate(self) -> None:
        _int("accept.rid", self.rid, 0, 1 << 63)
        check_name("accept.node", self.node)
        if not isinstance(self.have, (list, tuple)) or len(self.have) > MAX_INPUTS:
            raise ProtocolError(f"accept.have must list at most {MAX_INPUTS} SHA-256 digests")
        for sha in self.have:
            check_sha256_hex("accept.have", sha)

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Accept:
        have = body.get("have", ())
        return cast(Accept, _build(cls, body | {"have": tuple(have) if isinstance(have, list) else have}, "accept"))


@dataclass(frozen=True, slots=True)
class Refuse:
    """The host declined an offer (host -> submitter); ``reason`` is one of REFUSE_REASONS."""

    KIND: ClassVar[Kind] = Kind.REFUSE
    rid: int
    reason: str
    message: str = ""

    def validate(self) -> None:
        _int("refuse.rid", self.rid, 0, 1 << 63)
        if self.reason not in REFUSE_REASONS:
            raise ProtocolError(f"refuse.reason unknown: {self.reason!r}")
        _str("refuse.message", self.message, MAX_REASON)


@dataclass(frozen=True, slots=True)
class Progress:
    """Work done so far on a chunk (host -> submitter), at most a few per second."""

    KIND: ClassVar[Kind] = Kind.PROGRESS
    rid: int
    done: int

    def validate(self) -> None:
        _int("progress.rid", self.rid, 0, 1 << 63)
        _int("progress.done", self.done, 0, MAX_ITERATIONS)


@dataclass(frozen=True, slots=True)
class Output:
    """A piece of an exec job's stdout or stderr (host -> submitter), in order."""

    KIND: ClassVar[Kind] = Kind.OUTPUT
    rid: int
    stream: str
    data: bytes

    def validate(self) -> None:
        _int("output.rid", self.rid, 0, 1 << 63)
        if self.stream not in ("stdout", "stderr"):
            raise ProtocolError(f"output.stream unknown: {self.stream!r}")
        if not isinstance(self.data, bytes) or len(self.data) > MAX_OUTPUT_CHUNK:
            raise ProtocolError("output.data must be at most 64 KiB of bytes")


@dataclass(frozen=True, slots=True)
class Result:
    """How a chunk ended (host -> submitter). ``ok`` false with ``error`` for failures of the run
    itself (cancelled, out of memory); an exec program's own non-zero exit is ``ok`` with its code."""

    KIND: ClassVar[Kind] = Kind.RESULT
    rid: int
    ok: bool
    node: str
    hostname: str = ""
    digests: tuple[bytes, ...] = ()   # cpu: one 32-byte digest per unit
    iterations: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    exit_code: int | None = None
    signal: int | None = None
    error: str = ""

    def validate(self) -> None:
        _int("result.rid", self.rid, 0, 1 << 63)
        _bool("result.ok", self.ok)
        check_name("result.node", self.node)
        _str("result.hostname", self.hostname, MAX_HOST)
        for d in _list("result.digests", self.digests, MAX_UNITS_PER_CHUNK):
            if not isinstance(d, bytes) or len(d) != 32:
                raise ProtocolError("result.digests must be 32-byte digests")
        _int("result.iterations", self.iterations, 0, MAX_ITERATIONS)
        _num("result.elapsed_s", self.elapsed_s, 0, 1e9)
        _num("result.cpu_s", self.cpu_s, 0, 1e12)
        if self.exit_code is not None:
            _int("result.exit_code", self.exit_code, -255, 255)
        if self.signal is not None:
            _int("result.signal", self.signal, 1, 128)
        _str("result.error", self.error, MAX_REASON)

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Result:
        body = dict(body)
        body["digests"] = tuple(_list("result.digests", body.get("digests", []), MAX_UNITS_PER_CHUNK))
        return cast(Result, _build(cls, body, "result"))

    def to_wire(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        body["digests"] = list(self.digests)
        return body


@dataclass(frozen=True, slots=True)
class Cancel:
    """Stop the chunk started by the offer with this rid (submitter -> host)."""

    KIND: ClassVar[Kind] = Kind.CANCEL
    rid: int

    def validate(self) -> None:
        _int("cancel.rid", self.rid, 0, 1 << 63)


MAX_RECORDS = 1000


@dataclass(frozen=True, slots=True)
class RecordsRequest:
    """Ask a member for its job records, newest first (any member -> any member: transparency)."""

    KIND: ClassVar[Kind] = Kind.RECORDS_REQUEST
    rid: int
    limit: int = 50
    hosted: bool = False

    def validate(self) -> None:
        _int("records_request.rid", self.rid, 0, 1 << 63)
        _int("records_request.limit", self.limit, 1, MAX_RECORDS)
        _bool("records_request.hosted", self.hosted)


RECORD_STATES = ("queued", "running", "succeeded", "failed", "cancelled")   # jobs and hosted runs alike
MAX_RECORD_TEXT = 4096      # a string anywhere in a record row
MAX_RECORD_ITEMS = 2048     # values in a row's args or result, nested ones included
_WHEN = (0.0, 1e11)         # a timestamp: seconds since 1970, before the year 5138


def _opt(check: Callable[[str, object], object]) -> Callable[[str, object], object]:
    return lambda where, value: None if value is None else check(where, value)


def _plain(where: str, value: object, left: list[int], depth: int = 0) -> None:
    """JSON-like data of bounded size: strings, finite numbers, booleans, null, lists and string-keyed maps."""
    left[0] -= 1
    if left[0] < 0 or depth > 6:
        raise ProtocolError(f"{where} is too large or too deep")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        _num(where, value, -1e18, 1e18)
    elif isinstance(value, str):
        _str(where, value, MAX_RECORD_TEXT)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _plain(where, item, left, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            _str(f"{where} key", key, 32, empty=False)
            _plain(f"{where}.{key}", item, left, depth + 1)
    else:
        raise ProtocolError(f"{where} has a value of type {type(value).__name__}")


def _record_map(where: str, value: object) -> object:
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be a map")
    _plain(where, value, [MAX_RECORD_ITEMS])
    argv = value.get("argv")
    if argv is not None:   # what `vesta jobs` prints for an exec job
        for j, arg in enumerate(_list(f"{where}.argv", argv, MAX_ARGV)):
            _str(f"{where}.argv[{j}]", arg, MAX_ARG)
    for key in ("iterations", "start", "count", "mib", "ms"):
        if key in value and value[key] is not None:
            _num(f"{where}.{key}", value[key], 0, 1e18)
    return value


def _state(where: str, value: object) -> object:
    if value not in RECORD_STATES:
        raise ProtocolError(f"{where} is not a job state: {value!r}")
    return value


def _text(where: str, value: object) -> object:
    return _str(where, value, MAX_RECORD_TEXT)


def _kind(where: str, value: object) -> object:
    if value not in JOB_KINDS:
        raise ProtocolError(f"{where} is not a job kind: {value!r}")
    return value


# Every field a row of ``Records`` may have (a job this node submitted, or a run it hosted), and its check.
_RECORD_FIELDS: dict[str, Callable[[str, object], object]] = {
    "id": lambda w, v: _int(w, v, 0, 1 << 63) if isinstance(v, int) else check_job_id(w, v),
    "job_id": check_job_id,
    "kind": _kind,
    "args": _record_map,
    "result": _opt(_record_map),
    "submitter": check_name,
    "submitter_fp": check_fingerprint,
    "peer": check_name,
    "peer_fp": check_fingerprint,
    "chunk": lambda w, v: _int(w, v, 0, 1 << 32),
    "created": lambda w, v: _num(w, v, *_WHEN),
    "started": _opt(lambda w, v: _num(w, v, *_WHEN)),
    "finished": _opt(lambda w, v: _num(w, v, *_WHEN)),
    "state": _state,
    "exit_code": _opt(lambda w, v: _int(w, v, -(1 << 31), 1 << 31)),
    "reason": _text,
    "log_bytes": lambda w, v: _int(w, v, 0, 1 << 62),
    "log_dropped": lambda w, v: _int(w, v, 0, 1 << 62),
    "log_truncated": _bool,
    "cpu_s": lambda w, v: _num(w, v, 0, 1e15),
    "mem_mib_s": lambda w, v: _num(w, v, 0, 1e18),
}


def check_record_row(where: str, row: object) -> dict[str, Any]:
    """One row of a peer's ``Records``: every known field of its type and range (a peer's records are shown
    to the user and sorted by time: a forged type must reach neither), a kind and a state. Returns the row
    with only the known fields (one a newer version adds is left out, not refused)."""
    if not isinstance(row, dict) or not all(isinstance(k, str) and len(k) <= 32 for k in row):
        raise ProtocolError(f"{where} must be a map with short string keys")
    known = {key: value for key, value in row.items() if key in _RECORD_FIELDS}
    for key, value in known.items():
        _RECORD_FIELDS[key](f"{where}.{key}", value)
    if "state" not in known or "kind" not in known:
        raise ProtocolError(f"{where} has no state or kind")
    return known


@dataclass(frozen=True, slots=True)
class Records:
    """A member's job records (answer to RecordsRequest): a list of maps as ``vesta jobs --json`` shows them."""

    KIND: ClassVar[Kind] = Kind.RECORDS
    rid: int
    node: str
    rows: tuple[dict[str, Any], ...] = ()

    def validate(self) -> None:
        _int("records.rid", self.rid, 0, 1 << 63)
        check_name("records.node", self.node)
        for i, row in enumerate(_list("records.rows", self.rows, MAX_RECORDS)):
            check_record_row(f"records.rows[{i}]", row)

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Records:
        body = dict(body)
        body["rows"] = tuple(check_record_row(f"records.rows[{i}]", row)
                             for i, row in enumerate(_list("records.rows", body.get("rows", []), MAX_RECORDS)))
        return cast(Records, _build(cls, body, "records"))

    def to_wire(self) -> dict[str, Any]:
        return {"rid": self.rid, "node": self.node, "rows": list(self.rows)}


@dataclass(frozen=True, slots=True)
class FileChunk:
    """A piece of a file that travels with an exec job, on the job's rid: an input (``vesta exec --put``,
    submitter -> host, after Accept) or an artifact from ``$VESTA_OUTPUT`` (host -> submitter, before
    the Result). A file's pieces come in order; the last (``eof``) carries the SHA-256 of the whole
    file. ``refused`` instead says why a file is not sent (over the cap, a symlink); it has no data."""

    KIND: ClassVar[Kind] = Kind.FILE_CHUNK
    rid: int
    path: str
    offset: int = 0
    data: bytes = b""
    eof: bool = False
    sha256: bytes = b""
    executable: bool = False
    refused: str = ""

    def validate(self) -> None:
        _int("file_chunk.rid", self.rid, 0, 1 << 63)
        check_rel_path("file_chunk.path", self.path)
        _int("file_chunk.offset", self.offset, 0, MAX_FILE_BYTES)
        if not isinstance(self.data, bytes) or len(self.data) > MAX_FILE_PIECE:
            raise ProtocolError(f"file_chunk.data must be at most {MAX_FILE_PIECE} bytes")
        _bool("file_chunk.eof", self.eof)
        _bool("file_chunk.executable", self.executable)
        _str("file_chunk.refused", self.refused, MAX_REASON)
        if not isinstance(self.sha256, bytes) or len(self.sha256) not in (0, 32):
            raise ProtocolError("file_chunk.sha256 must be 32 bytes")
        if self.eof and not self.refused and len(self.sha256) != 32:
            raise ProtocolError("file_chunk: the last piece of a file must carry its sha256")
        if self.refused and self.data:
            raise ProtocolError("file_chunk: a refused file carries no data")


Message = (Beacon | Ping | Pong | Error | Offer | Accept | Refuse | Progress | Output | Result | Cancel
           | RecordsRequest | Records | FileChunk)
_BY_KIND: dict[Kind, type[Any]] = {
    cls.KIND: cls for cls in (Beacon, Ping, Pong, Error, Offer, Accept, Refuse, Progress, Output, Result, Cancel,
                              RecordsRequest, Records, FileChunk)
}


def encode(msg: Message) -> bytes:
    """Serialise one message into its envelope."""
    if hasattr(msg, "to_wire"):
        body = msg.to_wire()
    else:
        body = {f.name: getattr(msg, f.name) for f in fields(msg)}
    return cast(bytes, msgpack.packb([PROTO_VERSION, int(msg.KIND), body], use_bin_type=True))


def decode(data: bytes) -> Message:
    """Parse one message; anything malformed is ``ProtocolError``, never a crash."""
    try:
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        if not isinstance(envelope, list) or len(envelope) != 3:
            raise ProtocolError("envelope must be [version, kind, body]")
        version, kind, body = envelope
        if version != PROTO_VERSION:
            raise Dropped("version", f"protocol version {version!r}, this node speaks {PROTO_VERSION}: run the same "
                                     "vesta version on both (the older one cannot read the newer)")
        if not isinstance(body, dict):
            raise ProtocolError("message body must be a map")
        cls = _BY_KIND[Kind(kind)]
        msg: Message = cls.from_wire(body) if hasattr(cls, "from_wire") else _build(cls, body, cls.__name__)
    except ProtocolError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"undecodable message: {type(exc).__name__}: {exc}") from exc
    msg.validate()
    return msg
