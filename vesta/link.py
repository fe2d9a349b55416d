"""Peer links: authenticated TCP connections between daemons.

Outbound, ``LinkPool`` keeps one connection per peer and multiplexes
requests over it by request id (``rid``), so a request costs one round trip,
not a new handshake. Inbound, ``serve`` runs the responder side of the
handshake and hands each message to the daemon's handler in its own task.

Every failure on an inbound link (handshake timeout or failure, bad frame,
oversized frame, wrong key) closes that one connection and is counted; the
daemon keeps serving.

Room for newcomers (``InboundGate``). Whatever strangers without the key or
idle key holders do, a new identity can still link up:

- a connection is turned away in ``connection_made``, before any task,
  buffer or crypto is spent on it, when its source address has opened more
  than ``ACCEPT_BURST`` connections at more than ``ACCEPT_RATE`` a second,
  or already holds ``MAX_HANDSHAKING_PER_SOURCE`` unfinished handshakes;
- when all ``MAX_HANDSHAKING`` handshake slots are taken, the newcomer is
  let in and the oldest unfinished handshake of the source holding the most
  is cut (an honest handshake takes one round trip; a stalled one is what
  holds a slot);
- an authenticated link that has had no request running and no message for
  ``idle_timeout`` seconds is closed (the peer's pool reconnects on its next
  request); one identity keeps at most ``MAX_LINKS_PER_PEER`` links, and when
  ``MAX_INBOUND`` links are up, a new one replaces the idlest link (of the
  identity holding the most) instead of being refused. Only links with
  requests running on every one of them make a newcomer wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from vesta import proto
from vesta.crypto import FederationKeys
from vesta.errors import AuthError, FrameTooLarge, PeerUnavailable, ProtocolError
from vesta.identity import Identity
from vesta.logs import WarnOnce
from vesta.tasks import cancel_all, spawn
from vesta.wire import Channel, handshake

log = logging.getLogger(__name__)

SILENT_AFTER_S = 0.25  # a wait of at least this long with not a frame on the whole link: the link is
                       # dead (a request timing out); the last moments of a longer wait prove nothing
_handshake_warn = WarnOnce(log, logging.INFO)

Handler = Callable[[proto.Message, Channel], Awaitable[proto.Message | None]]
CONNECT_TIMEOUT = 3.0
MAX_QUEUED = 1024        # messages waiting for one request's reader; a peer sending faster breaks that request
MAX_IN_FLIGHT = 256      # requests one inbound connection may have running at once; the next one waits
STALL_S = 60.0           # ... and if none of them ends within this, the link is closed
MAX_INBOUND = 64              # authenticated inbound links at once
MAX_HANDSHAKING = 16          # inbound connections not authenticated yet
MAX_HANDSHAKING_PER_SOURCE = 4    # ... from one source address: one host cannot take every slot
MAX_LINKS_PER_PEER = 4        # authenticated inbound links of one identity (a pool uses one)
IDLE_LINK_S = 300.0           # an inbound link with nothing running and nothing heard this long is closed
ACCEPT_RATE = 20.0            # connections a second one source address may open, on average ...
ACCEPT_BURST = 64             # ... and at once
MAX_SOURCES = 4096            # source addresses whose rate is remembered (the least recent are forgotten)


class _Link:
    """One outbound connection and the conversations (by rid) waiting on it."""

    def __init__(self, channel: Channel, on_close: Callable[[_Link], None], addr: tuple[str, int]) -> None:
        self.channel = channel
        self.addr = addr
        self.pending: dict[int, asyncio.Queue[proto.Message | PeerUnavailable]] = {}
        self.closed = False
        self.last_heard = time.monotonic()   # when the peer last sent anything on this link
        self._on_close = on_close
        self.reader = spawn(self._read(), f"link-reader-{channel.peer_fingerprint[:8]}")

    async def _read(self) -> None:
        error = PeerUnavailable("connection closed")
        try:
            while True:
                msg = await self.channel.recv()
                self.last_heard = time.monotonic()
                rid = getattr(msg, "rid", None)
                queue = self.pending.get(rid) if isinstance(rid, int) else None
                if queue is not None and isinstance(rid, int):
                    if queue.qsize() >= MAX_QUEUED:  # memory stays bounded whatever the peer sends
                        del self.pending[rid]
                        queue.put_nowait(PeerUnavailable("peer sent more than this request could take"))
                        continue
                    queue.put_nowait(msg)
        except (PeerUnavailable, ProtocolError) as exc:
            error = exc if isinstance(exc, PeerUnavailable) else PeerUnavailable(f"link broken: {exc}")
        finally:
            self.closed = True
            for queue in self.pending.values():
                queue.put_nowait(error)
            self._on_close(self)
            await self.channel.close()


class Stream:
    """One request and every message the peer sends back for it (same rid)."""

    def __init__(self, link: _Link, rid: int, peer: str) -> None:
        self.link = link
        self.rid = rid
        self.peer = peer
        self.queue: asyncio.Queue[proto.Message | PeerUnavailable] = asyncio.Queue()
        link.pending[rid] = self.queue
        if link.closed:
            self.queue.put_nowait(PeerUnavailable("connection closed"))

    async def send(self, msg: proto.Message) -> None:
        await self.link.channel.send(msg)

    async def next(self, timeout: float | None) -> proto.Message:
        """The next message for this rid; PeerUnavailable if the link dies or nothing comes in time."""
        if not self.queue.empty():   # already here (a Result right behind its Accept): no timer to set up
            item = self.queue.get_nowait()
        else:
            began = time.monotonic()
            try:
                async with asyncio.timeout(timeout):
                    item = await self.queue.get()
            except TimeoutError as exc:
                if (timeout is not None and timeout >= SILENT_AFTER_S and self.link.last_heard < began
                        and not self.link.closed):
                    # Not a word on the whole link all that time: a frozen or vanished peer behind a connection
                    # that still looks open. Close it, so the next request reconnects instead of waiting again.
                    log.info("closing the link to %s: silent for %gs", self.peer, timeout)
                    await self.link.channel.close()
                raise PeerUnavailable(f"no answer from peer {self.peer} within {timeout:g}s") from exc
        if isinstance(item, PeerUnavailable):
            self.queue.put_nowait(item)  # every later call sees the same end
            raise item
        return item

    def close(self) -> None:
        self.link.pending.pop(self.rid, None)


class LinkPool:
    """Outbound links to peers, one per fingerprint, created on first use."""

    def __init__(self, keys: FederationKeys, identity: Identity, counters: Counter[str],
                 handshake_timeout: float, on_linked: Callable[[str], None] = lambda fingerprint: None) -> None:
        self.keys = keys
        self.identity = identity
        self.counters = counters
        self.handshake_timeout = handshake_timeout
        self.on_linked = on_linked   # (fingerprint) a handshake with it succeeded
        self._links: dict[str, _Link] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._rids = itertools.count(1)

    async def _link(self, fingerprint: str, addr: tuple[str, int]) -> _Link:
        link = self._links.get(fingerprint)
        if link is not None and link.addr == addr:
            return link
        lock = self._connecting.setdefault(fingerprint, asyncio.Lock())
        async with lock:
            link = self._links.get(fingerprint)
            if link is not None and link.addr == addr:
                return link
            if link is not None:  # the peer moved (a laptop changed networks): the old link is stale
                self._links.pop(fingerprint, None)
                await link.channel.close()
            channel = await self._connect(fingerprint, addr)
            link = _Link(channel, lambda dead: self._forget(fingerprint, dead), addr)
            self._links[fingerprint] = link
            return link

    async def _connect(self, fingerprint: str, addr: tuple[str, int]) -> Channel:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(addr[0], addr[1])
        except (OSError, TimeoutError) as exc:
            raise PeerUnavailable(f"cannot connect to {addr[0]}:{addr[1]}: {exc or 'timed out'} "
                                  "(is TCP port open on that machine?)") from exc
        try:
            session = await handshake(reader, writer, self.keys, self.identity.signing_key,
                                      initiator=True, timeout=self.handshake_timeout)
        except ProtocolError as exc:
            writer.close()
            self.counters["link_handshake_failed"] += 1
            raise PeerUnavailable(f"handshake with {addr[0]}:{addr[1]} failed: {exc}") from exc
        except PeerUnavailable:
            writer.close()
            raise
        if session.peer_fingerprint != fingerprint:
            writer.close()
            self.counters["link_wrong_identity"] += 1
            raise PeerUnavailable(f"{addr[0]}:{addr[1]} answered as {session.peer_fingerprint[:8]}, "
                                  f"expected {fingerprint[:8]}")
        self.counters["links_opened"] += 1
        self.on_linked(fingerprint)
        return Channel(reader, writer, session)

    def _forget(self, fingerprint: str, dead: _Link) -> None:
        if self._links.get(fingerprint) is dead:
            del self._links[fingerprint]

    async def open(self, fingerprint: str, addr: tuple[str, int], make: Callable[[int], proto.Message],
                   name: str = "") -> Stream:
        """Send ``make(rid)`` and return the stream of the peer's answers; close() it when done."""
        link = await self._link(fingerprint, addr)
        stream = Stream(link, next(self._rids), name or fingerprint[:8])
        try:
            await stream.send(make(stream.rid))
        except BaseException:
            stream.close()
            raise
        return stream

    async def request(self, fingerprint: str, addr: tuple[str, int],
                      make: Callable[[int], proto.Message], timeout: float) -> proto.Message:
        """Send ``make(rid)`` to the peer and wait for the one reply carrying the same rid."""
        stream = await self.open(fingerprint, addr, make)
        try:
            return await stream.next(timeout)
        finally:
            stream.close()

    async def close(self) -> None:
        links = list(self._links.values())
        self._links.clear()
        for link in links:
            await link.channel.close()
        await cancel_all({link.reader for link in links})


