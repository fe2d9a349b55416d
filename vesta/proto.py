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


Message = Beacon | Ping | Pong | Error
_BY_KIND: dict[Kind, type[Any]] = {cls.KIND: cls for cls in (Beacon, Ping, Pong, Error)}


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
