"""Length-prefixed frames over asyncio streams, plain (control socket) or sealed (peer links).

Frame: a 4-byte big-endian length, then that many bytes. The length is
checked against the hard limit *before* anything is read or allocated.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Iterable

from nacl.signing import SigningKey

from vesta import proto
from vesta.checks import MAX_FRAME  # bytes; a sealed frame carries at most MAX_FRAME - 16 of payload
from vesta.crypto import FederationKeys, Handshake, Session
from vesta.errors import FrameTooLarge, PeerUnavailable, ProtocolError

MAX_HANDSHAKE_FRAME = 1024        # a hello or auth frame is ~120 bytes
MAX_BUFFERED = 64 * 1024 * 1024   # bytes of large frames being received at once, over all peer links
SMALL_FRAME = 256 * 1024 + 1024   # frames up to this (a file piece) need no share of MAX_BUFFERED
FRAME_BODY_S = 60.0               # a large frame must arrive whole within this once its turn has come
_HEADER = struct.Struct(">I")


class FrameBudget:
    """Bytes of large frames that may be buffered at once, over every link of the process. A reader whose
    frame does not fit waits (and so reads nothing more: TCP slows its sender) until others are through.
    Loop-agnostic: waiters are futures of whichever loop runs."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, size: int) -> None:
        size = min(size, self.total)
        if not self._waiters and self.used + size <= self.total:
            self.used += size
            return
        fut = asyncio.get_running_loop().create_future()
        entry = (size, fut)
        self._waiters.append(entry)
        try:
            await fut
        except BaseException:
            if entry in self._waiters:
                self._waiters.remove(entry)
            elif fut.done() and not fut.cancelled():   # granted just as we were cancelled: give it back
                self.release(size)
            raise

    def release(self, size: int) -> None:
        self.used -= min(size, self.total)
        while self._waiters:   # first come, first served
            size, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self.used + size > self.total:
                break
            self._waiters.popleft()
            self.used += size
            fut.set_result(None)


BUFFERS = FrameBudget(MAX_BUFFERED)   # the process's peer links share it


async def read_frame(reader: asyncio.StreamReader, limit: int = MAX_FRAME, budget: FrameBudget | None = None) -> bytes:
    """Read one frame; EOF becomes PeerUnavailable, an oversized prefix FrameTooLarge. With ``budget``, a
    frame larger than ``SMALL_FRAME`` waits for its share before its body is read, and must then arrive
    within ``FRAME_BODY_S`` (a half-sent frame cannot hold the share for ever)."""
    try:
        (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
        if size > limit:
            raise FrameTooLarge(f"frame of {size} bytes exceeds the {limit}-byte limit")
        if budget is None or size <= SMALL_FRAME:
            return await reader.readexactly(size)
        await budget.acquire(size)
        try:
            async with asyncio.timeout(FRAME_BODY_S):
                return await reader.readexactly(size)
        except TimeoutError:
            raise ProtocolError(f"a frame of {size} bytes did not arrive within {FRAME_BODY_S:g}s") from None
        finally:
            budget.release(size)
    except asyncio.IncompleteReadError as exc:
        raise PeerUnavailable("connection closed mid-frame" if exc.partial else "connection closed") from exc
    except (ConnectionError, OSError) as exc:
        raise PeerUnavailable(f"connection lost: {exc}") from exc


def pack_frame(payload: bytes, limit: int = MAX_FRAME) -> bytes:
    if len(payload) > limit:
        raise FrameTooLarge(f"refusing to send a {len(payload)}-byte frame (limit {limit})")
    return _HEADER.pack(len(payload)) + payload


async def write_frame(writer: asyncio.StreamWriter, payload: bytes, limit: int = MAX_FRAME) -> None:
    await write_frames(writer, (payload,), limit)


async def write_frames(writer: asyncio.StreamWriter, payloads: Iterable[bytes], limit: int = MAX_FRAME) -> None:
    """Frames back to back in one write (one wake-up for the reader)."""
    writer.write(b"".join(pack_frame(p, limit) for p in payloads))
    try:
        await writer.drain()
    except (ConnectionError, OSError) as exc:
        raise PeerUnavailable(f"connection lost: {exc}") from exc


async def handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    keys: FederationKeys,
    signer: SigningKey,
    *,
    initiator: bool,
    timeout: float,
) -> Session:
    """Run the handshake drawn in ``vesta.crypto``; the whole exchange is bounded by ``timeout``."""
    hs = Handshake(keys, signer, initiator=initiator)
    try:
        async with asyncio.timeout(timeout):
            if initiator:
                await write_frame(writer, hs.hello())
                hs.read_hello(await read_frame(reader, MAX_HANDSHAKE_FRAME))
                frame, send = hs.auth()
                await write_frame(writer, frame)
                return hs.read_auth(await read_frame(reader, MAX_HANDSHAKE_FRAME), send)
            hs.read_hello(await read_frame(reader, MAX_HANDSHAKE_FRAME))
            await write_frame(writer, hs.hello())
            frame, send = hs.auth()
            session = hs.read_auth(await read_frame(reader, MAX_HANDSHAKE_FRAME), send)
            await write_frame(writer, frame)
            return session
    except TimeoutError as exc:
        raise ProtocolError(f"handshake timed out after {timeout:g}s") from exc


class Channel:
    """A sealed, authenticated message stream to one peer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: Session) -> None:
        self.reader = reader
        self.writer = writer
        self.session = session
        self.budget: FrameBudget | None = BUFFERS   # large frames share the process's buffer bound
        self._send_lock = asyncio.Lock()

    @property
    def peer_fingerprint(self) -> str:
        return self.session.peer_fingerprint

    async def send(self, msg: proto.Message, *more: proto.Message) -> None:
        """Send ``msg`` (and ``more`` right behind it, as back-to-back frames in one write: one wake-up
        of the peer, not one per message)."""
        # Sealing and writing under one lock: the counter nonce must match the write order.
        async with self._send_lock:
            await write_frames(self.writer, [self.session.send.seal(proto.encode(m)) for m in (msg, *more)])

    async def recv(self) -> proto.Message:
        return proto.decode(self.session.recv.open(await read_frame(self.reader, budget=self.budget)))

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass
