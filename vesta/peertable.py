"""Known peers: what their last beacon said, when it came, and whether they are still there.

A peer is *alive* while its beacons arrive, *suspect* after ``suspect_after``
of its own beacon intervals without one, and removed after ``expire_after``.
Peers are keyed by fingerprint, so a node that restarts (new ``boot``) or is
renamed is the same peer. The table also remembers the newest (boot, seq)
of every fingerprint it has seen, bounded, even after removal, so an old
beacon replayed later cannot bring a peer back.

Room for real nodes. A key holder can make identities at will, one beacon
each: the claimed interval is bounded (``MAX_INTERVAL_S``, the most a
vestad may be configured with), so a silent one is gone within
``expire_after`` of those; when the table is full, a newcomer takes the place
of the peer silent longest among those silent for ``EVICT_SILENT_S`` that
never completed a link handshake with this node (``mark_linked``); and one
source address may hold at most ``MAX_UNLINKED_PER_SOURCE`` such peers. A
peer this node has linked with keeps its place until it times out.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from vesta.proto import Beacon, NodeStatus

Clock = Callable[[], float]
MAX_SEEN = 4096   # (boot, seq) memory across removals
MAX_INTERVAL_S = 60.0          # the longest beacon interval a peer may claim (vestad's own bound)
EVICT_SILENT_S = 5.0           # a never-linked peer silent this long may make room for a newcomer
MAX_UNLINKED_PER_SOURCE = 32   # never-linked peers whose beacons come from one address


class Freshness(Enum):
    NEW = "new"
    DUPLICATE = "duplicate"   # the same beacon again (broadcast + unicast both reached us)
    REPLAY = "replay"         # older than one already seen


@dataclass(slots=True)
class Peer:
    status: NodeStatus
    addr: tuple[str, int]          # TCP address to dial
    disco: tuple[str, int]         # UDP address its beacons come from
    interval: float                # its beacon interval, seconds
    first_seen: float
    last_seen: float
    boot: int
    beacons: int = 0
    restarts: int = 0
    suspect: bool = False
    linked: bool = False           # it completed a link handshake with this node (either way)

    @property
    def fingerprint(self) -> str:
        return self.status.fingerprint

    @property
    def name(self) -> str:
        return self.status.name


@dataclass(slots=True)
class Change:
    """What an observation or a sweep did, for logging and the event feed."""

    event: str     # joined | restarted | renamed | suspect | recovered | left
    peer: Peer
    detail: str = ""


@dataclass
class PeerTable:
    suspect_after: int = 3
    expire_after: int = 10
    max_peers: int = 256
    clock: Clock = time.monotonic
    _peers: dict[str, Peer] = field(default_factory=dict)
    _seen: OrderedDict[str, tuple[int, int]] = field(default_factory=OrderedDict)
    _linked: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _no_room_until: float = -1.0     # see _room_possible
    _no_room_size: int = -1

    def peek_freshness(self, beacon: Beacon) -> Freshness:
        """``freshness`` without remembering anything: for a beacon whose signature is not checked yet."""
        last = self._seen.get(beacon.status.fingerprint)
        mark = (beacon.boot, beacon.seq)
        if last is not None and mark <= last:
            return Freshness.DUPLICATE if mark == last else Freshness.REPLAY
        return Freshness.NEW

    def admits(self, fingerprint: str, source: tuple[str, int]) -> bool:
        """Whether ``observe`` would keep a beacon of ``fingerprint`` from ``source`` (read-only: a full table
        turns a newcomer away before its signature is checked)."""
        if fingerprint in self._peers:
            return True
        if len(self._peers) >= self.max_peers and not self._room_possible():
            return False
        return fingerprint in self._linked or sum(
            1 for p in self._peers.values() if not p.linked and p.disco[0] == source[0]) < MAX_UNLINKED_PER_SOURCE

    def _room_possible(self) -> bool:
        """Whether a full table has a peer a newcomer may replace. When it has none, no peer can become one
        before the earliest never-linked one has been silent EVICT_SILENT_S (last_seen only grows, linked
        only becomes true, a newcomer needs room): until then, or until the table's size changes, the
        answer is remembered, so a flood of newcomers costs no scan each."""
        now = self.clock()
        if now < self._no_room_until and self._no_room_size == len(self._peers):
            return False
        unlinked = [p.last_seen for p in self._peers.values() if not p.linked]
        if any(now - t > EVICT_SILENT_S for t in unlinked):
            return True
        self._no_room_until = min(unlinked, default=now + 60.0) + EVICT_SILENT_S
        self._no_room_size = len(self._peers)
        return False

    def forget(self, fingerprint: str, why: str) -> Change | None:
        """Remove a peer at once (it said it is leaving); its (boot, seq) stays remembered."""
        peer = self._peers.pop(fingerprint, None)
        return None if peer is None else Change("left", peer, why)

    def freshness(self, beacon: Beacon) -> Freshness:
        """Compare a beacon's (boot, seq) with the newest seen from that node, and remember it."""
        fp = beacon.status.fingerprint
        mark = (beacon.boot, beacon.seq)
        fresh = self.peek_freshness(beacon)
        if fresh is not Freshness.NEW:
            return fresh
        self._seen[fp] = mark
        self._seen.move_to_end(fp)
        while len(self._seen) > MAX_SEEN:
            self._seen.popitem(last=False)
        return Freshness.NEW

    def observe(self, beacon: Beacon, source: tuple[str, int]) -> list[Change]:
        """Record a fresh, authenticated beacon received from ``source`` (ip, port)."""
        now = self.clock()
        status = beacon.status
        addr = (status.host or source[0], status.port)
        disco = (source[0], status.dport)
        interval = min(beacon.interval_ms / 1000.0, MAX_INTERVAL_S)
        peer = self._peers.get(status.fingerprint)
        if peer is None:
            made_room: list[Change] = []
            unlinked_here = [p for p in self._peers.values() if not p.linked and p.disco[0] == source[0]]
            if len(unlinked_here) >= MAX_UNLINKED_PER_SOURCE and status.fingerprint not in self._linked:
                return []
            if len(self._peers) >= self.max_peers:
                silent = [p for p in self._peers.values() if not p.linked and now - p.last_seen > EVICT_SILENT_S]
                if not silent:
                    return []
                victim = min(silent, key=lambda p: p.last_seen)
                del self._peers[victim.fingerprint]
                made_room.append(Change("left", victim, f"made room for a new peer (never linked, no beacon "
                                                        f"for {now - victim.last_seen:.1f}s)"))
            peer = Peer(status, addr, disco, interval, now, now, beacon.boot, beacons=1,
                        linked=status.fingerprint in self._linked)
            self._peers[status.fingerprint] = peer
            return [*made_room, Change("joined", peer)]
        changes: list[Change] = []
        if beacon.boot != peer.boot:
            peer.restarts += 1
            changes.append(Change("restarted", peer))
        if status.name != peer.status.name:
            changes.append(Change("renamed", peer, f"{peer.status.name} -> {status.name}"))
        if peer.suspect:
            changes.append(Change("recovered", peer))
        peer.status, peer.addr, peer.disco, peer.interval = status, addr, disco, interval
        peer.last_seen, peer.boot, peer.suspect = now, beacon.boot, False
        peer.beacons += 1
        return changes

    def sweep(self) -> list[Change]:
        """Mark peers suspect or remove them, by how many of their own intervals they missed."""
        now = self.clock()
        changes: list[Change] = []
        for fp, peer in list(self._peers.items()):
            missed = (now - peer.last_seen) / peer.interval
            if missed > self.expire_after:
                del self._peers[fp]
                changes.append(Change("left", peer, f"no beacon for {now - peer.last_seen:.1f}s"))
            elif missed > self.suspect_after and not peer.suspect:
                peer.suspect = True
                changes.append(Change("suspect", peer, f"no beacon for {now - peer.last_seen:.1f}s"))
        return changes

    def mark_linked(self, fingerprint: str) -> None:
        """``fingerprint`` completed a link handshake with this node: it keeps its place (module doc), also
        when it comes back after leaving the table (remembered, bounded)."""
        self._linked[fingerprint] = None
        self._linked.move_to_end(fingerprint)
        while len(self._linked) > MAX_SEEN:
            self._linked.popitem(last=False)
        peer = self._peers.get(fingerprint)
        if peer is not None:
            peer.linked = True

    def get(self, fingerprint: str) -> Peer | None:
        return self._peers.get(fingerprint)

    def by_name(self, name: str) -> Peer | None:
        for peer in self._peers.values():
            if peer.name == name:
                return peer
        return None

    def alive(self) -> list[Peer]:
        return [p for p in self._peers.values() if not p.suspect]

    def all(self) -> list[Peer]:
        return list(self._peers.values())

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, fingerprint: object) -> bool:
        return fingerprint in self._peers
