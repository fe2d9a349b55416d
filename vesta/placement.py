"""Placement that counts work in flight: which node gets a job's next chunk, and why not the others. Pure.

No I/O and no clock of its own (``Placer.clock`` is injected): the asyncio code (``submitter``, the exec
queue) feeds it events and does what it says.

* **Slots, this node included.** Every node has slots. A peer's are what its latest beacon says it may
  lend in all (its spare cores plus the chunks it was already running, never more than it offers); this
  node's own jobs may use every core its owner's load leaves free (at least one). A chunk placed anywhere
  holds a slot from the moment it is placed until it ends (``take``/``release``), not until the next
  beacon, so a burst of submissions spreads over the federation at once and no more chunks run than
  there are slots: the rest wait. Chunks other submitters run on a peer are counted from its beacon
  (what it ran then, less ours). A peer that refused for capacity is full until its next beacon, or
  ``FULL_MAX_S`` by the injected clock when its beacons are slow.
* **Events.** ``update(views)`` (a beacon, a new node, one lost: capacity may have appeared or gone),
  ``take``/``release`` (a chunk placed; a result, a refusal, a lost node, a dropped link), and per job
  ``JobPlan.ended``. Each says whether something may now be placed.
* **Reasons.** For every node and job, ``assess`` says whether the node may run it and, if not, why:
  busy with N of M slots, exec off, not in the allowlist, ledger cap, outside lending hours, memory,
  unknown label, spill threshold (``Row``). A job records them (``vesta show``: "why not there?").
* **One job** is a ``JobPlan``: its chunks, where each runs, which nodes left it and why. It says what
  to start next, and a job fails only when no node can take it.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from vesta import autopilot
from vesta.autopilot import NodeView

FULL_MAX_S = 5.0   # a node that refused for capacity is full until its next beacon, or this long at most
# Refusals that may not last: a node that gave one may take the job later.
PASSING = frozenset({"capacity", "hours", "ledger", "busy"})
# What a host's refusal word means in the "why not there?" table.
REFUSED_AS = {"exec_disabled": "exec off", "not_allowed": "not in the allowlist", "ledger": "ledger cap",
              "hours": "outside lending hours", "memory": "memory", "capacity": "busy", "busy": "busy"}


@dataclass(frozen=True, slots=True)
class Want:
    """What a job asks of a node: its kind, a forced node (``on``), memory, labels."""

    kind: str = "cpu"
    on: str | None = None
    mem_mib: int = 0
    need: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Row:
    """One node in a job's placement decision."""

    node: str
    fingerprint: str
    chosen: bool
    why: str          # why not chosen ("" when chosen)
    used: int         # slots in use there when decided
    slots: int        # its slots

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "fingerprint": self.fingerprint, "chosen": self.chosen, "why": self.why,
                "used": self.used, "slots": self.slots}


def matches(view: NodeView, on: str) -> bool:
    """Whether ``--on on`` names this node (its name, or a fingerprint prefix of 8 or more characters)."""
    return view.name == on or (len(on) >= 8 and view.fingerprint.startswith(on))


