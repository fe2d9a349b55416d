"""A simulated network for the real membership code: many nodes, one process, a simulated clock.

``scripts/simulate`` runs it. Every node is a real ``membership.Membership`` whose clock is the
simulator's; every datagram goes through the real codec (``encode_packet`` / ``decode_packet``) and its
size is that of the sealed datagram the daemon would send (the body signed with Ed25519 and sealed with
AES-256-GCM, the sender's public key beside it). A sample of datagrams is really sealed and opened, to
measure what the crypto costs per datagram. The network has latency (within a subnet and across), loss
(each datagram independently), broadcast domains (a ``HELLO`` reaches every node of its subnet) and
partitions between subnets that start and heal. Full-state syncs travel as streams: reliable, counted in
bytes, cut by a partition.

What it reports (``Report``): convergence time after the last node started, detection times of killed
nodes (first suspicion anywhere, suspected everywhere, gone from every table), false suspicions of live
nodes, datagrams and bytes per node per second while idle, the largest datagram, the CPU the real code
spent per node per simulated second (membership code and codec measured, crypto from the sample), and
how old the load a job is placed on is when the real ``placement.Placer`` ranks members by their gossiped
load and the best two are asked directly (power of two choices).
"""

from __future__ import annotations

import functools
import heapq
import math
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack
from nacl.signing import SigningKey

from vesta.autopilot import NodeView
from vesta.crypto import FederationKeys, fingerprint, open_member_packet, seal_member_packet, verify_signature
from vesta.membership import (
    Addr,
    MemberConfig,
    Membership,
    Send,
    State,
    Sync,
    decode_packet,
    decode_state,
    encode_packet,
    encode_state,
)
from vesta.placement import Placer

PORT = 7778
MAX_DATAGRAM = 1400        # the goal: no datagram over this, in bytes
_SIG = bytes(64)
_PUB = bytes(32)


def sealed_size(body: bytes) -> int:
    """The size of the datagram the daemon sends for ``body`` (header, nonce, tag, key, signature)."""
    return 2 + 12 + 16 + len(msgpack.packb([msgpack.packb([_PUB, body], use_bin_type=True), _SIG],
                                           use_bin_type=True))


@dataclass(frozen=True)
class Scenario:
    """One simulated run. Times are simulated seconds."""

    name: str = "lan"
    subnets: int = 1
    per_subnet: int = 50
    loss: float = 0.01               # of each datagram
    lan_latency: tuple[float, float] = (0.0002, 0.001)
    wan_latency: tuple[float, float] = (0.002, 0.006)
    start_spread: float = 5.0        # nodes start at random times within this
    settle: float = 20.0             # idle time after convergence before the first kill
    idle: float = 60.0               # the idle window measured for traffic and false suspicions
    kills: int = 3                   # nodes SIGKILLed during the idle window (spaced evenly)
    leaves: int = 1                  # nodes that leave gracefully during it
    partition: tuple[float, float] | None = None   # (from, to), seconds into the idle window: subnet 0 cut off
    seeds_per_subnet: int = 1        # the first nodes of every subnet are the seeds of all the others
    crypto_sample: int = 200         # one datagram in this many is really sealed and opened
    seed: int = 1
    cfg: MemberConfig = field(default_factory=MemberConfig)


@dataclass
class Node:
    i: int
    subnet: int
    addr: Addr
    m: Membership
    up: bool = True
    wake: float = math.inf


