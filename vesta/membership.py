"""SWIM membership: who is in the federation and whether they are alive, as a pure state machine.

No I/O and no clock of its own: a driver (the simulator in ``vesta.simnet``, later the daemon) feeds it
packets (``receive``) and the time (``tick``, with ``clock`` injected), and carries out the ``Send`` and
``Sync`` actions it returns. It follows SWIM with the Lifeguard refinements, as hashicorp/memberlist does:

* **Probing.** Every ``probe_interval`` a node pings one member, taken round-robin from a shuffled list
  (so every member is probed by someone about once per interval, and by this node once per N). No ack
  within ``probe_timeout``: ``indirect_checks`` other members are asked to ping it (``PING_REQ``, the
  ack travels back through them) and the direct ping is sent once more. No ack by the end of the
  interval: the member is *suspect*.
* **Suspicion and refutation.** A suspicion carries the member's incarnation. A node that hears it is
  suspected raises its incarnation and spreads ``Alive`` with the new one, which beats the suspicion
  everywhere. Unrefuted, a suspicion becomes *dead* (confirmed) after a timeout that starts at
  ``suspicion_max_mult`` times the minimum and shrinks toward the minimum, ``suspicion_mult x
  log10(N+1) x probe_interval``, as other members independently suspect the same incarnation.
* **Leave intent.** ``leave()`` spreads ``Left`` at once, so nobody waits for a timeout. A node that
  comes back starts with a higher incarnation (the driver passes its start time), which beats the
  ``Left`` or ``Dead`` others remember.
* **Gossip.** Joins, suspicions, refutations, deaths and leaves ride on every packet (pings, acks and a
  ``GOSSIP`` packet to ``gossip_nodes`` random members every ``gossip_interval`` while there is news),
  least-sent first, each at most ``retransmit_mult x ceil(log10(N+1))`` times, and never more than
  fits one datagram (``max_body`` bytes). A newer update about a member replaces the queued older one.
* **Load.** Every packet carries the sender's compact load record and ``loads_per_packet`` others',
  each with its age, so placement has a rough picture of every node without anyone broadcasting.
* **Full state, rarely.** A node syncs (``Sync``: full state both ways, over a stream in the daemon)
  with its seeds at start and with a member it does not know that talks to it (at most one every
  4 probe intervals: how a newcomer learns everyone); every ``sync_interval`` it syncs
  with one random member, and every ``reconnect_interval`` with a member it holds dead (a healed
  partition) or a seed. A ``HELLO`` packet (the node's ``Alive``) is for the LAN broadcast that finds the
  first peers: it is sent while the node knows nobody, then every ``hello_interval``; hearers add the
  node and pass it on once each (for those who missed the broadcast), not log N times.
* **Bounded memory.** At most ``max_members`` members (tombstones of the dead and left first give way);
  past that a new member is not taken, counted in ``counters["members_full"]`` and logged once, and
  the protocol carries on for the members kept.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any

import msgpack

from vesta.errors import ProtocolError

log = logging.getLogger(__name__)

Addr = tuple[str, int]
Clock = Callable[[], float]

ID_BYTES = 16                 # a node id on the wire: the 16 bytes of its fingerprint
MAX_UPDATES = 64              # updates per packet, checked before they are built
MAX_LOADS = 16                # load records per packet
MAX_SYNC_MEMBERS = 65536      # members in one full-state exchange
MAX_HOST = 253
START_HELLOS = 3              # LAN broadcasts at start, so that one lost datagram does not hide a node


class State(Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


class Kind(IntEnum):
    """Packet kinds. Append only: the numbers are on the wire."""

    PING = 1
    ACK = 2
    PING_REQ = 3
    GOSSIP = 4
    HELLO = 5


class UKind(IntEnum):
    """Update kinds. Append only: the numbers are on the wire."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@dataclass(frozen=True)
