"""Routing decisions: which nodes get a job, in how many chunks, in what order. Pure: no I/O.

* **Slots.** A chunk runs on one core. What the submitter and the exec queue place by is
  ``placement.Placer``: every node's slots, this one's included, held by each chunk from its placement to
  its end. ``slots``, ``Debits`` and ``choose`` here are the older beacon-only rule (a peer holds
  ``round(spare)`` chunks less those placed since its beacon; this node always has one): the daemon no
  longer uses them (their unit tests still pin them; removing them is a change of its own). ``score``,
  ``cut``, ``cut_size_slots`` and ``fits_memory`` are what placement uses from here.
* **Spill.** When this node's CPU is above ``spill_cpu_pct`` it takes no
  chunk of a new job while any peer can; it is still the last resort.
* **Speed.** Nodes are ordered by slots x measured per-core hash rate, so a
  Pi and a desktop get work in proportion to what they really do.
* **Split.** A job of at least ``SPLIT_MIN_UNITS`` units (``SPLIT_MIN_UNITS`` x
  2^20 iterations, about a second of one desktop core) with two or more viable
  nodes is split; it is cut into ``CHUNKS_PER_SLOT`` chunks per slot, handed out
  as nodes finish, so a slow node does not become the straggler. Smaller jobs
  go to the single best node (still one chunk per free core there).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

MAX_UNITS_PER_CHUNK = 1 << 16   # the protocol's limit per offer (proto.MAX_UNITS_PER_CHUNK)
SPLIT_MIN_UNITS = 16          # 16 x 2^20 iterations = 16.8M (about 0.7 s of one 1.5 GB/s core)
CHUNKS_PER_SLOT = 3
DEBIT_TTL = 30.0              # seconds; a debit outlives a missing beacon only this long


@dataclass(frozen=True, slots=True)
class NodeView:
    """What routing knows about one node (this one included)."""

    fingerprint: str
    name: str
    local: bool
    cores: int
    cpu_pct: float
    spare_cores: float
    hash_rate: float          # iterations per second of one core; 0 = unknown
    offered_mem_mb: int
    exec_allowed: bool
    last_seen: float = 0.0    # monotonic time of its beacon (peers)
    running: int = 0          # chunks it was running for peers at that beacon (peers)
    offered_cores: float = 0.0
    lending: bool = True      # inside its lending hours
    labels: tuple[str, ...] = ()


@dataclass
class Debits:
    """Chunks placed on peers since their last beacon."""

    clock: Callable[[], float] = time.monotonic
    _placed: dict[str, list[float]] = field(default_factory=dict)

    def place(self, fingerprint: str) -> None:
        self._placed.setdefault(fingerprint, []).append(self.clock())

    def release(self, fingerprint: str) -> None:
        """A placed chunk was refused or never started: give its slot back."""
        times = self._placed.get(fingerprint)
        if times:
            times.pop()

    def count(self, fingerprint: str, since: float) -> int:
        now = self.clock()
        times = [t for t in self._placed.get(fingerprint, []) if t > since and now - t < DEBIT_TTL]
        self._placed[fingerprint] = times
        return len(times)


def slots(node: NodeView, debits: Debits | None = None, spill_cpu_pct: float = 100.0) -> int:
    """How many one-core chunks this node can take now."""
    if node.local:
        if node.cpu_pct > spill_cpu_pct:
            return 0
        free = node.cores * (1 - node.cpu_pct / 100.0)
        return max(1, int(free + 0.5))
    spare = node.spare_cores - (debits.count(node.fingerprint, node.last_seen) if debits else 0)
    return max(0, int(spare + 0.5))


def score(node: NodeView, n_slots: int) -> float:
    return n_slots * (node.hash_rate or 1.0)


@dataclass(frozen=True, slots=True)
class Choice:
    node: NodeView
    slots: int


def choose(nodes: Sequence[NodeView], *, spill_cpu_pct: float, units: int = 1, split: bool = True,
           debits: Debits | None = None, exec_job: bool = False, fallback: bool = True) -> list[Choice]:
    """The nodes a job should use, best first; the local node is the last resort when spilling
    (unless ``fallback`` is false: then only nodes with a free slot now)."""
    usable = [n for n in nodes if n.exec_allowed or not exec_job]
    choices = [Choice(n, slots(n, debits, spill_cpu_pct)) for n in usable]
    ranked = sorted((c for c in choices if c.slots > 0), key=lambda c: -score(c.node, c.slots))
    if not ranked and fallback:
        local = [Choice(n, 1) for n in usable if n.local]
        return local  # everyone is busy: run it at home rather than not at all
    if not split or units < SPLIT_MIN_UNITS:
        return ranked[:1]
    return ranked


def cut_size_slots(nodes: Sequence[NodeView], chosen_slots: int) -> int:
    """Slots to size chunks for: every core that could join the job, not only those free right now,
    so a peer that frees up during the job still finds chunks to take."""
    return max(chosen_slots, sum(max(1, n.cores) for n in nodes))


def cut(units: int, total_slots: int) -> list[tuple[int, int]]:
    """Chunks (first unit, count): about CHUNKS_PER_SLOT per slot, never empty."""
    size = min(MAX_UNITS_PER_CHUNK, max(1, -(-units // max(1, total_slots * CHUNKS_PER_SLOT))))
    return [(start, min(size, units - start)) for start in range(0, units, size)]


def fits_memory(nodes: Sequence[NodeView], mib: int) -> list[NodeView]:
    """Nodes whose offered memory holds ``mib``, roomiest first."""
    return sorted((n for n in nodes if n.offered_mem_mb >= mib), key=lambda n: -n.offered_mem_mb)