@dataclass
class Report:
    nodes: int
    converged_s: float | None          # after the last start; None: never within the run
    detect_first_s: list[float]        # per killed node: the first suspicion anywhere
    detect_all_s: list[float]          # per killed node: suspected (or gone) at every live node
    gone_all_s: list[float]            # per killed node: gone from every live node's table
    left_all_s: list[float]            # per leaving node: gone from every table
    healed_s: float | None             # after a partition heals: everyone knows everyone again
    false_suspicions: int
    packets_per_node_s: float          # datagrams sent per node per second, idle
    bytes_per_node_s: float            # datagram and stream bytes sent per node per second, idle
    sync_bytes_per_node_s: float
    max_datagram: int
    cpu_code_pct: float                # % of one core per node: membership code and codec
    cpu_crypto_pct: float              # % of one core per node: sealing and opening (sampled)
    load_age_gossip_p50: float
    load_age_gossip_p99: float
    load_age_placed_max: float         # placement asks the best two directly: the age it places on
    wall_s: float
    sim_s: float
    counters: Counter[str] = field(default_factory=Counter)

    def goals(self) -> list[tuple[str, str, bool]]:
        """(what, figure, met) against the goal for a lab: issue #21."""
        def worst(xs: list[float]) -> float:
            return max(xs) if xs else math.inf
        conv = self.converged_s if self.converged_s is not None else math.inf
        rows = [
            ("converged after the last start", f"{conv:.1f} s (goal <= 5 s)", conv <= 5.0),
            ("dead node first suspected", f"{worst(self.detect_first_s):.1f} s (goal <= 5 s)",
             worst(self.detect_first_s) <= 5.0),
            ("dead node gone from every table", f"{worst(self.gone_all_s):.1f} s (goal <= 15 s)",
             worst(self.gone_all_s) <= 15.0),
            ("false suspicions of live nodes", f"{self.false_suspicions} (goal 0)", self.false_suspicions == 0),
            ("CPU per node (code + crypto)", f"{self.cpu_code_pct + self.cpu_crypto_pct:.3f} % (goal <= 1 %)",
             self.cpu_code_pct + self.cpu_crypto_pct <= 1.0),
            ("traffic per node, idle", f"{self.bytes_per_node_s / 1000:.2f} kB/s (goal <= 10 kB/s)",
             self.bytes_per_node_s <= 10_000),
            ("largest datagram", f"{self.max_datagram} B (goal <= {MAX_DATAGRAM} B)",
             self.max_datagram <= MAX_DATAGRAM),
            ("load age when placed", f"{self.load_age_placed_max:.3f} s (goal <= 2 s)",
             self.load_age_placed_max <= 2.0),
        ]
        if self.left_all_s:
            rows.append(("leaver gone from every table", f"{worst(self.left_all_s):.1f} s (goal <= 5 s)",
                         worst(self.left_all_s) <= 5.0))
        return rows

    def passed(self) -> bool:
        return all(ok for _, _, ok in self.goals())

    def lines(self) -> list[str]:
        out = [f"{self.nodes} nodes: {self.sim_s:.0f} simulated s in {self.wall_s:.0f} s",
               f"  datagrams {self.packets_per_node_s:.1f}/s per node idle, syncs {self.sync_bytes_per_node_s:.0f} B/s,"
               f" suspected everywhere after {max(self.detect_all_s, default=math.nan):.1f} s,"
               f" gossiped load p50 {self.load_age_gossip_p50:.1f} s p99 {self.load_age_gossip_p99:.1f} s,"
               f" false suspicions while starting {self.counters['false_suspicions_starting']}"]
        if self.healed_s is not None:
            out.append(f"  partition healed: everyone knows everyone {self.healed_s:.1f} s after")
        out += [f"  {'PASS' if ok else 'FAIL'}  {what}: {figure}" for what, figure, ok in self.goals()]
        return out