class MemberConfig:
    """Membership timing and limits. Defaults suit a LAN of up to a few thousand nodes."""

    probe_interval: float = 0.5     # s; detection time scales with it, traffic inversely (2 packets a probe)
    probe_timeout: float = 0.2      # s to wait for a direct ack before asking others; above the LAN round trip
    indirect_checks: int = 3        # members asked to probe a silent one; each more cuts false suspicion
    gossip_interval: float = 0.2    # s between gossip packets while there is news; spreads it in ~log N of them
    gossip_nodes: int = 3           # members each gossip round goes to
    # Each update is sent retransmit_mult * ceil(log10(N+1)) times; a member misses it with a chance of about
    # e^-(that): 3 left one member in 400 unaware of a join across subnets (simulated), 5 none.
    retransmit_mult: int = 5
    suspicion_mult: float = 2.0     # min suspicion timeout = this * log10(N+1) * probe_interval
    suspicion_max_mult: float = 2.0  # a lone suspicion lasts this many times the minimum
    loads_per_packet: int = 3       # others' load records on each packet, besides the sender's own
    max_members: int = 4096         # memory bound; past it new members are counted and not kept
    max_body: int = 1200            # bytes of packet body; sealing adds ~100, under a 1,400-byte datagram
    sync_interval: float = 30.0     # s between full-state syncs with a random member (repairs lost gossip)
    reconnect_interval: float = 10.0  # s between syncs with a dead member or a seed (heals partitions)
    hello_interval: float = 60.0    # s between LAN broadcasts once the node knows someone (1 s before that)
    tombstone_s: float = 60.0       # s a dead or left member is remembered, so old gossip cannot revive it

    @classmethod
    def for_tests(cls) -> MemberConfig:
        return cls(sync_interval=5.0, reconnect_interval=2.0, hello_interval=5.0, tombstone_s=30.0)


# ---------------------------------------------------------------- wire values


@dataclass(frozen=True, slots=True)
class Update:
    """One piece of gossip about member ``node``: alive (with its address), suspect, dead or left."""

    kind: UKind
    node: str                  # fingerprint, 32 hex characters
    incarnation: int
    addr: Addr = ("", 0)       # ALIVE only
    by: str = ""               # SUSPECT / DEAD: who said so

    def to_wire(self) -> list[Any]:
        if self.kind is UKind.ALIVE:
            return [int(self.kind), bytes.fromhex(self.node), self.incarnation, self.addr[0], self.addr[1]]
        if self.kind is UKind.LEFT:
            return [int(self.kind), bytes.fromhex(self.node), self.incarnation]
        return [int(self.kind), bytes.fromhex(self.node), self.incarnation, bytes.fromhex(self.by)]


@dataclass(frozen=True, slots=True)
class Load:
    """A node's compact load record: spare cores (tenths), free memory (MiB), slots in use, and how old."""

    node: str
    version: int               # the origin's counter: a higher one replaces a lower one
    spare_tenths: int
    mem_free_mb: int
    running: int
    age_ms: int = 0            # how old the record was when this packet left

    def to_wire(self) -> list[Any]:
        return [bytes.fromhex(self.node), self.version, self.spare_tenths, self.mem_free_mb, self.running,
                self.age_ms]


@dataclass(frozen=True, slots=True)
class Packet:
    """One membership datagram. The sender is known from the sealed envelope, not from here."""

    kind: Kind
    sender: str
    seq: int = 0
    target: str = ""            # PING / PING_REQ: the member to ping (a stale address must not ack for another)
    target_addr: Addr = ("", 0)  # PING_REQ only
    updates: tuple[Update, ...] = ()
    loads: tuple[Load, ...] = ()


