"""wire: length-prefixed frames and the sealed handshake over real asyncio streams."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator

import pytest
from nacl.signing import SigningKey

from vesta import crypto, proto, wire
from vesta.crypto import FederationKeys
from vesta.errors import AuthError, FrameTooLarge, PeerUnavailable, ProtocolError
from vesta.wire import SMALL_FRAME, FrameBudget, pack_frame, read_frame

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture(scope="module")
def keys() -> FederationKeys:
    return crypto.derive_keys("wire test federation key, 32+ chars")


@pytest.fixture(scope="module")
def other_keys() -> FederationKeys:
    return crypto.derive_keys("some other federation's key, 32+ chars")


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Stream, Stream]]:
    """Two connected stream ends over a socketpair."""
    a, b = socket.socketpair()
    end_a = await asyncio.open_connection(sock=a)
    end_b = await asyncio.open_connection(sock=b)
    try:
        yield end_a, end_b
    finally:
        await _close(end_a[1])
        await _close(end_b[1])


@pytest.fixture
async def tcp_pair() -> AsyncIterator[tuple[Stream, Stream]]:
    """Two connected stream ends over TCP on 127.0.0.1, port 0."""
    accepted: asyncio.Queue[Stream] = asyncio.Queue()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await asyncio.open_connection("127.0.0.1", port)
    async with asyncio.timeout(5):
        served = await accepted.get()
    try:
        yield client, served
    finally:
        await _close(client[1])
        await _close(served[1])
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------- frames


@pytest.mark.parametrize("size", [0, 1, 1000, 1 << 20])
async def test_frame_round_trip(pair: tuple[Stream, Stream], size: int) -> None:
    (_, wa), (rb, _) = pair
    payload = bytes(i % 251 for i in range(size))
    async with asyncio.timeout(5):
        _, got = await asyncio.gather(wire.write_frame(wa, payload), wire.read_frame(rb))
    assert got == payload


async def test_frames_keep_their_boundaries(tcp_pair: tuple[Stream, Stream]) -> None:
    (_, wa), (rb, _) = tcp_pair
    payloads = [b"", b"a", b"bc" * 100, b"", b"end"]
    # All in one write: the reader must split them by their prefixes alone.
    wa.write(b"".join(wire.pack_frame(p) for p in payloads))
    await wa.drain()
    async with asyncio.timeout(5):
        got = [await wire.read_frame(rb) for _ in payloads]
    assert got == payloads


def test_pack_frame_layout() -> None:
    assert wire.pack_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert wire.pack_frame(b"") == b"\x00\x00\x00\x00"


def test_pack_frame_refuses_oversize() -> None:
    assert len(wire.pack_frame(b"x" * 10, limit=10)) == 14
    with pytest.raises(FrameTooLarge):
        wire.pack_frame(b"x" * 11, limit=10)
    with pytest.raises(FrameTooLarge):
        wire.pack_frame(bytes(wire.MAX_FRAME + 1))


async def test_write_frame_oversize_writes_nothing(pair: tuple[Stream, Stream]) -> None:
    (_, wa), (rb, _) = pair
    with pytest.raises(FrameTooLarge):
        await wire.write_frame(wa, b"x" * 11, limit=10)
    await wire.write_frame(wa, b"next")
    async with asyncio.timeout(5):
        assert await wire.read_frame(rb) == b"next"  # no half-written oversized frame before it


@pytest.mark.parametrize(("limit", "announced"), [(wire.MAX_FRAME, wire.MAX_FRAME + 1), (10, 11), (0, 1),
                                                 (wire.MAX_FRAME, 0xFFFFFFFF)])
async def test_oversized_prefix_fails_before_the_body(pair: tuple[Stream, Stream], limit: int, announced: int) -> None:
    (_, wa), (rb, _) = pair
    wa.write(struct.pack(">I", announced))  # the header only: no body is ever sent
    await wa.drain()
    async with asyncio.timeout(2):  # would hang in readexactly if the body were awaited first
        with pytest.raises(FrameTooLarge):
            await wire.read_frame(rb, limit)


async def test_frame_at_the_limit_is_accepted(pair: tuple[Stream, Stream]) -> None:
    (_, wa), (rb, _) = pair
    await wire.write_frame(wa, b"x" * 10, limit=10)
    async with asyncio.timeout(2):
        assert await wire.read_frame(rb, 10) == b"x" * 10


@pytest.mark.parametrize(
    "sent", [b"", b"\x00\x00", b"\x00\x00\x00\x0aabc"], ids=["nothing", "half-header", "half-body"]
)
async def test_eof_is_peer_unavailable(pair: tuple[Stream, Stream], sent: bytes) -> None:
    (_, wa), (rb, _) = pair
    wa.write(sent)
    await wa.drain()
    wa.write_eof()
    async with asyncio.timeout(2):
        with pytest.raises(PeerUnavailable) as info:
            await wire.read_frame(rb)
    assert ("mid-frame" in str(info.value)) == bool(sent)


# ---------------------------------------------------------------- handshake


async def _handshake_pair(
    pair: tuple[Stream, Stream], i_keys: FederationKeys, r_keys: FederationKeys, timeout: float = 2.0
) -> tuple[SigningKey, SigningKey, list[crypto.Session | BaseException]]:
    (ra, wa), (rb, wb) = pair
    i_signer, r_signer = SigningKey.generate(), SigningKey.generate()

    async def responder() -> crypto.Session:
        try:
            return await wire.handshake(rb, wb, r_keys, r_signer, initiator=False, timeout=timeout)
        except BaseException:
            wb.close()  # as a server does: a failed handshake drops the connection
            raise

    results = await asyncio.gather(
        wire.handshake(ra, wa, i_keys, i_signer, initiator=True, timeout=timeout),
        responder(),
        return_exceptions=True,
    )
    return i_signer, r_signer, list(results)


async def test_handshake_gives_interoperating_channels(tcp_pair: tuple[Stream, Stream], keys: FederationKeys) -> None:
    i_signer, r_signer, (i_sess, r_sess) = await _handshake_pair(tcp_pair, keys, keys)
    assert isinstance(i_sess, crypto.Session) and isinstance(r_sess, crypto.Session)
    (ra, wa), (rb, wb) = tcp_pair
    a, b = wire.Channel(ra, wa, i_sess), wire.Channel(rb, wb, r_sess)
    assert a.peer_fingerprint == crypto.fingerprint(bytes(r_signer.verify_key))
    assert b.peer_fingerprint == crypto.fingerprint(bytes(i_signer.verify_key))
    async with asyncio.timeout(5):
        for rid in range(3):
            await a.send(proto.Ping(rid=rid, ts=1000.0 + rid))
            assert await b.recv() == proto.Ping(rid=rid, ts=1000.0 + rid)
            await b.send(proto.Pong(rid=rid, ts=1000.0 + rid, name="responder"))
            assert await a.recv() == proto.Pong(rid=rid, ts=1000.0 + rid, name="responder")


async def test_concurrent_sends_keep_counter_order(pair: tuple[Stream, Stream], keys: FederationKeys) -> None:
    _, _, (i_sess, r_sess) = await _handshake_pair(pair, keys, keys)
    assert isinstance(i_sess, crypto.Session) and isinstance(r_sess, crypto.Session)
    (ra, wa), (rb, wb) = pair
    a, b = wire.Channel(ra, wa, i_sess), wire.Channel(rb, wb, r_sess)
    async with asyncio.timeout(5):
        await asyncio.gather(*(a.send(proto.Ping(rid=n, ts=1.0)) for n in range(50)))
        got = [await b.recv() for _ in range(50)]
    assert sorted(m.rid for m in got if isinstance(m, proto.Ping)) == list(range(50))


async def test_plaintext_does_not_cross_the_wire(pair: tuple[Stream, Stream], keys: FederationKeys) -> None:
    _, _, (i_sess, _) = await _handshake_pair(pair, keys, keys)
    assert isinstance(i_sess, crypto.Session)
    (ra, wa), (rb, _) = pair
    await wire.Channel(ra, wa, i_sess).send(proto.Pong(rid=1, ts=1.0, name="very-visible-name"))
    async with asyncio.timeout(2):
        raw = await wire.read_frame(rb)
    assert b"very-visible-name" not in raw


@pytest.mark.parametrize("initiator", [True, False])
async def test_handshake_with_silent_peer_times_out(
    pair: tuple[Stream, Stream], keys: FederationKeys, initiator: bool
) -> None:
    (ra, wa), _ = pair
    start = time.monotonic()
    with pytest.raises(ProtocolError, match="timed out"):
        await wire.handshake(ra, wa, keys, SigningKey.generate(), initiator=initiator, timeout=0.3)
    assert 0.25 <= time.monotonic() - start < 2.0


async def test_handshake_with_closed_peer_is_peer_unavailable(
    pair: tuple[Stream, Stream], keys: FederationKeys
) -> None:
    (ra, wa), (_, wb) = pair
    wb.close()
    async with asyncio.timeout(2):
        with pytest.raises(PeerUnavailable):
            await wire.handshake(ra, wa, keys, SigningKey.generate(), initiator=True, timeout=5.0)


async def test_wrong_key_fails_on_both_ends(
    tcp_pair: tuple[Stream, Stream], keys: FederationKeys, other_keys: FederationKeys
) -> None:
    start = time.monotonic()
    _, _, (i_result, r_result) = await _handshake_pair(tcp_pair, keys, other_keys, timeout=2.0)
    assert isinstance(r_result, AuthError), r_result
    assert isinstance(i_result, (ProtocolError, PeerUnavailable)), i_result
    assert time.monotonic() - start < 2.0  # the responder's close ends it, not the timeout


async def test_wrong_key_initiator_still_fails_when_responder_keeps_the_socket(
    pair: tuple[Stream, Stream], keys: FederationKeys, other_keys: FederationKeys
) -> None:
    (ra, wa), (rb, wb) = pair
    results = await asyncio.gather(
        wire.handshake(ra, wa, keys, SigningKey.generate(), initiator=True, timeout=0.3),
        wire.handshake(rb, wb, other_keys, SigningKey.generate(), initiator=False, timeout=0.3),
        return_exceptions=True,
    )
    assert isinstance(results[0], ProtocolError) and "timed out" in str(results[0])
    assert isinstance(results[1], AuthError)


async def test_oversized_handshake_frame_is_refused(pair: tuple[Stream, Stream], keys: FederationKeys) -> None:
    (ra, wa), (rb, wb) = pair
    wa.write(struct.pack(">I", wire.MAX_HANDSHAKE_FRAME + 1))
    await wa.drain()
    with pytest.raises(FrameTooLarge):
        await wire.handshake(rb, wb, keys, SigningKey.generate(), initiator=False, timeout=2.0)


# ---------------------------------------------------------------- channel receive path


@pytest.fixture
async def channels(
    pair: tuple[Stream, Stream], keys: FederationKeys
) -> tuple[wire.Channel, wire.Channel, crypto.Session]:
    _, _, (i_sess, r_sess) = await _handshake_pair(pair, keys, keys)
    assert isinstance(i_sess, crypto.Session) and isinstance(r_sess, crypto.Session)
    (ra, wa), (rb, wb) = pair
    return wire.Channel(ra, wa, i_sess), wire.Channel(rb, wb, r_sess), i_sess


async def test_channel_recv_tampered_frame_is_auth_error(
    channels: tuple[wire.Channel, wire.Channel, crypto.Session],
) -> None:
    a, b, i_sess = channels
    sealed = bytearray(i_sess.send.seal(proto.encode(proto.Ping(rid=1, ts=1.0))))
    sealed[len(sealed) // 2] ^= 0x01
    await wire.write_frame(a.writer, bytes(sealed))
    async with asyncio.timeout(2):
        with pytest.raises(AuthError):
            await b.recv()


async def test_channel_recv_replayed_frame_is_auth_error(
    channels: tuple[wire.Channel, wire.Channel, crypto.Session],
) -> None:
    a, b, i_sess = channels
    sealed = i_sess.send.seal(proto.encode(proto.Ping(rid=1, ts=1.0)))
    await wire.write_frame(a.writer, sealed)
    await wire.write_frame(a.writer, sealed)
    async with asyncio.timeout(2):
        assert await b.recv() == proto.Ping(rid=1, ts=1.0)
        with pytest.raises(AuthError):
            await b.recv()


async def test_channel_recv_authentic_garbage_is_protocol_error(
    channels: tuple[wire.Channel, wire.Channel, crypto.Session],
) -> None:
    a, b, i_sess = channels
    await wire.write_frame(a.writer, i_sess.send.seal(b"\xc1 not a message"))
    async with asyncio.timeout(2):
        with pytest.raises(ProtocolError) as info:
            await b.recv()
    assert not isinstance(info.value, AuthError)


async def test_channel_recv_after_peer_closes_is_peer_unavailable(
    channels: tuple[wire.Channel, wire.Channel, crypto.Session],
) -> None:
    a, b, _ = channels
    await a.close()
    async with asyncio.timeout(2):
        with pytest.raises(PeerUnavailable):
            await b.recv()


async def test_the_frame_budget_lets_large_frames_in_turn_and_forgets_a_cancelled_waiter() -> None:
    budget = FrameBudget(100)
    await budget.acquire(60)
    second = asyncio.ensure_future(budget.acquire(60))
    third = asyncio.ensure_future(budget.acquire(30))   # would fit, but waits its turn behind the second
    await asyncio.sleep(0)
    assert not second.done() and not third.done() and budget.used == 60
    third.cancel()
    await asyncio.gather(third, return_exceptions=True)
    budget.release(60)
    await second
    assert budget.used == 60 and not budget._waiters
    budget.release(60)
    assert budget.used == 0


async def test_a_large_frame_waits_for_its_share_of_the_budget_and_must_then_arrive_in_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    budget = FrameBudget(SMALL_FRAME + 10)
    big = b"x" * (SMALL_FRAME + 5)
    first, second = asyncio.StreamReader(), asyncio.StreamReader()
    first.feed_data(pack_frame(big)[:100])           # half-sent: holds the budget
    second.feed_data(pack_frame(big))                 # all there, but no room yet
    holding = asyncio.ensure_future(read_frame(first, budget=budget))
    waiting = asyncio.ensure_future(read_frame(second, budget=budget))
    await asyncio.sleep(0.05)
    assert not waiting.done() and budget.used == SMALL_FRAME + 5
    first.feed_data(pack_frame(big)[100:])
    assert await holding == big and await waiting == big and budget.used == 0
    monkeypatch.setattr(wire, "FRAME_BODY_S", 0.1)
    stalled = asyncio.StreamReader()
    stalled.feed_data(pack_frame(big)[:100])
    with pytest.raises(ProtocolError, match="did not arrive within"):
        await read_frame(stalled, budget=budget)
    assert budget.used == 0