class Sim:
    """The event loop: a heap of (time, order, action)."""

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.rng = random.Random(sc.seed)
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = 0
        self.nodes: list[Node] = []
        self.by_addr: dict[Addr, Node] = {}
        self.by_id: dict[str, Node] = {}
        self.cut = False                     # subnet 0 partitioned from the rest
        self.cut_ever = False                # suspicions across a partition are not false ones
        self.counting = False                # inside the idle window
        self.sent_packets: Counter[int] = Counter()
        self.sent_bytes: Counter[int] = Counter()
        self.sync_bytes = 0
        self.max_datagram = 0
        self.cpu_ns = 0
        self.crypto_ns = 0
        self.crypto_n = 0
        self.datagrams = 0
        self.dead_ids: set[str] = set()
        self.false_suspicions = 0
        self.suspected: dict[str, list[float]] = {}
        self.counters: Counter[str] = Counter()
        self._keys = FederationKeys(os.urandom(32), os.urandom(32), "00000000")
        self._signer = SigningKey.generate()
        self._pub = bytes(self._signer.verify_key)
        self._fp = fingerprint(self._pub)
        self._build()

    # ------------------------------------------------------------ set-up

    def _build(self) -> None:
        sc = self.sc
        seeds = [(f"10.{s}.0.{k + 1}", PORT) for s in range(sc.subnets) for k in range(sc.seeds_per_subnet)]
        for s in range(sc.subnets):
            for k in range(sc.per_subnet):
                i = len(self.nodes)
                addr = (f"10.{s}.{k // 250}.{k % 250 + 1}", PORT)
                node_id = f"{self.rng.getrandbits(128):032x}"
                own = tuple(x for x in seeds if x[0].startswith(f"10.{s}.") is False) if sc.subnets > 1 else ()
                m = Membership(node_id, addr, sc.cfg, clock=lambda: self.now, incarnation=1,
                               seeds=own, rng=random.Random(self.rng.random()))
                node = Node(i, s, addr, m, up=False)
                self.nodes.append(node)
                self.by_addr[addr] = node
                self.by_id[node_id] = node

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._order += 1
        heapq.heappush(self._heap, (t, self._order, fn))

    def run_until(self, t_end: float, check: Callable[[], bool] | None = None, every: float = 0.1) -> float | None:
        """Process events until ``t_end``; with ``check``, stop at the first sample where it holds."""
        next_check = self.now
        while self._heap and self._heap[0][0] <= t_end:
            t, _, fn = heapq.heappop(self._heap)
            if check is not None:
                while next_check <= t:
                    self.now = next_check
                    if check():
                        heapq.heappush(self._heap, (t, 0, fn))
                        return next_check
                    next_check += every
            self.now = t
            fn()
        self.now = t_end
        if check is not None and check():
            return t_end
        return None

    # ------------------------------------------------------------ nodes

    def _timed(self, fn: Callable[[], Any]) -> Any:
        t0 = time.thread_time_ns()
        try:
            return fn()
        finally:
            self.cpu_ns += time.thread_time_ns() - t0

    def start(self, node: Node) -> None:
        node.up = True
        node.m.set_load(self.rng.uniform(0, 8), 4000, 0)
        self._do(node, self._timed(node.m.start))
        self._schedule(node)
        self._refresh_load(node)

    def _refresh_load(self, node: Node) -> None:
        if not node.up:
            return
        node.m.set_load(self.rng.uniform(0, 8), 4000, self.rng.randrange(4))
        self.at(self.now + 1.0, lambda: self._refresh_load(node))

    def kill(self, node: Node) -> None:
        node.up = False
        self.dead_ids.add(node.m.me)

    def leave(self, node: Node) -> None:
        self._do(node, self._timed(node.m.leave))
        node.up = False
        self.dead_ids.add(node.m.me)

    def _schedule(self, node: Node) -> None:
        t = node.m.next_wakeup()
        if t < node.wake:
            w = node.wake = max(t, self.now)
            self.at(w, lambda: self._wake(node, w))

    def _wake(self, node: Node, w: float) -> None:
        if not node.up or node.wake != w:   # a stale wake-up: an earlier one was scheduled since
            return
        node.wake = math.inf
        self._do(node, self._timed(node.m.tick))
        self._schedule(node)

    def _events(self, node: Node) -> None:
        for e in node.m.drain_events():
            if e.event == "suspect":
                self.suspected.setdefault(e.node, []).append(self.now)
                if e.node not in self.dead_ids and not self.cut_ever:
                    if self.counting:
                        self.false_suspicions += 1
                    else:
                        self.counters["false_suspicions_starting"] += 1

    def _do(self, node: Node, actions: list[Send | Sync]) -> None:
        self._events(node)
        for a in actions:
            if isinstance(a, Sync):
                self._sync(node, a.to)
            else:
                self._send(node, a)

    def _reachable(self, a: Node, b: Node) -> bool:
        return not (self.cut and (a.subnet == 0) != (b.subnet == 0))

    def _latency(self, a: Node, b: Node) -> float:
        lo, hi = self.sc.lan_latency if a.subnet == b.subnet else self.sc.wan_latency
        return self.rng.uniform(lo, hi)

    def _send(self, node: Node, a: Send) -> None:
        body = self._timed(lambda: encode_packet(a.packet))
        size = sealed_size(body)
        self.datagrams += 1
        self.max_datagram = max(self.max_datagram, size)
        if self.datagrams % self.sc.crypto_sample == 0:
            self._measure_crypto(body)
        if self.counting:
            self.sent_packets[node.i] += 1
            self.sent_bytes[node.i] += size
        if a.to is None:     # the LAN broadcast: every node of the subnet, each with its own loss
            targets = [n for n in self.nodes if n.subnet == node.subnet and n is not node and n.up
                       and self._reachable(node, n) and self.rng.random() >= self.sc.loss]
            # One event for all of them (a LAN delivers a broadcast to all at about the same time), and the
            # body decoded once, its measured cost counted for every receiver.
            self.at(self.now + self._latency(node, node), functools.partial(self._broadcast, targets, body, node.addr))
            return
        else:
            dst = self.by_addr.get(a.to)
            targets = [] if dst is None else [dst]
        for dst in targets:
            if not self._reachable(node, dst) or self.rng.random() < self.sc.loss:
                continue
            self.at(self.now + self._latency(node, dst), functools.partial(self._deliver, dst, body, node.addr))

    def _broadcast(self, dsts: list[Node], body: bytes, src: Addr) -> None:
        t0 = time.thread_time_ns()
        packet = decode_packet(body)
        self.cpu_ns += (time.thread_time_ns() - t0) * len(dsts)
        for dst in dsts:
            if dst.up:
                self._do(dst, self._timed(functools.partial(dst.m.receive, packet, src)))
                self._schedule(dst)

    def _deliver(self, dst: Node, body: bytes, src: Addr) -> None:
        if not dst.up:
            return
        actions = self._timed(lambda: dst.m.receive(decode_packet(body), src))
        self._do(dst, actions)
        self._schedule(dst)

    def _sync(self, node: Node, to: Addr) -> None:
        dst = self.by_addr.get(to)
        if dst is None or not dst.up or not self._reachable(node, dst):
            return
        rtt = 2 * self._latency(node, dst)

        def exchange() -> None:
            if not (node.up and dst.up and self._reachable(node, dst)):
                return
            mine = self._timed(lambda: encode_state(node.m.local_state()))
            theirs = self._timed(lambda: encode_state(dst.m.local_state()))
            self._timed(lambda: dst.m.merge_state(decode_state(mine)))
            self._timed(lambda: node.m.merge_state(decode_state(theirs)))
            if self.counting:
                self.sent_bytes[node.i] += len(mine)
                self.sent_bytes[dst.i] += len(theirs)
                self.sync_bytes += len(mine) + len(theirs)
            self.counters["syncs"] += 1
            for n in (node, dst):
                self._events(n)
                self._schedule(n)
        self.at(self.now + 2 * rtt, exchange)   # connect, then both ways

    def _measure_crypto(self, body: bytes) -> None:
        t0 = time.thread_time_ns()
        datagram = seal_member_packet(self._keys, self._signer, body)
        pub, _, message, sig = open_member_packet(self._keys, datagram)
        if fingerprint(pub) == self._fp:
            verify_signature(pub, message, sig)
        self.crypto_ns += time.thread_time_ns() - t0
        if len(datagram) != sealed_size(body):
            raise AssertionError("sealed_size is not what seal_member_packet makes")
        self.crypto_n += 1

    # ------------------------------------------------------------ what every node knows

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.up]

    def converged(self) -> bool:
        live = self.live()
        want = len(live) - 1
        ids = [n.m.me for n in live]
        for n in live:
            if n.m.live_count() != want:
                return False
        for n in live:
            for i in ids:
                if i != n.m.me and n.m.state_of(i) not in (State.ALIVE, State.SUSPECT):
                    return False
        return True

    def everywhere(self, node_id: str, states: tuple[State | None, ...]) -> bool:
        return all(n.m.state_of(node_id) in states for n in self.live())