def _check_int(what: str, v: object, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
        raise ProtocolError(f"{what} out of range: {v!r}")
    return v


def _check_id(what: str, v: object) -> str:
    if not isinstance(v, bytes) or len(v) != ID_BYTES:
        raise ProtocolError(f"{what} must be {ID_BYTES} bytes")
    return v.hex()


def _check_host(what: str, v: object) -> str:
    if not isinstance(v, str) or len(v) > MAX_HOST:
        raise ProtocolError(f"{what} must be a host name")
    return v


def encode_packet(p: Packet) -> bytes:
    target = bytes.fromhex(p.target) if p.target else b""
    body: bytes = msgpack.packb([int(p.kind), bytes.fromhex(p.sender), p.seq, target, *p.target_addr,
                                 [u.to_wire() for u in p.updates], [ld.to_wire() for ld in p.loads]],
                                use_bin_type=True)
    return body


def decode_packet(data: bytes) -> Packet:
    """Parse and check one packet body; anything malformed is ProtocolError."""
    try:
        kind, sender, seq, target, thost, tport, updates, loads = msgpack.unpackb(data, raw=False)
        kind = Kind(kind)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"undecodable membership packet: {exc}") from exc
    if not isinstance(updates, list) or len(updates) > MAX_UPDATES:
        raise ProtocolError(f"packet.updates must be a list of at most {MAX_UPDATES}")
    if not isinstance(loads, list) or len(loads) > MAX_LOADS:
        raise ProtocolError(f"packet.loads must be a list of at most {MAX_LOADS}")
    ups = tuple(_decode_update(u) for u in updates)
    lds = tuple(_decode_load(v) for v in loads)
    return Packet(kind, _check_id("packet.sender", sender), _check_int("packet.seq", seq, 1 << 62),
                  _check_id("packet.target", target) if target else "",
                  (_check_host("packet.target_host", thost), _check_int("packet.target_port", tport, 65535)),
                  ups, lds)


def _decode_update(u: object) -> Update:
    if not isinstance(u, list) or not 3 <= len(u) <= 5:
        raise ProtocolError("update must be a list of 3 to 5 items")
    try:
        kind = UKind(u[0])
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"unknown update kind {u[0]!r}") from exc
    node, inc = _check_id("update.node", u[1]), _check_int("update.incarnation", u[2], 1 << 62)
    if kind is UKind.ALIVE:
        if len(u) != 5:
            raise ProtocolError("alive update must have 5 items")
        return Update(kind, node, inc, (_check_host("update.host", u[3]), _check_int("update.port", u[4], 65535)))
    if kind is UKind.LEFT:
        return Update(kind, node, inc)
    if len(u) != 4:
        raise ProtocolError("suspect/dead update must have 4 items")
    return Update(kind, node, inc, by=_check_id("update.by", u[3]))


def _decode_load(v: object) -> Load:
    if not isinstance(v, list) or len(v) != 6:
        raise ProtocolError("load record must be a list of 6 items")
    return Load(_check_id("load.node", v[0]), _check_int("load.version", v[1], 1 << 62),
                _check_int("load.spare", v[2], 1 << 20), _check_int("load.mem", v[3], 1 << 40),
                _check_int("load.running", v[4], 1 << 20), _check_int("load.age", v[5], 1 << 40))


def encode_state(state: list[Update]) -> bytes:
    """A full-state exchange (``Sync``), for a stream: the daemon sends it over a peer link."""
    body: bytes = msgpack.packb([u.to_wire() for u in state], use_bin_type=True)
    return body


def decode_state(data: bytes) -> list[Update]:
    try:
        items = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"undecodable member state: {exc}") from exc
    if not isinstance(items, list) or len(items) > MAX_SYNC_MEMBERS:
        raise ProtocolError(f"member state must be a list of at most {MAX_SYNC_MEMBERS}")
    return [_decode_update(u) for u in items]


def _wire_size(obj: Any) -> int:
    return len(msgpack.packb(obj, use_bin_type=True))


PACKET_OVERHEAD = 96   # bytes: a packet body without updates or loads (a PING_REQ with a long host), at most
LOAD_SIZE = 48         # bytes: one load record, at most


