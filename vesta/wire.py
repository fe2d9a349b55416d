"""Length-prefixed frames over asyncio streams, plain (control socket) or sealed (peer links).

Frame: a 4-byte big-endian length, then that many bytes. The length is
checked against the hard limit *before* anything is read or allocated.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterable

from nacl.signing import SigningKey

from vesta import proto
from vesta.checks import MAX_FRAME  # bytes; a sealed frame carries at most MAX_FRAME - 16 of payload
from vesta.crypto import FederationKeys, Handshake, Session
from vesta.errors import FrameTooLarge, PeerUnavailable, ProtocolError

MAX_HANDSHAKE_FRAME = 1024        # a hello or auth frame is ~120 bytes
_HEADER = struct.Struct(">I")


async def read_frame(reader: asyncio.StreamReader, limit: int = MAX_FRAME) -> bytes:
    """Read one frame; EOF becomes PeerUnavailable, an oversized prefix FrameTooLarge."""
    try:
        (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
        if size > limit:
            raise FrameTooLarge(f"frame of {size} bytes exceeds the {limit}-byte limit")
        return await reader.readexactly(size)
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
        return proto.decode(self.session.recv.open(await read_frame(self.reader)))

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass
