"""Peer links: authenticated TCP connections between daemons.

Outbound, ``LinkPool`` keeps one connection per peer and multiplexes
requests over it by request id (``rid``), so a request costs one round trip,
not a new handshake. Inbound, ``serve`` runs the responder side of the
handshake and hands each message to the daemon's handler in its own task.

Every failure on an inbound link (handshake timeout or failure, bad frame,
oversized frame, wrong key) closes that one connection and is counted; the
daemon keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
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
_handshake_warn = WarnOnce(log, logging.INFO)

Handler = Callable[[proto.Message, Channel], Awaitable[proto.Message | None]]
CONNECT_TIMEOUT = 3.0
MAX_QUEUED = 1024        # messages waiting for one request's reader; a peer sending faster breaks that request
MAX_IN_FLIGHT = 256      # requests one inbound connection may have running at once


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
                if self.link.last_heard < began and not self.link.closed:
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
                 handshake_timeout: float) -> None:
        self.keys = keys
        self.identity = identity
        self.counters = counters
        self.handshake_timeout = handshake_timeout
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


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, keys: FederationKeys,
                identity: Identity, counters: Counter[str], handshake_timeout: float,
                handler: Handler, on_authenticated: Callable[[], None] = lambda: None) -> None:
    """Serve one inbound peer connection until it closes or misbehaves."""
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
    log.debug("link up %s", where)
    tasks: set[asyncio.Task[Any]] = set()

    async def answer(msg: proto.Message) -> None:
        reply = await handler(msg, channel)
        if reply is not None:
            with contextlib.suppress(PeerUnavailable):
                await channel.send(reply)

    try:
        while True:
            msg = await channel.recv()
            counters["link_messages"] += 1
            if len(tasks) >= MAX_IN_FLIGHT:
                counters["tcp_flooded"] += 1
                log.warning("closed link %s: more than %d requests in flight", where, MAX_IN_FLIGHT)
                break
            spawn(answer(msg), f"answer-{type(msg).__name__}", tasks)
    except PeerUnavailable:
        pass
    except ProtocolError as exc:
        counters["tcp_bad_frames"] += 1
        if isinstance(exc, FrameTooLarge):
            counters["tcp_oversize"] += 1
        log.warning("closed link %s: %s", where, exc)
    finally:
        await cancel_all(tasks)
        await channel.close()
