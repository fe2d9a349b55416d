"""Routing decisions: which nodes get a job, in how many chunks, in what order. Pure: no I/O.

* **Slots.** A chunk runs on one core. How many a node has, and which are in use, is
  ``placement.Placer``'s (every node's slots, this one's included, held by each chunk from its placement to
  its end); the rules below are what it uses from here.
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

from collections.abc import Sequence
from dataclasses import dataclass

MAX_UNITS_PER_CHUNK = 1 << 16   # the protocol's limit per offer (proto.MAX_UNITS_PER_CHUNK)
SPLIT_MIN_UNITS = 16          # 16 x 2^20 iterations = 16.8M (about 0.7 s of one 1.5 GB/s core)
CHUNKS_PER_SLOT = 3


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


def score(node: NodeView, n_slots: int) -> float:
    """Work a node gets done with ``n_slots`` free: its slots x its measured per-core speed."""
    return n_slots * (node.hash_rate or 1.0)


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