def run(sc: Scenario, progress: Callable[[str], None] = lambda s: None) -> Report:
    """Start every node, wait for convergence, then an idle window with kills, leaves and a partition."""
    wall0 = time.monotonic()
    sim = Sim(sc)
    order = list(sim.nodes)
    sim.rng.shuffle(order)
    # Seeds first (a lab's seeds are up before its desktops); the rest at random within start_spread.
    starts = {n.i: (0.0 if n.addr in {s for m in sim.nodes for s in m.m.seeds} else
                    sim.rng.uniform(0.1, sc.start_spread)) for n in order}
    last_start = max(starts.values())
    for n in order:
        sim.at(starts[n.i], functools.partial(sim.start, n))
    converged_at = sim.run_until(last_start + 60.0, lambda: sim.now >= last_start and sim.converged(), 0.1)
    converged = None if converged_at is None else converged_at - last_start
    progress(f"{len(sim.nodes)} nodes started; converged {converged} s after the last start "
             f"({time.monotonic() - wall0:.0f} s of wall time)")
    t0 = sim.now + sc.settle
    sim.run_until(t0)
    sim.counting = True
    cpu0, sim_cpu_start = sim.cpu_ns, sim.now
    sync0 = sim.sync_bytes
    # The idle window: kills and leaves spaced evenly, never the seeds, a partition if asked.
    seeds = {s for m in sim.nodes for s in m.m.seeds}
    victims = [n for n in sim.rng.sample(sim.nodes, len(sim.nodes)) if n.addr not in seeds][: sc.kills + sc.leaves]
    step = sc.idle / (len(victims) + 1)
    kill_at: dict[str, float] = {}
    leave_at: dict[str, float] = {}
    for k, v in enumerate(victims):
        when = t0 + step * (k + 0.5)
        if k < sc.kills:
            kill_at[v.m.me] = when
            sim.at(when, functools.partial(sim.kill, v))
        else:
            leave_at[v.m.me] = when
            sim.at(when, functools.partial(sim.leave, v))
    healed_at: float | None = None
    if sc.partition is not None:
        def cut() -> None:
            sim.cut = sim.cut_ever = True
        sim.at(t0 + sc.partition[0], cut)
        sim.at(t0 + sc.partition[1], lambda: setattr(sim, "cut", False))
    detect_all: dict[str, float] = {}
    gone_all: dict[str, float] = {}
    placed_ages: list[float] = []
    gossip_ages: list[float] = []
    t = sim.now
    while t < t0 + sc.idle:
        t = min(t0 + sc.idle, t + 0.1)
        sim.run_until(t)
        for node_id, when in {**kill_at, **leave_at}.items():
            if when > sim.now:
                continue
            if node_id not in detect_all and sim.everywhere(node_id, (State.SUSPECT, State.DEAD, State.LEFT, None)):
                detect_all[node_id] = sim.now - when
            if node_id not in gone_all and sim.everywhere(node_id, (State.DEAD, State.LEFT, None)):
                gone_all[node_id] = sim.now - when
        if sc.partition is not None and healed_at is None and sim.now >= t0 + sc.partition[1] \
                and sim.converged():
            healed_at = sim.now - (t0 + sc.partition[1])
        if round(sim.now * 10) % 10 == 0:
            placed_ages.append(_place(sim))
            gossip_ages += _gossip_ages(sim)
    elapsed = sim.now - sim_cpu_start
    n_nodes = len(sim.nodes)
    per_crypto = sim.crypto_ns / max(1, sim.crypto_n)
    idle_datagrams = sum(sim.sent_packets.values())
    crypto_pct = idle_datagrams * per_crypto / 1e9 / elapsed / n_nodes * 100
    gossip_ages.sort()
    counters: Counter[str] = Counter(sim.counters)
    for n in sim.nodes:
        counters.update(n.m.counters)
    return Report(
        nodes=n_nodes, converged_s=converged,
        detect_first_s=[min((t for t in sim.suspected.get(i, []) if t >= w), default=math.inf) - w
                        for i, w in kill_at.items()],
        detect_all_s=[detect_all.get(i, math.inf) for i in kill_at],
        gone_all_s=[gone_all.get(i, math.inf) for i in kill_at],
        left_all_s=[gone_all.get(i, math.inf) for i in leave_at],
        healed_s=healed_at if sc.partition is not None else None,
        false_suspicions=sim.false_suspicions,
        packets_per_node_s=idle_datagrams / elapsed / n_nodes,
        bytes_per_node_s=sum(sim.sent_bytes.values()) / elapsed / n_nodes,
        sync_bytes_per_node_s=(sim.sync_bytes - sync0) / elapsed / n_nodes,
        max_datagram=sim.max_datagram,
        cpu_code_pct=(sim.cpu_ns - cpu0) / 1e9 / elapsed / n_nodes * 100,
        cpu_crypto_pct=crypto_pct,
        load_age_gossip_p50=statistics.median(gossip_ages) if gossip_ages else math.inf,
        load_age_gossip_p99=gossip_ages[int(len(gossip_ages) * 0.99)] if gossip_ages else math.inf,
        load_age_placed_max=max(placed_ages, default=math.inf),
        wall_s=time.monotonic() - wall0, sim_s=sim.now, counters=counters,
    )