class Inbound:
    """One inbound connection, from accept to close (``InboundGate``)."""

    def __init__(self, source: str, task: asyncio.Task[Any] | None) -> None:
        self.source = source
        self.task = task
        self.since = time.monotonic()
        self.fingerprint: str | None = None   # once authenticated
        self.last_active = self.since         # last message heard or last request finished
        self.busy = 0                         # requests running

    def idle(self) -> bool:
        return self.fingerprint is not None and self.busy == 0

    def cut(self) -> None:
        if self.task is not None:
            self.task.cancel()


class InboundGate:
    """Who may connect, and who makes room for whom (see the module doc)."""

    def __init__(self, counters: Counter[str], *, max_links: int = MAX_INBOUND,
                 max_handshaking: int = MAX_HANDSHAKING, per_source: int = MAX_HANDSHAKING_PER_SOURCE,
                 per_peer: int = MAX_LINKS_PER_PEER, rate: float = ACCEPT_RATE, burst: int = ACCEPT_BURST,
                 clock: Callable[[], float] = time.monotonic,
                 on_linked: Callable[[str], None] = lambda fingerprint: None) -> None:
        self.counters = counters
        self.on_linked = on_linked   # an identity completed a handshake and its link is kept
        self.max_links = max_links
        self.max_handshaking = max_handshaking
        self.per_source = per_source
        self.per_peer = per_peer
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.closed = False
        self.handshaking: list[Inbound] = []   # oldest first
        self.links: list[Inbound] = []
        self._by_source: Counter[str] = Counter()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()   # source -> (tokens, when)

    def allow(self, source: str) -> bool:
        """Whether a connection from ``source`` may start a handshake at all (cheap: no state is made)."""
        if self.closed:
            return False
        if self._by_source[source] >= self.per_source:
            self.counters["tcp_rejected_busy"] += 1
            return False
        now = self.clock()
        tokens, when = self._buckets.pop(source, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - when) * self.rate)
        if tokens < 1.0:
            self._buckets[source] = (tokens, now)
            self.counters["tcp_rejected_rate"] += 1
            return False
        self._buckets[source] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_SOURCES:
            self._buckets.popitem(last=False)
        return True

    def opened(self, source: str, task: asyncio.Task[Any] | None) -> Inbound:
        """A connection ``allow`` let in starts its handshake; if every slot is taken, one is cut for it."""
        if len(self.handshaking) >= self.max_handshaking:
            most = max(self._by_source.values())
            victim = next(c for c in self.handshaking if self._by_source[c.source] == most)   # oldest of theirs
            self._forget_handshake(victim)
            self.counters["tcp_handshakes_cut"] += 1
            victim.cut()
        conn = Inbound(source, task)
        self.handshaking.append(conn)
        self._by_source[source] += 1
        return conn

    def authenticated(self, conn: Inbound, fingerprint: str) -> bool:
        """The handshake is done: the link is kept (making room if needed), or False if there is none."""
        self._forget_handshake(conn)
        conn.fingerprint = fingerprint
        conn.last_active = self.clock()
        same = [c for c in self.links if c.fingerprint == fingerprint]
        if len(same) >= self.per_peer:
            victims = [c for c in same if c.idle()]
        elif len(self.links) >= self.max_links:
            victims = [c for c in self.links if c.idle()]
        else:
            victims = None
        if victims is not None:
            if not victims:
                self.counters["tcp_rejected_busy"] += 1
                return False
            per_peer = Counter(c.fingerprint for c in self.links)
            victim = min(victims, key=lambda c: (-per_peer[c.fingerprint], c.last_active))
            self.links.remove(victim)
            self.counters["links_evicted"] += 1
            victim.cut()
        self.links.append(conn)
        self.on_linked(fingerprint)
        return True

    def closed_conn(self, conn: Inbound) -> None:
        self._forget_handshake(conn)
        if conn in self.links:
            self.links.remove(conn)

    def _forget_handshake(self, conn: Inbound) -> None:
        if conn in self.handshaking:
            self.handshaking.remove(conn)
            self._by_source[conn.source] -= 1
            if self._by_source[conn.source] <= 0:
                del self._by_source[conn.source]

    def close(self) -> None:
        self.closed = True


