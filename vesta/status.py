"""What a node says about itself in every beacon: its ``NodeStatus``, its GPUs, the peers it knows."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, cast

from vesta.checks import build as _build
from vesta.checks import check_bool as _bool
from vesta.checks import check_fingerprint, check_name
from vesta.checks import check_int as _int
from vesta.checks import check_list as _list
from vesta.checks import check_num as _num
from vesta.checks import check_str as _str
from vesta.errors import ProtocolError

MAX_HOST = 253
MAX_VERSION = 32
MAX_CORES = 4096
MAX_GPUS = 16
MAX_LABELS = 16
MAX_LABEL = 32
POWER_MODES = ("grid", "solar", "battery")
# What a node may plausibly have, whatever it says (a key holder can say anything): a status received is
# clamped to these, and to itself (offered <= cores, spare <= offered, memory offered <= memory).
PLAUSIBLE_CORES = 1024              # the largest machines today have 512 hardware threads
PLAUSIBLE_MEM_MB = 16 << 20         # 16 TiB
PLAUSIBLE_HASH_RATE = 1e8           # SHA-256 blocks a second on one core; SHA-NI does about 3e7


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

    def plausible(self) -> NodeStatus:
        """This status with its capacity bounded by what a node can plausibly have (the constants above),
        and each figure by the one it is part of; unchanged (the same object) for an honest node."""
        cores = min(self.cores, PLAUSIBLE_CORES)
        offered = min(self.offered_cores, float(cores))
        total = min(self.mem_total_mb, PLAUSIBLE_MEM_MB)
        clamped: dict[str, Any] = {"cores": cores, "cpu_per_core": self.cpu_per_core[:cores], "offered_cores": offered,
                   "spare_cores": min(self.spare_cores, offered), "mem_total_mb": total,
                   "mem_avail_mb": min(self.mem_avail_mb, total), "offered_mem_mb": min(self.offered_mem_mb, total),
                   "hash_rate": min(self.hash_rate, PLAUSIBLE_HASH_RATE)}
        if all(getattr(self, k) == v for k, v in clamped.items()):
            return self
        return replace(self, **clamped)

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
        status = cast(NodeStatus, _build(cls, body, "status"))
        status.validate()
        return status.plausible()   # clamped on receipt: what a peer claims is bounded (plausible)


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