@dataclass
class Placer:
    """The slots of every node and what is in flight on them; shared by every job this node submits."""

    spill_cpu_pct: float = 100.0
    clock: Callable[[], float] = time.monotonic
    views: dict[str, NodeView] = field(default_factory=dict)
    used: Counter[str] = field(default_factory=Counter)       # our chunks in flight, per fingerprint
    others: dict[str, int] = field(default_factory=dict)      # other submitters' chunks there at its beacon
    full: dict[str, tuple[float, float]] = field(default_factory=dict)   # refused for capacity: (beacon, when)
    names: set[str] = field(default_factory=set)              # every node name seen
    fingerprints: set[str] = field(default_factory=set)

    def update(self, views: Iterable[NodeView]) -> bool:
        """A new picture of the federation; True when some node has more free slots than before."""
        before = {fp: self.free(fp) for fp in self.views}
        fresh = {v.fingerprint: v for v in views}
        for fp, v in fresh.items():
            old = self.views.get(fp)
            if not v.local and (old is None or old.last_seen != v.last_seen):
                self.others[fp] = max(0, v.running - self.used[fp])   # its beacon counted ours too
                self.full.pop(fp, None)
        for fp in set(self.others) - set(fresh):
            self.others.pop(fp, None)
            self.full.pop(fp, None)
        self.views = fresh
        self.names.update(v.name for v in fresh.values())
        self.fingerprints.update(fresh)
        return any(self.free(fp) > before.get(fp, 0) for fp in fresh)

    def known(self, on: str) -> bool:
        """Whether any node ever seen goes by ``on`` (an unknown ``--on`` name is refused at once)."""
        return on in self.names or (len(on) >= 8 and any(fp.startswith(on) for fp in self.fingerprints))

    def slots(self, fp: str) -> int:
        v = self.views.get(fp)
        if v is None:
            return 0
        if v.local:   # the owner's own jobs: every core the owner's load leaves free
            return max(1, int(v.spare_cores + 0.5))
        if not v.lending:
            return 0
        return max(0, int(min(v.offered_cores, v.spare_cores + v.running) + 0.5))

    def in_use(self, fp: str) -> int:
        return self.used[fp] + self.others.get(fp, 0)

    def free(self, fp: str) -> int:
        v = self.views.get(fp)
        full = self.full.get(fp)
        if v is None or (full is not None and full[0] == v.last_seen and self.clock() - full[1] < FULL_MAX_S):
            return 0
        return max(0, self.slots(fp) - self.in_use(fp))

    def take(self, fp: str) -> None:
        """A chunk was placed there: it holds a slot until ``release``."""
        self.used[fp] += 1

    def release(self, fp: str, refused: str = "") -> None:
        """A chunk placed there ended (result, refusal, node lost, link dropped)."""
        if self.used[fp] > 0:
            self.used[fp] -= 1
        v = self.views.get(fp)
        if refused == "capacity" and v is not None and not v.local:
            self.full[fp] = (v.last_seen, self.clock())

    def spilling(self) -> bool:
        return any(v.local and v.cpu_pct > self.spill_cpu_pct for v in self.views.values())

    def why_not(self, v: NodeView, want: Want) -> str:
        """Why this node may never take the job as things stand ("" when it may)."""
        if want.on is not None:   # a forced node decides for itself (its refusal says why)
            return "" if matches(v, want.on) else f"not the --on node ({want.on})"
        if want.kind == "exec" and not v.exec_allowed:
            return "exec off"
        missing = [label for label in want.need if label not in v.labels]
        if missing:
            return f"unknown label {', '.join(missing)} (has {', '.join(v.labels) or 'no labels'})"
        if want.kind == "mem" and v.offered_mem_mb < want.mem_mib:
            return f"memory: offers {v.offered_mem_mb} MiB, {want.mem_mib} MiB asked"
        if not v.local and not v.lending:
            return "outside lending hours"
        return ""

    def busy(self, fp: str) -> str:
        return f"busy with {self.in_use(fp)} of {self.slots(fp)} slots"

    def ranked(self, nodes: Sequence[NodeView]) -> list[NodeView]:
        """Best first: most free slots x per-core speed; this node last while its owner's load is past
        the spill threshold."""
        spill = self.spilling()
        return sorted(nodes, key=lambda v: (v.local and spill, -autopilot.score(v, self.free(v.fingerprint))))


@dataclass(frozen=True, slots=True)
class Start:
    """Start chunk ``chunk`` (attempt ``attempt``) on ``node``; ``token`` names this run in ``ended``."""

    token: int
    chunk: int
    node: NodeView
    attempt: int


