"""This node's capacity model: what it has, what its owner uses, what it lends, as beacons and routing see it.

``Capacity`` samples the CPU (only the cores vestad may use, when it is pinned with taskset), reads
memory, power and thermals, and turns them into the ``NodeStatus`` every beacon carries, the slots the
host admits peers' chunks into (the owner's load comes first), and the ``NodeView`` list routing
places work on.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vesta import __version__, proto, sysstat, workloads
from vesta.autopilot import NodeView
from vesta.budget import PowerMode, compute_offer, power_mode
from vesta.config import Config
from vesta.hours import LendingHours
from vesta.peertable import PeerTable


@dataclass
class Capacity:
    """The capacity model of one node. ``lent`` counts the chunks it runs for peers now; ``hours`` says
    whether it lends now (None: always)."""

    cfg: Config
    fingerprint: str
    lent: Callable[[], int]
    hours: Callable[[], LendingHours | None]
    stress: workloads.Stress = field(default_factory=workloads.Stress)
    port: int = 0                                  # the TCP peer port, once listening
    hash_rate: float = 0.0                         # measured at start
    gpus: tuple[sysstat.Gpu, ...] = ()
    started: float = field(default_factory=time.monotonic)
    own: Callable[[], int] = lambda: 0             # chunks of this node's own jobs running here now
    shown: Callable[[str, str], str] = lambda name, fp: name   # (claimed name, fingerprint) -> shown name

    def __post_init__(self) -> None:
        total = sysstat.cpu_count(self.cfg.proc_root)
        # A daemon pinned with taskset lends, and measures the load of, only the cores it may use.
        self.allowed = sorted(c for c in os.sched_getaffinity(0) if c < total) or list(range(total))
        self.cores = len(self.allowed)
        self.sampler = sysstat.CpuSampler(self.cfg.proc_root)
        self.cpu = self.sampler.sample()
        self.labels = node_labels(self.cfg.labels, self.cores, bool(self.gpus))
        self.status: proto.NodeStatus | None = None   # refreshed every beacon round
        self.lent_in_sample = 0                        # chunks lent during the last CPU sample window
        self.own_in_sample = 0                         # chunks of our own jobs run here in that window

    def sample(self, lent_peak: int, own_peak: int = 0) -> proto.NodeStatus:
        """A new CPU sample (one per beacon round) and the status it gives."""
        self.cpu = self.sampler.sample()
        self.lent_in_sample = lent_peak
        self.own_in_sample = own_peak
        self.status = None
        self.status = self.node_status()
        return self.status

    def current(self) -> proto.NodeStatus:
        return self.status or self.node_status()

    def power(self) -> tuple[PowerMode, sysstat.PowerInfo]:
        info = sysstat.read_power(self.cfg.sys_root)
        return power_mode(self.cfg.power, info, self.cfg.battery_min_pct), info

    def lending(self) -> bool:
        hours = self.hours()
        return hours is None or hours.is_open()

    def cpu_pct(self) -> float:
        """Busy share of the cores this daemon may use."""
        per_core = self.cpu.per_core_pct
        if len(self.allowed) == len(per_core) or not per_core:
            return min(100.0, max(0.0, self.cpu.total_pct))
        mine = [per_core[c] for c in self.allowed if c < len(per_core)]
        return min(100.0, max(0.0, sum(mine) / len(mine))) if mine else self.cpu.total_pct

    def node_status(self) -> proto.NodeStatus:
        """Our own status, as the next beacon will carry it."""
        cfg = self.cfg
        mem = sysstat.read_meminfo(cfg.proc_root)
        mode, info = self.power()
        lending = self.lending()
        offer = compute_offer(cores=self.cores, cpu_pct=self.cpu_pct(), mem_total_mb=mem.total_mb,
                              mem_avail_mb=mem.available_mb, cpu_offer_pct=cfg.cpu_offer_pct,
                              reserve_pct=cfg.reserve_pct, mem_offer_mb=cfg.mem_offer_mb,
                              willingness=mode.willingness if lending else 0.0)
        temps = [t.celsius for t in sysstat.read_thermals(cfg.sys_root)]
        host = cfg.advertise or ("" if cfg.bind in ("", "0.0.0.0") else cfg.bind)
        return proto.NodeStatus(
            name=cfg.name, fingerprint=self.fingerprint, host=host, port=self.port, dport=cfg.dport,
            version=__version__, cores=self.cores, cpu_pct=round(self.cpu_pct(), 1),
            cpu_per_core=tuple(int(round(min(100.0, max(0.0, self.cpu.per_core_pct[c]))))
                               for c in self.allowed if c < len(self.cpu.per_core_pct)),
            load1=round(sysstat.read_loadavg(cfg.proc_root)[0], 2),
            mem_total_mb=mem.total_mb, mem_avail_mb=mem.available_mb,
            offered_cores=offer.offered_cores, offered_mem_mb=offer.offered_mem_mb, spare_cores=offer.spare_cores,
            power=mode.mode, willingness=round(mode.willingness, 3), battery_pct=info.battery_pct,
            temp_c=max(temps) if temps else None,
            gpus=tuple(proto.GpuInfo(g.name[:64], g.mem_total_mb, g.mem_used_mb, g.util_pct)
                       for g in self.gpus[: proto.MAX_GPUS]),
            labels=self.labels, uptime_s=round(time.monotonic() - self.started, 1),
            hash_rate=round(self.hash_rate, 1), exec_allowed=cfg.allow_exec, running=self.lent(), lending=lending,
        )

    def slots(self) -> tuple[int, int]:
        """(chunks this node would run for peers now, MiB it offers): the owner's load comes first."""
        status = self.current()
        busy = self.cores * status.cpu_pct / 100.0
        if self.stress.active:  # the owner asked for these cores: count them before the next sample shows it
            busy = max(busy, float(min(self.stress.cores, self.cores)))
        # Our own lent chunks are in the measured load too (even one that just ended): not the owner's.
        owner_busy = max(0.0, busy - max(self.lent(), self.lent_in_sample))
        headroom = self.cores * (100 - self.cfg.reserve_pct) / 100.0 - owner_busy
        slots = min(int(status.offered_cores + 0.5), int(headroom + 0.5))
        return max(0, slots), status.offered_mem_mb

    def views(self, table: PeerTable) -> list[NodeView]:
        """This node and every live peer, as routing sees them."""
        own = self.current()
        # Routing compares every node by mem_offer_mb and MemAvailable less the reserve; power and lending
        # hours limit what peers get, not the owner's own jobs.
        own_mem = int(max(0.0, min(float(self.cfg.mem_offer_mb),
                                   own.mem_avail_mb - own.mem_total_mb * self.cfg.reserve_pct / 100.0)))
        # The owner's own jobs may use every core the owner's load leaves free: the measured load less
        # the chunks this node runs (its peers' and its own, which the sample shows too), or what
        # `vesta stress` asked for before any sample shows it.
        owner = max(0.0, own.cores * own.cpu_pct / 100.0 - max(self.lent(), self.lent_in_sample)
                    - max(self.own(), self.own_in_sample))
        if self.stress.active:
            owner = max(owner, float(min(self.stress.cores, self.cores)))
        owner_pct = 100.0 * owner / own.cores if own.cores else 0.0
        out = [NodeView(self.fingerprint, self.cfg.name, True, own.cores, round(owner_pct, 1),
                        max(0.0, own.cores - owner), own.hash_rate, own_mem, own.exec_allowed,
                        offered_cores=own.offered_cores, labels=tuple(own.labels))]
        for p in table.alive():
            s = p.status
            out.append(NodeView(p.fingerprint, self.shown(p.name, p.fingerprint), False, s.cores, s.cpu_pct,
                                s.spare_cores, s.hash_rate,
                                s.offered_mem_mb, s.exec_allowed, p.last_seen, running=s.running,
                                offered_cores=s.offered_cores, lending=s.lending, labels=tuple(s.labels)))
        return out


def node_labels(owner: tuple[str, ...], cores: int, gpu: bool) -> tuple[str, ...]:
    """What a node advertises for jobs to ``--need``: its owner's ``-label`` tags, then the automatic ones
    (``arch:x86_64``, ``os:linux``, ``cores:8``, ``python:3.11``, ``gpu`` where one is found)."""
    auto = [f"arch:{platform.machine() or 'unknown'}", f"os:{platform.system().lower() or 'unknown'}",
            f"cores:{cores}", f"python:{sys.version_info.major}.{sys.version_info.minor}", *(["gpu"] if gpu else [])]
    labels = list(dict.fromkeys([*owner, *(a[: proto.MAX_LABEL] for a in auto)]))
    return tuple(labels[: proto.MAX_LABELS])