class _GatedProtocol(asyncio.StreamReaderProtocol):
    """A stream protocol that asks the gate first: a connection turned away costs no task and no writer."""

    def __init__(self, gate: InboundGate, on_connection: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                                  Awaitable[None]]) -> None:
        self._gate = gate
        super().__init__(asyncio.StreamReader(), on_connection)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername") or ("?",)
        if not self._gate.allow(str(peer[0])):
            if isinstance(transport, asyncio.Transport):
                transport.abort()   # a reset: no FIN handshake, no TIME_WAIT here
            else:
                transport.close()
            return
        super().connection_made(transport)


async def listen(gate: InboundGate, on_connection: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                            Awaitable[None]],
                 host: str | None = None, port: int | None = None, **kw: Any) -> asyncio.Server:
    """``asyncio.start_server`` (``kw``: ``sock=`` and the like), with ``gate.allow`` asked before a
    connection costs anything."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _GatedProtocol(gate, on_connection), host, port, **kw)


async def accept(gate: InboundGate, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, **kw: Any) -> None:
    """Serve one connection ``listen`` let in, under the gate's bounds (``serve``'s keywords in ``kw``)."""
    source = str((writer.get_extra_info("peername") or ("?",))[0])
    conn = gate.opened(source, asyncio.current_task())
    try:
        await serve(reader, writer, conn=conn, gate=gate, **kw)
    except asyncio.CancelledError:
        writer.close()   # cut to make room, or shutting down (3.11 would log a cancelled connection task)
    finally:
        gate.closed_conn(conn)


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, keys: FederationKeys,
                identity: Identity, counters: Counter[str], handshake_timeout: float,
                handler: Handler, on_authenticated: Callable[[], None] = lambda: None,
                conn: Inbound | None = None, gate: InboundGate | None = None,
                idle_timeout: float | None = None, inline: tuple[type, ...] = ()) -> None:
    """Serve one inbound peer connection until it closes or misbehaves (or, with ``idle_timeout``, has had
    no request running and no message for that long). With ``gate``, the link is kept only if it lets it.

    Each request runs in a task of its own; messages of the ``inline`` types (ones the handler deals with
    at once, without waiting: a file piece) are handled in the read loop instead. With
    ``MAX_IN_FLIGHT`` requests running, the loop stops reading until one ends (TCP then slows the peer
    down: backpressure, not a cut link); only if none ends within ``STALL_S`` is the link closed."""
    peer = writer.get_extra_info("peername") or ("?", 0)
    where = f"addr={peer[0]}:{peer[1]}"
    counters["tcp_accepted"] += 1
    try:
        session = await handshake(reader, writer, keys, identity.signing_key, initiator=False,
                                  timeout=handshake_timeout)
    except (ProtocolError, PeerUnavailable) as exc:
        counters["tcp_handshake_failed"] += 1
        if isinstance(exc, AuthError):
            counters["tcp_bad_auth"] += 1
        _handshake_warn(type(exc).__name__, str(peer[0]), "dropped inbound connection %s: handshake failed: %s",
                        where, exc)
        writer.close()
        return
    on_authenticated()
    channel = Channel(reader, writer, session)
    where = f"peer={session.peer_fingerprint[:8]} {where}"
    if gate is not None and conn is not None and not gate.authenticated(conn, session.peer_fingerprint):
        log.info("closed link %s: every inbound link has requests running", where)
        await channel.close()
        return
    log.debug("link up %s", where)
    await _ServedLink(channel, handler, counters, where, conn=conn, clock=time.monotonic if gate is None
                      else gate.clock, idle_timeout=idle_timeout, inline=inline).run()


class _ServedLink:
    """An authenticated inbound link: its requests, each in a task of its own, and its idle timer."""

    def __init__(self, channel: Channel, handler: Handler, counters: Counter[str], where: str, *,
                 conn: Inbound | None, clock: Callable[[], float], idle_timeout: float | None,
                 inline: tuple[type, ...]) -> None:
        self.channel = channel
        self.handler = handler
        self.counters = counters
        self.where = where
        self.conn = conn
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.inline = inline
        self.tasks: set[asyncio.Task[Any]] = set()
        self.idle = None if idle_timeout is None else asyncio.timeout(None)
        self.reading = True   # the idle timer may be moved only while the read loop is inside it

    def rest(self) -> None:
        """Nothing running: the link may idle from now."""
        if self.idle is not None and self.idle_timeout is not None and not self.tasks and self.reading:
            self.idle.reschedule(asyncio.get_running_loop().time() + self.idle_timeout)

    async def _reply(self, msg: proto.Message) -> None:
        reply = await self.handler(msg, self.channel)
        if reply is not None:
            with contextlib.suppress(PeerUnavailable):
                await self.channel.send(reply)

    async def answer(self, msg: proto.Message) -> None:
        try:
            await self._reply(msg)
        finally:
            if self.conn is not None:
                self.conn.busy -= 1
                self.conn.last_active = self.clock()

    async def answer_inline(self, msg: proto.Message) -> None:
        try:
            await self._reply(msg)
        except Exception:   # as a task's failure would be: logged, and the link serves on
            log.exception("handling %s from %s failed", type(msg).__name__, self.where)

    async def run(self) -> None:
        counters = self.counters
        try:
            async with self.idle if self.idle is not None else contextlib.nullcontext():
                self.rest()
                while await self._next():
                    pass
        except TimeoutError:
            counters["links_idle_closed"] += 1
            log.debug("closed link %s: idle for %gs", self.where, self.idle_timeout)
        except PeerUnavailable:
            pass
        except ProtocolError as exc:
            counters["tcp_bad_frames"] += 1
            if isinstance(exc, FrameTooLarge):
                counters["tcp_oversize"] += 1
            log.warning("closed link %s: %s", self.where, exc)
        finally:
            self.reading = False
            await cancel_all(self.tasks)
            await self.channel.close()

    async def _next(self) -> bool:
        """Read and dispatch one message; False when the link must close (flooded)."""
        msg = await self.channel.recv()
        self.counters["link_messages"] += 1
        if self.conn is not None:
            self.conn.last_active = self.clock()
        if isinstance(msg, self.inline):
            await self.answer_inline(msg)
            return True
        if len(self.tasks) >= MAX_IN_FLIGHT:   # hold this one (and read nothing more) until one ends
            self.counters["link_backpressure"] += 1
            done, _ = await asyncio.wait(set(self.tasks), timeout=STALL_S, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                self.counters["tcp_flooded"] += 1
                log.warning("closed link %s: %d requests in flight and none ended in %gs", self.where,
                            len(self.tasks), STALL_S)
                return False
        if self.conn is not None:
            self.conn.busy += 1
        if self.idle is not None:
            self.idle.reschedule(None)
        # rest() runs after spawn's own callback, which took the task out of ``tasks``
        spawn(self.answer(msg), f"answer-{type(msg).__name__}", self.tasks).add_done_callback(lambda _: self.rest())
        return True