@dataclass
class JobPlan:
    """One job's chunks and nodes. ``patient``: a job that finds every node full waits for a slot (cpu);
    otherwise it is offered to the nodes in turn as before (exec, mem: the host decides). ``pinned``: the
    job stays on the first node it gets (no split) while that node keeps it."""

    placer: Placer
    want: Want
    chunks: list[tuple[int, int]]
    patient: bool = True
    pinned: bool = False
    one_at_a_time: bool = False
    max_attempts: int = 3
    cut: Callable[[int], list[tuple[int, int]]] | None = None   # pinned: the chunks for the slots it got
    queue: deque[int] = field(default_factory=deque)
    running: dict[int, tuple[int, str]] = field(default_factory=dict)   # token -> (chunk, fingerprint)
    done: dict[int, int] = field(default_factory=dict)                  # chunk -> token that completed it
    left: dict[str, str] = field(default_factory=dict)                  # fingerprint -> why it left the job
    refusals: dict[str, str] = field(default_factory=dict)              # fingerprint -> the refusal's word
    passing: set[str] = field(default_factory=set)                      # nodes whose "no" may not last
    attempts: Counter[int] = field(default_factory=Counter)
    lost: Counter[int] = field(default_factory=Counter)
    chosen: dict[str, NodeView] = field(default_factory=dict)         # nodes it was offered to
    ran: set[str] = field(default_factory=set)                          # nodes that completed a chunk
    decided: list[Row] = field(default_factory=list)
    home: str | None = None            # pinned: the node it got
    _tokens: int = 0

    def __post_init__(self) -> None:
        self.queue.extend(range(len(self.chunks)))

    def candidates(self) -> list[NodeView]:
        """Nodes that may take this job's chunks, best first."""
        nodes = [v for v in self.placer.views.values()
                 if v.fingerprint not in self.left and not self.placer.why_not(v, self.want)]
        if self.home is not None and self.home not in self.placer.views and not any(
                fp == self.home for _, fp in self.running.values()):
            self.home = None   # its node is lost: the job goes wherever a slot is
        if self.home is not None:
            nodes = [v for v in nodes if v.fingerprint == self.home]
        return self.placer.ranked(nodes)

    def _local_last(self, v: NodeView, nodes: list[NodeView]) -> bool:
        """This node over its spill threshold takes none of the job while another node of the job has slots
        (the job waits for them: new work goes to peers); it is the last resort when none has."""
        return (v.local and self.placer.spilling()
                and any(not n.local and self.placer.slots(n.fingerprint) > 0 for n in nodes))

    def next(self) -> list[Start]:
        """The chunks to start now, each on a node with a free slot (they hold it: ``placer.take``)."""
        out: list[Start] = []
        nodes = self.candidates()
        for v in nodes:
            if not self.queue or (self.one_at_a_time and (self.running or out)):
                break
            if self._local_last(v, nodes) or (self.home is not None and v.fingerprint != self.home):
                continue
            free = self.placer.free(v.fingerprint)
            if self.home is None and self.pinned and free > 0:
                self._pin(v, free)
            while self.queue and free > 0 and not (self.one_at_a_time and (self.running or out)):
                out.append(self._start(v))
                free -= 1
        # Impatient, or every node left offers no slot at all (a forced --on node that lends nothing): the
        # node decides, as before slots were counted.
        if (not out and not self.running and self.queue and nodes
                and (not self.patient or all(self.placer.slots(v.fingerprint) == 0 for v in nodes))):
            forced = next((v for v in nodes if not self._local_last(v, nodes)), None) or (nodes[0] if nodes else None)
            if forced is not None:
                if self.pinned and self.home is None:
                    self._pin(forced, 1)
                out.append(self._start(forced))
        if out and not self.decided:
            self.decided = self.rows(nodes)
        return out

    def _pin(self, v: NodeView, free: int) -> None:
        self.home = v.fingerprint
        if self.cut is not None and not self.attempts:
            self.chunks = self.cut(free)
            self.queue = deque(range(len(self.chunks)))

    def _start(self, v: NodeView) -> Start:
        chunk = self.queue.popleft()
        self._tokens += 1
        self.attempts[chunk] += 1
        self.running[self._tokens] = (chunk, v.fingerprint)
        self.placer.take(v.fingerprint)
        self.chosen.setdefault(v.fingerprint, v)
        return Start(self._tokens, chunk, v, self.attempts[chunk])

    def ended(self, token: int, *, ok: bool, refused: str = "", error: str = "", started: bool = False) -> str:
        """A run ended: "done" (its chunk is complete), "moved" (back in the queue, that node left the job)
        or "failed" (a lost chunk ran ``max_attempts`` times: the job fails)."""
        chunk, fp = self.running.pop(token)
        self.placer.release(fp, refused)
        if ok:
            assert chunk not in self.done, f"chunk {chunk} completed twice"
            self.done[chunk] = token
            self.ran.add(fp)
            return "done"
        self.left[fp] = refused and f"refused ({refused}: {error})" or error
        if refused:
            self.refusals[fp] = refused
        if fp == self.home:   # its node left: the job goes wherever a slot is (this node is the last resort)
            self.home = None
        if refused in PASSING or not (started or refused):
            self.passing.add(fp)
        if started:   # a run that began counts as an attempt; a refusal does not
            self.lost[chunk] += 1
            if self.lost[chunk] >= self.max_attempts:
                return "failed"
        self.queue.appendleft(chunk)
        return "moved"

    def complete(self) -> bool:
        return not self.queue and not self.running

    def stuck(self) -> str:
        """Nothing runs and nothing could start: "wait" (a node of the job may free a slot) or "fail" (no
        node can take it)."""
        return "wait" if self.candidates() else "fail"

    def rows(self, nodes: list[NodeView] | None = None) -> list[Row]:
        """For every node now: chosen (it has the job's work), or why not (``nodes``: the candidates, when
        the caller has them)."""
        out = []
        nodes = self.candidates() if nodes is None else nodes
        for v in sorted(self.placer.views.values(), key=lambda v: (not v.local, v.name)):
            fp = v.fingerprint
            chosen = fp in self.ran or (fp in self.chosen and fp not in self.left)
            why = ("" if chosen else self._left_why(fp) or self.placer.why_not(v, self.want)
                   or (f"spill threshold (owner's cpu {v.cpu_pct:.0f}% > {self.placer.spill_cpu_pct:.0f}%)"
                       if self._local_last(v, nodes) else "")
                   or (self.placer.busy(fp) if self.placer.free(fp) <= 0 else "")
                   or ("not its node (no split)" if self.home is not None else "ranked lower"))
            out.append(Row(v.name, fp, chosen, why, self.placer.in_use(fp), self.placer.slots(fp)))
        return out

    def _left_why(self, fp: str) -> str:
        """Why a node left the job, led by what its refusal means ("ledger cap: refused (ledger: ...)")."""
        why = self.left.get(fp, "")
        word = REFUSED_AS.get(self.refusals.get(fp, ""))
        return f"{word}: {why}" if why and word else why

    def decision(self) -> list[Row]:
        """The job's placement decision as it stands: the nodes that got its work, and for the others why
        not: why they left it, else what kept them out when it was first placed. Slots are as they were
        then (as they are now for a node that appeared later, or a job never placed)."""
        if (self.decided and not self.left and len(self.chosen) == sum(r.chosen for r in self.decided)
                and all(r.chosen == (r.fingerprint in self.chosen) for r in self.decided)):
            return self.decided   # as decided: the same nodes got the work and none left
        then = {r.fingerprint: r for r in self.decided}
        out = []
        for row in self.rows():
            first = then.get(row.fingerprint)
            if first is None:
                out.append(row)
                continue
            keep = row.chosen or row.fingerprint in self.left or first.chosen
            out.append(replace(first, chosen=row.chosen, why=row.why if keep else first.why))
        return out