def _place(sim: Sim) -> float:
    """One job placed by a random live node, power of two choices: the real ``placement.Placer`` ranks eight
    members by their gossiped load, the best two are asked directly, and the better answer wins. Returns
    the age of the load the job is placed on: the direct answer's, half a round trip."""
    submitter = sim.rng.choice(sim.live())
    known = [m for m in submitter.m.alive() if m.load is not None and m.node in sim.by_id and sim.by_id[m.node].up]
    if len(known) < 2:
        return math.inf
    views = [NodeView(fingerprint=m.node, name=m.node[:8], local=False, cores=8, cpu_pct=0.0,
                      spare_cores=m.load.spare_tenths / 10, hash_rate=0.0, offered_mem_mb=m.load.mem_free_mb,
                      exec_allowed=False, last_seen=m.load_at, running=m.load.running, offered_cores=8.0)
             for m in sim.rng.sample(known, min(8, len(known))) if m.load is not None]
    placer = Placer(clock=lambda: sim.now)
    placer.update(views)
    best = placer.ranked(views)[:2]
    return max(sim._latency(submitter, sim.by_id[v.fingerprint]) for v in best)


def _gossip_ages(sim: Sim) -> list[float]:
    node = sim.rng.choice(sim.live())
    ages = [node.m.load_age(m.node) for m in node.m.alive()]
    return [a for a in ages if a is not None]


