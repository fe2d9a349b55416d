"""Messages between nodes: one frozen dataclass per message, msgpack on the wire.

Envelope: ``[PROTO_VERSION, kind, {field: value}]``. ``decode()`` is the only
way in: anything malformed becomes ``ProtocolError`` and every field is range
checked in ``validate()`` before the rest of the daemon sees it. Fields with a
default may be missing on the wire and unknown keys are ignored, so a newer
node can add fields without breaking an older one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from enum import IntEnum
from typing import Any, ClassVar, cast

import msgpack

from vesta.errors import ProtocolError

PROTO_VERSION = 1

# Limits checked before anything is built from outside input.
MAX_NAME = 32
MAX_HOST = 253
MAX_VERSION = 32
MAX_CORES = 4096
MAX_GPUS = 16
MAX_LABELS = 16
MAX_LABEL = 32
MAX_GOSSIP = 32          # peers listed per beacon; keeps a beacon near one UDP datagram
MAX_REASON = 200
MAX_ITERATIONS = 1 << 50          # per job; ~3.6e15 hashes is years of work
CPU_UNIT = 1 << 20                # iterations per cpu unit (see vesta.executor)
MAX_UNITS_PER_CHUNK = 1 << 16
MAX_ARGV = 256                    # arguments of an exec job
MAX_ARG = 4096                    # bytes per argument
MAX_OUTPUT_CHUNK = 64 * 1024      # bytes of stdout/stderr per Output message
MAX_MEM_MIB = 1 << 22
MAX_FILE_PIECE = 256 * 1024       # bytes of a file per FileChunk message
MAX_FILE_BYTES = 1 << 40          # one input or artifact, whole (each node has its own, smaller cap)
MAX_INPUTS = 64                   # files shipped with one exec job (vesta exec --put)
MAX_PATH = 1024                   # bytes of a relative file path (inputs, artifacts)
MAX_PATH_DEPTH = 32
JOB_KINDS = ("cpu", "mem", "exec")
REFUSE_REASONS = ("capacity", "exec_disabled", "not_allowed", "not_found", "memory", "ledger", "hours",
                  "policy", "busy", "invalid")
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
FINGERPRINT_HEX = 32     # 16 bytes of SHA-256(public key), hex
POWER_MODES = ("grid", "solar", "battery")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HEX_RE = re.compile(r"^[0-9a-f]+$")


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


# ---------------------------------------------------------------- field checks


def _str(where: str, value: object, max_len: int, *, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{where} must be a string, got {type(value).__name__}")
    if len(value) > max_len or (not empty and not value):
        raise ProtocolError(f"{where} has bad length {len(value)}")
    return value


def _int(where: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(f"{where} out of range: {value!r}")
    return value


def _num(where: str, value: object, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{where} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ProtocolError(f"{where} out of range: {value!r}")
    return float(value)


def _bool(where: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"{where} must be true or false")
    return value


def check_job_id(where: str, value: object) -> str:
    job = _str(where, value, 40, empty=False)
    if not _JOB_ID_RE.match(job):
        raise ProtocolError(f"{where} is not a job id: {job!r}")
    return job


def _list(where: str, value: object, max_len: int) -> list[Any]:
    if not isinstance(value, (list, tuple)) or len(value) > max_len:
        raise ProtocolError(f"{where} must be a list of at most {max_len}")
    return list(value)


def check_name(where: str, value: object) -> str:
    """A node name as it may appear on the wire (already sanitized by its owner)."""
    name = _str(where, value, MAX_NAME, empty=False)
    if not _NAME_RE.match(name):
        raise ProtocolError(f"{where} has invalid characters: {name!r}")
    return name


def check_fingerprint(where: str, value: object) -> str:
    fp = _str(where, value, FINGERPRINT_HEX, empty=False)
    if len(fp) != FINGERPRINT_HEX or not _HEX_RE.match(fp):
        raise ProtocolError(f"{where} is not a fingerprint: {fp!r}")
    return fp


def check_rel_path(where: str, value: object) -> str:
    """A relative file path from outside: '/'-separated, no empty, '.' or '..' part, no NUL, bounded.
    Whoever writes it joins it under a directory of its own, so it cannot land anywhere else."""
    path = _str(where, value, MAX_PATH, empty=False)
    parts = path.split("/")
    if "\x00" in path or path.startswith("/") or len(parts) > MAX_PATH_DEPTH:
        raise ProtocolError(f"{where} is not a safe relative path: {path!r}")
    try:
        too_long = any(len(part.encode()) > 255 for part in parts)
    except UnicodeEncodeError:   # a file name that is not UTF-8 (os.listdir hands those over escaped)
        raise ProtocolError(f"{where} is not valid UTF-8: {path!r}") from None
    if too_long or any(part in ("", ".", "..") for part in parts):
        raise ProtocolError(f"{where} is not a safe relative path: {path!r}")
    return path


def check_sha256_hex(where: str, value: object) -> str:
    digest = _str(where, value, 64, empty=False)
    if len(digest) != 64 or not _HEX_RE.match(digest):
        raise ProtocolError(f"{where} is not a SHA-256 in hex")
    return digest


# ---------------------------------------------------------------- parts


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU as a node advertises it."""

    name: str
    mem_total_mb: int
    mem_used_mb: int
    util_pct: float

    def validate(self) -> None:
        _str("gpu.name", self.name, 64)
        _int("gpu.mem_total_mb", self.mem_total_mb, 0, 1 << 24)
        _int("gpu.mem_used_mb", self.mem_used_mb, 0, 1 << 24)
        _num("gpu.util_pct", self.util_pct, 0, 100)


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """What a node says about itself in every beacon."""

    name: str
    fingerprint: str
    host: str                 # advertised TCP host; "" = the address the beacon came from
    port: int                 # TCP peer port
    dport: int                # UDP discovery port
    version: str
    cores: int
    cpu_pct: float            # total busy share, 0..100
    cpu_per_core: tuple[int, ...]
    load1: float
    mem_total_mb: int
    mem_avail_mb: int
    offered_cores: float      # cores this node is willing to lend right now
    offered_mem_mb: int
    spare_cores: float        # offered minus what is busy now
    power: str                # grid | solar | battery
    willingness: float        # 0..1 from the power mode
    battery_pct: float | None = None
    temp_c: float | None = None
    gpus: tuple[GpuInfo, ...] = ()
    labels: tuple[str, ...] = ()
    uptime_s: float = 0.0
    hash_rate: float = 0.0    # cpu iterations per second of one core, measured at start-up
    exec_allowed: bool = False
    running: int = 0          # chunks running here for peers right now
    lending: bool = True      # inside its lending hours (when it has any)

    def validate(self) -> None:
        check_name("status.name", self.name)
        check_fingerprint("status.fingerprint", self.fingerprint)
        _str("status.host", self.host, MAX_HOST)
        _int("status.port", self.port, 1, 65535)
        _int("status.dport", self.dport, 1, 65535)
        _str("status.version", self.version, MAX_VERSION)
        _int("status.cores", self.cores, 1, MAX_CORES)
        _num("status.cpu_pct", self.cpu_pct, 0, 100)
        for pct in _list("status.cpu_per_core", self.cpu_per_core, MAX_CORES):
            _int("status.cpu_per_core[]", pct, 0, 100)
        _num("status.load1", self.load1, 0, 1e6)
        _int("status.mem_total_mb", self.mem_total_mb, 0, 1 << 32)
        _int("status.mem_avail_mb", self.mem_avail_mb, 0, 1 << 32)
        _num("status.offered_cores", self.offered_cores, 0, MAX_CORES)
        _int("status.offered_mem_mb", self.offered_mem_mb, 0, 1 << 32)
        _num("status.spare_cores", self.spare_cores, 0, MAX_CORES)
        if self.power not in POWER_MODES:
            raise ProtocolError(f"status.power unknown: {self.power!r}")
        _num("status.willingness", self.willingness, 0, 1)
        if self.battery_pct is not None:
            _num("status.battery_pct", self.battery_pct, 0, 100)
        if self.temp_c is not None:
            _num("status.temp_c", self.temp_c, -100, 300)
        for gpu in _list("status.gpus", self.gpus, MAX_GPUS):
            gpu.validate()
        for label in _list("status.labels", self.labels, MAX_LABELS):
            _str("status.labels[]", label, MAX_LABEL)
        _num("status.uptime_s", self.uptime_s, 0, 1e10)
        _num("status.hash_rate", self.hash_rate, 0, 1e13)
        _bool("status.exec_allowed", self.exec_allowed)
        _int("status.running", self.running, 0, 1 << 20)
        _bool("status.lending", self.lending)

    def to_wire(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        body["gpus"] = [[g.name, g.mem_total_mb, g.mem_used_mb, g.util_pct] for g in self.gpus]
        body["cpu_per_core"] = list(self.cpu_per_core)
        body["labels"] = list(self.labels)
        return body

    @classmethod
    def from_wire(cls, body: object) -> NodeStatus:
        if not isinstance(body, dict):
            raise ProtocolError("status must be a map")
        body = dict(body)
        gpus = _list("status.gpus", body.get("gpus", []), MAX_GPUS)
        try:
            body["gpus"] = tuple(GpuInfo(*g) for g in gpus)
        except TypeError as exc:
            raise ProtocolError(f"status.gpus malformed: {exc}") from exc
        body["cpu_per_core"] = tuple(_list("status.cpu_per_core", body.get("cpu_per_core", []), MAX_CORES))
        body["labels"] = tuple(_list("status.labels", body.get("labels", []), MAX_LABELS))
        return cast(NodeStatus, _build(cls, body, "status"))


@dataclass(frozen=True, slots=True)
class GossipEntry:
    """A peer the sender knows, so the receiver can contact it directly."""

    fingerprint: str
    host: str     # IP the sender reaches it at
    dport: int    # its discovery port

    def validate(self) -> None:
        check_fingerprint("gossip.fingerprint", self.fingerprint)
        _str("gossip.host", self.host, MAX_HOST, empty=False)
        _int("gossip.dport", self.dport, 1, 65535)


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

    def to_wire(self) -> dict[str, Any]:
        return {
            "status": self.status.to_wire(),
            "ts": self.ts,
            "boot": self.boot,
            "seq": self.seq,
            "interval_ms": self.interval_ms,
            "pubkey": self.pubkey,
            "gossip": [[g.fingerprint, g.host, g.dport] for g in self.gossip],
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
    then Progress/Output while it runs and one Result, all carrying the same rid."""

    KIND: ClassVar[Kind] = Kind.OFFER
    rid: int
    job_id: str
    kind: str                     # cpu | mem | exec
    chunk: int = 0
    iterations: int = 0           # cpu: the whole job's iterations (units are cut from it)
    start: int = 0                # cpu: first unit of this chunk
    count: int = 0                # cpu: units in this chunk
    mib: int = 0                  # mem
    ms: int = 0                   # mem
    argv: tuple[str, ...] = ()    # exec
    timeout_s: float = 0.0        # exec: 0 = the host's default
    mem_mib: int = 0              # exec: address-space limit; 0 = the host's default (its mem_offer_mb)
    submitter: str = ""           # the submitter's node name, for the host's logs and records
    # exec: files the submitter sends (FileChunk, after Accept) before the program starts:
    # (relative path, size, sha256 hex, executable)
    inputs: tuple[tuple[str, int, str, bool], ...] = ()
    output_cap: int = 0           # exec: bytes of $VESTA_OUTPUT the submitter takes back (0: none)

    def validate(self) -> None:
        _int("offer.rid", self.rid, 0, 1 << 63)
        check_job_id("offer.job_id", self.job_id)
        if self.kind not in JOB_KINDS:
            raise ProtocolError(f"offer.kind unknown: {self.kind!r}")
        _int("offer.chunk", self.chunk, 0, 1 << 31)
        if self.submitter:
            check_name("offer.submitter", self.submitter)
        if self.kind == "cpu":
            _int("offer.iterations", self.iterations, 1, MAX_ITERATIONS)
            _int("offer.count", self.count, 1, MAX_UNITS_PER_CHUNK)
            _int("offer.start", self.start, 0, MAX_ITERATIONS)
            if (self.start + self.count - 1) * CPU_UNIT >= self.iterations:
                raise ProtocolError("offer units lie beyond the job's iterations")
        elif self.kind == "mem":
            _int("offer.mib", self.mib, 1, MAX_MEM_MIB)
            _int("offer.ms", self.ms, 0, 86_400_000)
        else:
            argv = _list("offer.argv", self.argv, MAX_ARGV)
            if not argv:
                raise ProtocolError("offer.argv is empty")
            for arg in argv:
                _str("offer.argv[]", arg, MAX_ARG)
                if "\x00" in arg:
                    raise ProtocolError("offer.argv contains a NUL byte")
            if not argv[0]:
                raise ProtocolError("offer.argv[0] is empty")
            _num("offer.timeout_s", self.timeout_s, 0, 7 * 86400)
            _int("offer.mem_mib", self.mem_mib, 0, MAX_MEM_MIB)
            _int("offer.output_cap", self.output_cap, 0, MAX_FILE_BYTES)
            seen = set()
            for entry in _list("offer.inputs", self.inputs, MAX_INPUTS):
                if not isinstance(entry, tuple) or len(entry) != 4:
                    raise ProtocolError("offer.inputs[] must be [path, size, sha256, executable]")
                path = check_rel_path("offer.inputs[].path", entry[0])
                _int("offer.inputs[].size", entry[1], 0, MAX_FILE_BYTES)
                check_sha256_hex("offer.inputs[].sha256", entry[2])
                _bool("offer.inputs[].executable", entry[3])
                if path in seen:
                    raise ProtocolError(f"offer.inputs names {path!r} twice")
                seen.add(path)
        if self.kind != "exec" and (self.inputs or self.output_cap):
            raise ProtocolError("offer.inputs and offer.output_cap are for exec jobs")

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Offer:
        body = dict(body)
        body["argv"] = tuple(_list("offer.argv", body.get("argv", []), MAX_ARGV))
        body["inputs"] = tuple(tuple(e) if isinstance(e, list) else e
                               for e in _list("offer.inputs", body.get("inputs", []), MAX_INPUTS))
        return cast(Offer, _build(cls, body, "offer"))

    def to_wire(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        body["argv"] = list(self.argv)
        body["inputs"] = [list(e) for e in self.inputs]
        return body


@dataclass(frozen=True, slots=True)
class Accept:
    """The host admitted an offer and is running it (host -> submitter)."""

    KIND: ClassVar[Kind] = Kind.ACCEPT
    rid: int
    node: str

    def validate(self) -> None:
        _int("accept.rid", self.rid, 0, 1 << 63)
        check_name("accept.node", self.node)


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


def _build(cls: type[Any], body: dict[str, Any], where: str) -> Any:
    """Construct ``cls`` from a wire map: defaults fill gaps, unknown keys are ignored."""
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in body:
            kwargs[f.name] = body[f.name]
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ProtocolError(f"{where}.{f.name} missing")
    return cls(**kwargs)



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
            raise ProtocolError(f"unsupported protocol version {version!r}")
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
