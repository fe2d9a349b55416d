"""UDP beacons: how nodes find each other and learn each other's load.

Every beacon interval the node sends one sealed, signed beacon to:

* the broadcast address of every up IPv4 interface (127.255.255.255 on
  loopback, so daemons on one host find each other like a LAN does); when
  ``bind`` names one address, only to the interface that holds it;
* every ``-seed`` (resolved again every ``RESOLVE_EVERY`` seconds);
* every known peer outside our broadcast subnets, by unicast (an address
  that answered: its beacons came from there);
* a peer learned by gossip but not yet heard from, by unicast, sparingly: a
  member can name any host and port, so each such address gets at most
  ``GOSSIP_PROBES`` beacons per ``GOSSIP_WINDOW_S``, spaced out (1, 2, 4, 8
  intervals), and at most ``GOSSIP_PER_ROUND`` of them get one per round.

A received datagram is checked in this order, each failure counted and
dropped: size, decryption (wrong key), decoding and field ranges, own echo,
clock window (stale / future), (boot, seq) freshness (replay / duplicate),
peer-table room, and only then the Ed25519 signature and fingerprint: the
checks before it read state and change none, so a duplicate, a replay or a
beacon the full table would turn away costs no signature check, and nothing
changes before the signature holds. Nothing a datagram contains can raise
out of ``datagram_received``.

A node that stops sends one last beacon marked ``leaving``: its peers drop
it at once instead of timing it out. (An older node ignores the mark and
times it out as before.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import psutil

from vesta import proto
from vesta.config import Config, parse_seed
from vesta.crypto import FederationKeys, fingerprint, open_beacon, seal_beacon, verify_signature
from vesta.errors import AuthError, Dropped, ProtocolError, VestaError
from vesta.identity import Identity
from vesta.logs import WarnOnce
from vesta.peertable import Change, Freshness, PeerTable

log = logging.getLogger(__name__)

MAX_DATAGRAM = 16 * 1024       # bytes; a full beacon with 32 gossip entries is ~4 KiB
MAX_GOSSIP_TARGETS = 64
RESOLVE_EVERY = 30.0           # seconds between seed DNS look-ups
INTERFACES_EVERY = 10.0        # seconds between interface scans (laptops change networks)
GOSSIP_PROBES = 5              # beacons one gossip-learned address gets before it answers ...
GOSSIP_WINDOW_S = 600.0        # ... in this many seconds
GOSSIP_PER_ROUND = 8           # gossip-learned addresses sent a beacon in one round, at most
MAX_PROBED = 1024              # gossip-learned addresses whose probes are remembered
GOSSIP_PER_BEACON = 8          # gossip entries per beacon, rotating through every known peer
MAX_SEALED = 1400              # bytes: a beacon larger than this would leave as IP fragments (one lost: all lost)


@dataclass(frozen=True, slots=True)
class LocalNet:
    network: ipaddress.IPv4Network
    broadcast: str


def local_networks(bind: str) -> list[LocalNet]:
    """Up IPv4 interfaces with a broadcast address; only the one holding ``bind`` when it is specific."""
    nets: list[LocalNet] = []
    stats = psutil.net_if_stats()
    specific = None if bind in ("", "0.0.0.0") else ipaddress.IPv4Address(bind)
    for ifname, addrs in psutil.net_if_addrs().items():
        if ifname in stats and not stats[ifname].isup:
            continue
        for a in addrs:
            if a.family != socket.AF_INET or not a.netmask:
                continue
            net = ipaddress.IPv4Network(f"{a.address}/{a.netmask}", strict=False)
            if net.prefixlen >= 31:
                continue
            if specific is not None and specific not in net:
                continue
            # An address added without `brd` has no broadcast address: getifaddrs (so psutil) then
            # reports the address itself there, though the kernel still routes the subnet broadcast.
            bcast = a.broadcast
            if not bcast or bcast == a.address or ipaddress.IPv4Address(bcast) not in net:
                bcast = str(net.broadcast_address)
            nets.append(LocalNet(net, bcast))
    return nets


class Discovery(asyncio.DatagramProtocol):
    """Sends our beacons and turns received ones into peer-table updates."""

    def __init__(
        self,
        cfg: Config,
        keys: FederationKeys,
        identity: Identity,
        table: PeerTable,
        counters: Counter[str],
        status: Callable[[], proto.NodeStatus],
        on_change: Callable[[Change], None],
        wall: Callable[[], float] = time.time,
        on_beacon: Callable[[], None] = lambda: None,
    ) -> None:
        self.cfg = cfg
        self.keys = keys
        self.identity = identity
        self.table = table
        self.counters = counters
        self.status = status
        self.on_change = on_change
        self.on_beacon = on_beacon   # a beacon was accepted: capacity may have appeared
        self.wall = wall
        self.boot = time.time_ns()
        self.seq = 0
        self.transport: asyncio.DatagramTransport | None = None
        self._nets: list[LocalNet] = []
        self._nets_at = -1e9
        self._seeds: list[tuple[str, int]] = []
        self._seeds_at = -1e9
        # (ip, dport) -> (fingerprint, when last mentioned); dropped once that peer is in the table
        self._gossip_targets: OrderedDict[tuple[str, int], tuple[str, float]] = OrderedDict()
        # (ip, dport) -> (probes sent in this window, window start, next probe not before)
        self._probes: OrderedDict[tuple[str, int], tuple[int, float, float]] = OrderedDict()
        self._warn_once = WarnOnce(log)
        self._gossip_cursor = 0

    # ------------------------------------------------------------ socket

    async def open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        # Always the wildcard address: a socket bound to a unicast address never sees broadcasts.
        sock.bind(("", self.cfg.dport))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, sock=sock)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def error_received(self, exc: Exception) -> None:
        self.counters["udp_errors"] += 1
        log.debug("discovery socket error: %s", exc)

    # ------------------------------------------------------------ sending

    def _networks(self) -> list[LocalNet]:
        now = time.monotonic()
        if now - self._nets_at > INTERFACES_EVERY:
            self._nets, self._nets_at = local_networks(self.cfg.bind), now
        return self._nets

    async def _resolve_seeds(self) -> None:
        now = time.monotonic()
        if not self.cfg.seeds or now - self._seeds_at < RESOLVE_EVERY:
            return
        self._seeds_at = now
        loop = asyncio.get_running_loop()
        resolved: list[tuple[str, int]] = []
        for seed in self.cfg.seeds:
            host, port = parse_seed(seed, "seed", self.cfg.dport)
            try:
                infos = await loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM)
            except OSError as exc:
                self._warn_once("seed", seed, "cannot resolve seed %s: %s", seed, exc)
                continue
            resolved.extend((str(info[4][0]), int(info[4][1])) for info in infos[:1])
        self._seeds = resolved

    def _on_subnet(self, ip: str) -> bool:
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            return False
        return addr.is_loopback or any(addr in n.network for n in self._networks())

    def targets(self) -> list[tuple[str, int]]:
        """Every address this round's beacon goes to, without repeats."""
        out: dict[tuple[str, int], None] = {}
        for net in self._networks():
            out[(net.broadcast, self.cfg.dport)] = None
        for seed in self._seeds:
            out[seed] = None
        now = time.monotonic()
        horizon = now - self.cfg.expire_after * max(self.cfg.beacon_interval, 1.0) * 6
        probed = 0
        for target, (fp, mentioned) in list(self._gossip_targets.items()):
            if mentioned < horizon or fp in self.table:
                del self._gossip_targets[target]
            elif target not in out and probed < GOSSIP_PER_ROUND and self._may_probe(target, now):
                out[target] = None
                probed += 1
        for peer in self.table.all():
            if not self._on_subnet(peer.disco[0]):
                out[peer.disco] = None
        return list(out)

    def _may_probe(self, target: tuple[str, int], now: float) -> bool:
        """Whether a gossip-learned address that has not answered gets this round's beacon (and count it)."""
        count, start, next_at = self._probes.get(target, (0, now, now))
        if now - start > GOSSIP_WINDOW_S:
            count, start, next_at = 0, now, now
        if count >= GOSSIP_PROBES or now < next_at:
            return False
        count += 1
        self._probes[target] = (count, start, now + self.cfg.beacon_interval * 2 ** (count - 1))
        self._probes.move_to_end(target)
        while len(self._probes) > MAX_PROBED:
            self._probes.popitem(last=False)
        self.counters["gossip_probes"] += 1
        return True

    def make_beacon(self, leaving: bool = False) -> proto.Beacon:
        self.seq += 1
        # A few gossip entries per beacon, a different few each time (every known peer in turn), so the
        # sealed beacon stays one unfragmented datagram (MAX_SEALED) however many peers there are.
        known = [p for p in self.table.alive() if not ipaddress.ip_address(p.disco[0]).is_loopback]
        if known and not leaving:
            start = self._gossip_cursor % len(known)
            known = (known[start:] + known[:start])[:GOSSIP_PER_BEACON]
            self._gossip_cursor = start + len(known)
        gossip = tuple(proto.GossipEntry(p.fingerprint, p.disco[0], p.disco[1]) for p in known) if not leaving else ()
        beacon = proto.Beacon(
            status=self.status(),
            ts=self.wall(),
            boot=self.boot,
            seq=self.seq,
            interval_ms=self.cfg.advertise_spare_ms,
            pubkey=self.identity.public_key,
            gossip=gossip,
            leaving=leaving,
        )
        return beacon

    def seal(self, beacon: proto.Beacon) -> bytes:
        """The datagram for ``beacon``; gossip entries are left out until it fits ``MAX_SEALED``."""
        while True:
            datagram = seal_beacon(self.keys, self.identity.signing_key, proto.encode(beacon))
            if len(datagram) <= MAX_SEALED or not beacon.gossip:
                return datagram
            beacon = dataclasses.replace(beacon, gossip=beacon.gossip[: len(beacon.gossip) // 2])

    async def goodbye(self) -> None:
        """The last beacon, marked ``leaving``: peers drop this node at once instead of timing it out."""
        try:
            await self.send_once(leaving=True)
        except (OSError, VestaError) as exc:
            log.debug("could not say goodbye: %s", exc)

    async def send_once(self, leaving: bool = False) -> None:
        await self._resolve_seeds()
        if self.transport is None:
            return
        datagram = self.seal(self.make_beacon(leaving))
        for target in self.targets():
            try:
                self.transport.sendto(datagram, target)
                self.counters["beacons_sent"] += 1
            except OSError as exc:
                self.counters["udp_errors"] += 1
                self._warn_once("send", target[0], "cannot send beacon to %s:%d: %s", *target, exc)

    # ------------------------------------------------------------ receiving

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self._receive(data, addr)
        except ProtocolError as exc:
            reason = _reason(exc)
            self.counters[f"dropped_{reason}"] += 1
            self._warn_once(reason, addr[0], "dropped beacon from %s:%d (%s): %s", addr[0], addr[1],
                            reason, exc)
        except Exception:  # a bug must not take discovery down; count it and keep serving
            self.counters["dropped_internal"] += 1
            log.exception("unexpected error handling a datagram from %s:%d", *addr)

    def _receive(self, data: bytes, addr: tuple[str, int]) -> None:
        self.counters["datagrams_received"] += 1
        if len(data) > MAX_DATAGRAM:
            raise Dropped("oversize", f"{len(data)} bytes")
        message, signature = open_beacon(self.keys, data)
        msg = proto.decode(message)
        if not isinstance(msg, proto.Beacon):
            raise Dropped("malformed", f"expected a beacon, got {type(msg).__name__}")
        # Cheap drops first: what follows reads state but changes nothing, so a beacon dropped here (our
        # own echo, a clock out of the window, a duplicate, a replay, no room) costs no signature check.
        # Only a beacon whose signature holds changes anything (freshness, the table).
        if msg.status.fingerprint == self.identity.fingerprint:
            self.counters["own_beacons"] += 1
            return
        skew = msg.ts - self.wall()
        if skew > self.cfg.max_clock_skew_s:
            raise Dropped("future", f"timestamp {skew:.0f}s ahead (check the clocks; NTP?)")
        if -skew > self.cfg.max_clock_skew_s:
            raise Dropped("stale", f"timestamp {-skew:.0f}s old")
        fresh = self.table.peek_freshness(msg)
        if fresh is Freshness.DUPLICATE:
            self.counters["duplicates"] += 1
            return
        if fresh is Freshness.REPLAY:
            raise Dropped("replay", f"seq {msg.seq} already seen")
        if not msg.leaving and not self.table.admits(msg.status.fingerprint, addr):
            raise Dropped("table_full", f"peer table holds {len(self.table)} peers (max_peers)")
        verify_signature(msg.pubkey, message, signature)
        if fingerprint(msg.pubkey) != msg.status.fingerprint:
            raise AuthError("beacon fingerprint does not match its key")
        self.table.freshness(msg)   # remembered only now that it is authentic
        if msg.leaving:
            self.counters["goodbyes"] += 1
            gone = self.table.forget(msg.status.fingerprint, "said goodbye (shutting down)")
            if gone is not None:
                self.on_change(gone)
            return
        known = len(self.table)
        changes = self.table.observe(msg, addr)
        if msg.status.fingerprint not in self.table:
            raise Dropped("table_full", f"peer table holds {known} peers (max_peers)")
        self.counters["beacons_accepted"] += 1
        for change in changes:
            self.on_change(change)
        self.on_beacon()
        self._learn_gossip(msg)

    def _learn_gossip(self, msg: proto.Beacon) -> None:
        now = time.monotonic()
        for entry in msg.gossip:
            if entry.fingerprint == self.identity.fingerprint or entry.fingerprint in self.table:
                continue
            target = (entry.host, entry.dport)
            if target not in self._gossip_targets:
                log.info("learned of peer=%s addr=%s:%d by gossip from %s", entry.fingerprint[:8],
                         entry.host, entry.dport, msg.status.name)
            self._gossip_targets[target] = (entry.fingerprint, now)
            self._gossip_targets.move_to_end(target)
            while len(self._gossip_targets) > MAX_GOSSIP_TARGETS:
                self._gossip_targets.popitem(last=False)


def _reason(exc: ProtocolError) -> str:
    if isinstance(exc, Dropped):
        return exc.reason
    if isinstance(exc, AuthError):
        return "bad_auth"
    return "malformed"