SCENARIOS: dict[str, Scenario] = {
    "10": Scenario(name="10 nodes, one LAN", per_subnet=10),
    "100": Scenario(name="100 nodes, one LAN", per_subnet=100),
    "1000": Scenario(name="1,000 nodes, one LAN", per_subnet=1000, start_spread=10.0),
    "4x250": Scenario(name="4 subnets of 250, joined by seeds", subnets=4, per_subnet=250, start_spread=10.0),
    "50-partition": Scenario(name="50 nodes, 2 subnets, 2 % loss, a partition that heals", subnets=2,
                             per_subnet=25, loss=0.02, idle=60.0, kills=1, leaves=1, partition=(5.0, 25.0),
                             cfg=MemberConfig.for_tests()),
}


def scenario(name: str, **changes: Any) -> Scenario:
    return replace(SCENARIOS[name], **changes)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="scripts/simulate", description=__doc__.splitlines()[0] if __doc__ else "")
    ap.add_argument("names", nargs="*", default=["10", "100", "1000", "4x250"], choices=list(SCENARIOS),
                    metavar="SCENARIO", help=f"one or more of {', '.join(SCENARIOS)} (default: 10 100 1000 4x250)")
    ap.add_argument("--idle", type=float, help="seconds of idle window (kills, traffic, false suspicions)")
    ap.add_argument("--loss", type=float, help="datagram loss, 0..1 (default 0.01)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write the figures to this file")
    args = ap.parse_args(argv)
    results: dict[str, Any] = {}
    ok = True

    def say(line: str) -> None:
        sys.stderr.write(f"  ... {line}\n")

    for name in args.names:
        changes: dict[str, Any] = {"seed": args.seed}
        if args.idle is not None:
            changes["idle"] = args.idle
        if args.loss is not None:
            changes["loss"] = args.loss
        sc = scenario(name, **changes)
        sys.stdout.write(f"== {sc.name} (loss {sc.loss:.0%}, idle window {sc.idle:.0f} s)\n")
        sys.stdout.flush()
        rep = run(sc, progress=say)
        sys.stdout.write("\n".join(rep.lines()) + "\n")
        sys.stdout.flush()
        ok = ok and rep.passed()
        results[name] = {k: v for k, v in vars(rep).items() if k != "counters"} | {"passed": rep.passed()}
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