# ---------------------------------------------------------------- actions and events


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``packet`` to ``to``; ``to`` None means the LAN broadcast (HELLO only)."""

    to: Addr | None
    packet: Packet


@dataclass(frozen=True, slots=True)
class Sync:
    """Exchange full state with ``to`` (``local_state`` one way, ``merge_state`` both ends)."""

    to: Addr


Action = Send | Sync


@dataclass(frozen=True, slots=True)
class Event:
    """What changed in the member list: joined, suspect, recovered, dead, left, rejoined."""

    event: str
    node: str
    detail: str = ""


@dataclass(slots=True)
class Member:
    node: str
    addr: Addr
    incarnation: int
    state: State
    since: float                       # when it entered this state, by the injected clock
    load: Load | None = None
    load_at: float = 0.0               # when ``load`` arrived (its age then is load.age_ms)


@dataclass(slots=True)
class _Suspicion:
    incarnation: int
    start: float
    confirmers: set[str]
    deadline: float


@dataclass(slots=True)
class _Probe:
    seq: int
    target: str
    started: float
    indirect_sent: bool = False
    acked: bool = False


# ---------------------------------------------------------------- the state machine


@dataclass
class Membership:
    """One node's view of the federation: call ``tick`` at ``next_wakeup()``, ``receive`` per packet."""

    me: str
    addr: Addr
    cfg: MemberConfig = field(default_factory=MemberConfig)
    clock: Clock = field(default=lambda: 0.0)
    incarnation: int = 0
    seeds: tuple[Addr, ...] = ()
    rng: random.Random = field(default_factory=random.Random)
    counters: Counter[str] = field(default_factory=Counter)
    members: dict[str, Member] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        now = self.clock()
        self._seq = 0
        self._order: list[str] = []
        self._order_i = 0
        self._probe: _Probe | None = None
        self._next_probe = now + self.rng.uniform(0, self.cfg.probe_interval)
        self._next_gossip = now + self.rng.uniform(0, self.cfg.gossip_interval)
        self._next_sync = now + self.cfg.sync_interval * self.rng.uniform(0.5, 1.5)
        self._next_reconnect = now + self.cfg.reconnect_interval * self.rng.uniform(0.5, 1.5)
        self._next_hello = now
        self._hellos = 0
        self._joined = False
        self._join_syncs = 0
        self._suspicions: dict[str, _Suspicion] = {}
        self._live = 0            # members alive or suspect, kept up to date by every change of state
        self._next_reap = now
        self._relays: dict[int, tuple[Addr, int, float]] = {}   # our seq -> (origin, origin's seq, expiry)
        # news to spread: node -> (update, its wire size, times sent)
        self._queue: dict[str, tuple[Update, int, int, bool]] = {}   # node -> (news, size, times sent, once)
        self._load_version = 0
        self._own_load: Load | None = None
        self._own_load_at = 0.0
        self._left = False
        self._full_logged = False
        self._joining_sync_at = -1e18

    # ------------------------------------------------------------ views

    def alive(self) -> list[Member]:
        """Members taken to be there: alive or suspect (a suspect may yet refute)."""
        return [m for m in self.members.values() if m.state in (State.ALIVE, State.SUSPECT)]

    def state_of(self, node: str) -> State | None:
        m = self.members.get(node)
        return None if m is None else m.state

    def live_count(self) -> int:
        """Members alive or suspect (kept as a count: every packet asks for it)."""
        return self._live

    def load_age(self, node: str) -> float | None:
        """How old the newest load record of ``node`` is now, in seconds (None: never heard)."""
        m = self.members.get(node)
        if m is None or m.load is None:
            return None
        return m.load.age_ms / 1000.0 + self.clock() - m.load_at

    def drain_events(self) -> list[Event]:
        out, self.events = self.events, []
        return out

    def _n(self) -> int:
        return self.live_count() + 1

    def retransmit_limit(self) -> int:
        return self.cfg.retransmit_mult * max(1, math.ceil(math.log10(self._n() + 1)))

    def _scale(self) -> float:
        """How much rarer full syncs get with size (memberlist's push-pull scale): 1 up to 32 nodes, then
        one more per doubling, so their traffic per node stays about flat."""
        return max(1.0, math.log2(self._n() / 32) + 1) if self._n() > 32 else 1.0

    def suspicion_min(self) -> float:
        return self.cfg.suspicion_mult * max(1.0, math.log10(self._n() + 1)) * self.cfg.probe_interval

    # ------------------------------------------------------------ inputs from the driver

    def set_load(self, spare_cores: float, mem_free_mb: int, running: int) -> None:
        self._load_version += 1
        self._own_load = Load(self.me, self._load_version, max(0, int(spare_cores * 10 + 0.5)), max(0, mem_free_mb),
                              max(0, running))
        self._own_load_at = self.clock()

    def start(self) -> list[Action]:
        """First actions: sync with every seed, and the first LAN hello."""
        self._enqueue(self._alive_self())
        out: list[Action] = [Sync(s) for s in self.seeds]
        return out + self._hello()

    def leave(self) -> list[Action]:
        """Leave intent: tell a few members at once; the driver sends these before it stops."""
        self._left = True
        news = Update(UKind.LEFT, self.me, self.incarnation)
        self._queue.clear()
        self._enqueue(news)
        targets = self._random_members(2 * self.cfg.gossip_nodes, set())
        return [Send(m.addr, self._packet(Kind.GOSSIP)) for m in targets]

    def next_wakeup(self) -> float:
        """The earliest time ``tick`` has something to do."""
        t = min(self._next_probe, self._next_sync, self._next_reconnect, self._next_hello)
        if self._queue:
            t = min(t, self._next_gossip)
        if self._probe is not None and not self._probe.acked and not self._probe.indirect_sent:
            t = min(t, self._probe.started + self.cfg.probe_timeout)
        for s in self._suspicions.values():
            t = min(t, s.deadline)
        return t

    def tick(self) -> list[Action]:
        if self._left:
            return []
        now = self.clock()
        out: list[Action] = []
        self._expire_suspicions(now)
        p = self._probe
        if p is not None and not p.acked and not p.indirect_sent and now >= p.started + self.cfg.probe_timeout:
            out += self._indirect(p)
        if now >= self._next_probe:
            self._end_probe()
            self._next_probe = now + self.cfg.probe_interval
            out += self._start_probe(now)
        if self._queue and now >= self._next_gossip:
            self._next_gossip = now + self.cfg.gossip_interval
            for m in self._random_members(self.cfg.gossip_nodes, set()):
                if not self._queue:
                    break
                out.append(Send(m.addr, self._packet(Kind.GOSSIP)))
        elif now >= self._next_gossip:
            self._next_gossip = now + self.cfg.gossip_interval
        if now >= self._next_sync:
            if self._join_syncs > 0:   # just joined: two more syncs soon, with others (see merge_state)
                self._join_syncs -= 1
                self._next_sync = now + 4 * self.cfg.probe_interval
            else:
                self._next_sync = now + self.cfg.sync_interval * self._scale() * self.rng.uniform(0.75, 1.25)
            pick = self._random_members(1, set())
            if pick:
                out.append(Sync(pick[0].addr))
        if now >= self._next_reconnect:
            self._next_reconnect = now + self.cfg.reconnect_interval * self.rng.uniform(0.75, 1.25)
            dead = [m for m in self.members.values() if m.state is State.DEAD]
            if dead:
                out.append(Sync(self.rng.choice(dead).addr))
            elif self.seeds and self.live_count() == 0:
                out.append(Sync(self.rng.choice(self.seeds)))
        if now >= self._next_hello:
            out += self._hello()
        self._reap(now)
        return out

    def receive(self, packet: Packet, src: Addr) -> list[Action]:
        """One authenticated packet from ``packet.sender`` at ``src``."""
        if self._left or packet.sender == self.me:
            return []
        now = self.clock()
        self.counters["packets_received"] += 1
        for u in packet.updates:
            self._apply(u, source="hello" if packet.kind is Kind.HELLO else "gossip")
        for ld in packet.loads:
            self._apply_load(ld, now)
        out: list[Action] = []
        if packet.sender not in self.members and packet.kind is not Kind.HELLO \
                and now - self._joining_sync_at >= 4 * self.cfg.probe_interval:
            # A member we do not know talks to us: we are new, or missed its news. Learn everyone from it
            # (rate-limited: a newcomer hears from many at once, and one sync teaches it all of them).
            self._joining_sync_at = now
            self.counters["syncs_with_strangers"] += 1
            out.append(Sync(src))
        if packet.kind is Kind.PING:
            if packet.target == self.me:
                out.append(Send(src, self._packet(Kind.ACK, seq=packet.seq)))
        elif packet.kind is Kind.PING_REQ:
            # Only a member we know, at the address we know: a request cannot aim our pings elsewhere.
            target = self.members.get(packet.target)
            if target is None or target.state not in (State.ALIVE, State.SUSPECT):
                self.counters["ping_req_unknown"] += 1
                return out
            self._seq += 1
            self._relays[self._seq] = (src, packet.seq, now + self.cfg.probe_interval)
            out.append(Send(target.addr, self._packet(Kind.PING, seq=self._seq, target=packet.target)))
        elif packet.kind is Kind.ACK:
            relay = self._relays.pop(packet.seq, None)
            if relay is not None:
                if relay[2] >= now:
                    out.append(Send(relay[0], self._packet(Kind.ACK, seq=relay[1])))
            elif self._probe is not None and packet.seq == self._probe.seq:
                self._probe.acked = True
        return out

    # ------------------------------------------------------------ full state

    def local_state(self) -> list[Update]:
        """Every member this node knows, itself included, as updates (one way of a ``Sync``)."""
        out = [self._alive_self()]
        for m in self.members.values():
            if m.state is State.ALIVE or m.state is State.SUSPECT:
                out.append(Update(UKind.ALIVE, m.node, m.incarnation, m.addr))
                if m.state is State.SUSPECT:   # after its address, so a receiver that did not know it can hold it
                    out.append(Update(UKind.SUSPECT, m.node, m.incarnation, by=self.me))
            elif m.state is State.DEAD:
                out.append(Update(UKind.DEAD, m.node, m.incarnation, by=self.me))
            else:
                out.append(Update(UKind.LEFT, m.node, m.incarnation))
        return out

    def merge_state(self, state: list[Update]) -> None:
        """The other end's full state; news it brings is gossiped on."""
        if self._left:
            return
        if not self._joined:
            # Our first view comes from one member, who may have missed some joins (their broadcasts
            # came before it started): two more syncs with others, a few probe intervals apart, fill gaps.
            self._joined = True
            self._join_syncs = 2
            self._next_sync = min(self._next_sync, self.clock() + 4 * self.cfg.probe_interval)
        before = len(self.members)
        for u in state[:MAX_SYNC_MEMBERS]:
            self._apply(u, source="sync")
        if len(self.members) > before:
            # We know more members now than when we last announced ourselves (a joiner's first Alive went
            # out while it knew only its LAN, and counts log N of that): announce again, to all of them.
            self._enqueue(self._alive_self())

    # ------------------------------------------------------------ probing

    def _start_probe(self, now: float) -> list[Action]:
        target = self._next_target()
        if target is None:
            return []
        self._seq += 1
        self._probe = _Probe(self._seq, target.node, now)
        self.counters["probes"] += 1
        return [Send(target.addr, self._packet(Kind.PING, seq=self._seq, target=target.node))]

    def _next_target(self) -> Member | None:
        for _ in range(2):
            while self._order_i < len(self._order):
                node = self._order[self._order_i]
                self._order_i += 1
                m = self.members.get(node)
                if m is not None and m.state in (State.ALIVE, State.SUSPECT):
                    return m
            self._order = [m.node for m in self.alive()]
            self.rng.shuffle(self._order)
            self._order_i = 0
        return None

    def _indirect(self, p: _Probe) -> list[Action]:
        p.indirect_sent = True
        target = self.members.get(p.target)
        if target is None or target.state not in (State.ALIVE, State.SUSPECT):
            return []
        out: list[Action] = [Send(target.addr, self._packet(Kind.PING, seq=p.seq, target=p.target))]
        for helper in self._random_members(self.cfg.indirect_checks, {p.target}):
            out.append(Send(helper.addr, self._packet(Kind.PING_REQ, seq=p.seq, target=p.target,
                                                      target_addr=target.addr)))
        self.counters["indirect_probes"] += 1
        return out

    def _end_probe(self) -> None:
        p, self._probe = self._probe, None
        if p is None or p.acked:
            return
        m = self.members.get(p.target)
        if m is None or m.state not in (State.ALIVE, State.SUSPECT):
            return
        self.counters["probe_failures"] += 1   # of a suspect: one more independent confirmation (Lifeguard)
        self._apply(Update(UKind.SUSPECT, m.node, m.incarnation, by=self.me), source="self")

    def _expire_suspicions(self, now: float) -> None:
        for node, s in list(self._suspicions.items()):
            if now >= s.deadline:
                del self._suspicions[node]
                m = self.members.get(node)
                if m is not None and m.state is State.SUSPECT and m.incarnation == s.incarnation:
                    self._apply(Update(UKind.DEAD, node, m.incarnation, by=self.me), source="self")

    def _reap(self, now: float) -> None:
        if now < self._next_reap:
            return
        self._next_reap = now + 1.0
        for node in [m.node for m in self.members.values()
                     if m.state in (State.DEAD, State.LEFT) and now - m.since > self.cfg.tombstone_s]:
            del self.members[node]
        for seq in [s for s, r in self._relays.items() if r[2] < now]:
            del self._relays[seq]

    def _hello(self) -> list[Action]:
        now = self.clock()
        # START_HELLOS at start, 0.5 s and 1 s apart (a LAN with 1 % loss then misses one in a million);
        # every second while it knows nobody; then every hello_interval, and rarer past 100 members, so a
        # LAN hears at most about 100 hellos per hello_interval, however large.
        self._hellos += 1
        n = self.live_count()
        if self._hellos < START_HELLOS:
            delay = 0.5 * self._hellos
        elif n == 0:
            delay = 1.0
        else:
            delay = self.cfg.hello_interval * max(1.0, n / 100) * self.rng.uniform(0.75, 1.25)
        self._next_hello = now + delay
        return [Send(None, Packet(Kind.HELLO, self.me, updates=(self._alive_self(),)))]

    # ------------------------------------------------------------ applying news

    def _alive_self(self) -> Update:
        return Update(UKind.ALIVE, self.me, self.incarnation, self.addr)

    def _refute(self, inc: int) -> None:
        self.incarnation = max(self.incarnation, inc) + 1
        self.counters["refutations"] += 1
        self._enqueue(self._alive_self())

    def _apply(self, u: Update, *, source: str) -> None:
        """Apply one update; ``source`` is gossip, self (our own finding), hello (a LAN broadcast that nearly
        everyone there heard) or sync (mostly old news). News from a hello or a sync is passed on once, not
        ``retransmit_limit`` times: that starts an epidemic only where it is news (one who missed the
        broadcast), and costs the LAN one update per member for a join, not log N."""
        now = self.clock()
        if u.node == self.me:
            if u.kind is not UKind.ALIVE and u.incarnation >= self.incarnation:
                self._refute(u.incarnation)
            elif u.kind is UKind.ALIVE and u.incarnation > self.incarnation:   # an older life of ours
                self._refute(u.incarnation)
            return
        m = self.members.get(u.node)
        if u.kind is UKind.ALIVE:
            if m is None:
                if not self._room():
                    return
                self.members[u.node] = Member(u.node, u.addr, u.incarnation, State.ALIVE, now)
                self._live += 1
                if self._order:   # a newcomer is probed within one round, not after a full one
                    self._order.insert(self.rng.randrange(self._order_i, len(self._order) + 1), u.node)
                self.events.append(Event("joined", u.node))
            elif u.incarnation > m.incarnation:
                was = m.state
                m.incarnation, m.addr = u.incarnation, u.addr
                if was is not State.ALIVE:
                    m.state, m.since = State.ALIVE, now
                    if was is not State.SUSPECT:
                        self._live += 1
                    self._suspicions.pop(u.node, None)
                    self.events.append(Event("recovered" if was is State.SUSPECT else "rejoined", u.node))
            else:
                return
            self._enqueue(u, source)
            return
        if m is None or u.incarnation < m.incarnation:
            return
        if u.kind is UKind.SUSPECT:
            if m.state is State.ALIVE:
                m.state, m.since, m.incarnation = State.SUSPECT, now, u.incarnation
                low = self.suspicion_min()
                self._suspicions[u.node] = _Suspicion(u.incarnation, now, {u.by},
                                                      now + low * self.cfg.suspicion_max_mult)
                self.events.append(Event("suspect", u.node, f"by {u.by[:8]}"))
                self._enqueue(u, source)
            elif m.state is State.SUSPECT:
                s = self._suspicions.get(u.node)
                if s is not None and s.incarnation == u.incarnation and u.by not in s.confirmers \
                        and len(s.confirmers) <= self.cfg.indirect_checks:
                    s.confirmers.add(u.by)
                    s.deadline = self._suspicion_deadline(s)
                    self._enqueue(u, source)
            return
        # DEAD or LEFT
        new_state = State.DEAD if u.kind is UKind.DEAD else State.LEFT
        if m.state in (State.DEAD, State.LEFT) and u.incarnation == m.incarnation:
            return
        if m.state in (State.ALIVE, State.SUSPECT):
            self._live -= 1
        m.state, m.since, m.incarnation = new_state, now, u.incarnation
        self._suspicions.pop(u.node, None)
        self.events.append(Event(new_state.value, u.node))
        self._enqueue(u, source)

    def _suspicion_deadline(self, s: _Suspicion) -> float:
        # Lifeguard: each independent confirmation shrinks the timeout toward the minimum, on a log scale.
        low = self.suspicion_min()
        high = low * self.cfg.suspicion_max_mult
        k = max(1, self.cfg.indirect_checks)
        frac = math.log(len(s.confirmers)) / math.log(k + 1)
        return s.start + max(low, high - (high - low) * frac)

    def _room(self) -> bool:
        if len(self.members) < self.cfg.max_members:
            return True
        gone = [m for m in self.members.values() if m.state in (State.DEAD, State.LEFT)]
        if gone:
            del self.members[min(gone, key=lambda m: m.since).node]   # dead or left: not counted live
            return True
        self.counters["members_full"] += 1
        if not self._full_logged:
            self._full_logged = True
            log.warning("member list full (%d members, max_members): new members are not kept; raise max_members",
                        len(self.members))
        return False

    def _apply_load(self, ld: Load, now: float) -> None:
        m = self.members.get(ld.node)
        if m is None or (m.load is not None and m.load.version >= ld.version):
            return
        m.load, m.load_at = ld, now

    # ------------------------------------------------------------ gossip queue and packets

    def _enqueue(self, u: Update, source: str = "self") -> None:
        # The limit of the rest is taken when each is sent (N grows while a node joins), not now.
        self._queue[u.node] = (u, _wire_size(u.to_wire()), 0, source in ("sync", "hello"))

    def _random_members(self, k: int, exclude: set[str]) -> list[Member]:
        live = self._order or [m.node for m in self.alive()]
        picked: dict[str, Member] = {}
        for _ in range(4 * k):
            if len(picked) >= k or not live:
                break
            node = live[self.rng.randrange(len(live))]
            m = self.members.get(node)
            if m is not None and node not in exclude and m.state in (State.ALIVE, State.SUSPECT):
                picked[node] = m
        return list(picked.values())

    def _packet(self, kind: Kind, *, seq: int = 0, target: str = "", target_addr: Addr = ("", 0)) -> Packet:
        budget = self.cfg.max_body - PACKET_OVERHEAD
        loads: list[Load] = []
        now = self.clock()
        if self._own_load is not None:
            own = self._own_load
            loads.append(Load(own.node, own.version, own.spare_tenths, own.mem_free_mb, own.running,
                              int((now - self._own_load_at) * 1000)))
            budget -= LOAD_SIZE
        if self.cfg.loads_per_packet and not self._left:
            for m in self._random_members(self.cfg.loads_per_packet, set()):
                if m.load is not None:
                    age = m.load.age_ms + int((now - m.load_at) * 1000)
                    loads.append(Load(m.node, m.load.version, m.load.spare_tenths, m.load.mem_free_mb,
                                      m.load.running, age))
                    budget -= LOAD_SIZE
        updates: list[Update] = []
        limit = self.retransmit_limit()
        if self._queue:
            # Least sent first; news to pass on once after all the rest.
            for node, (u, size, sent, once) in heapq.nsmallest(MAX_UPDATES, self._queue.items(),
                                                                key=lambda kv: (kv[1][3], kv[1][2])):
                if len(updates) >= MAX_UPDATES or budget < 24:
                    break
                if size > budget:
                    continue
                updates.append(u)
                budget -= size
                if once or sent + 1 >= limit:
                    del self._queue[node]
                else:
                    self._queue[node] = (u, size, sent + 1, once)
        return Packet(kind, self.me, seq, target, target_addr, tuple(updates), tuple(loads))
