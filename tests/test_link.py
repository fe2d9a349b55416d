"""The inbound gate (room for newcomers whatever strangers and idle key holders do) and the idle bound of a link."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from tests.helpers import FakeClock
from vesta import proto
from vesta.crypto import derive_keys
from vesta.errors import PeerUnavailable
from vesta.identity import load_or_create
from vesta.link import Inbound, InboundGate, serve
from vesta.wire import Channel, handshake


def gate(clock: FakeClock | None = None, **kw: int) -> InboundGate:
    return InboundGate(Counter(), clock=clock or FakeClock(), **kw)   # type: ignore[arg-type]


class Task:
    """Stands for the task serving a connection: it only records that it was cut."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def open_from(g: InboundGate, source: str) -> tuple[Inbound, Task]:
    assert g.allow(source)
    task = Task()
    return g.opened(source, task), task   # type: ignore[arg-type]


def test_full_handshake_slots_make_room_by_cutting_the_heaviest_source_s_oldest() -> None:
    g = gate(max_handshaking=16, per_source=4)
    held = [open_from(g, f"10.0.0.{i}") for i in range(4) for _ in range(4)]   # 4 sources x 4: every slot
    assert len(g.handshaking) == 16
    newcomer, newcomer_task = open_from(g, "192.168.1.7")                      # a new node is let in ...
    assert held[0][1].cancelled and not any(t.cancelled for _, t in held[1:])   # ... and a stalled one cut
    assert g.counters["tcp_handshakes_cut"] == 1
    for i in range(4):   # the strangers keep coming: they cut each other, never the newcomer
        open_from(g, f"10.0.1.{i}")
    assert not newcomer_task.cancelled and newcomer in g.handshaking
    assert g.authenticated(newcomer, "f" * 32) and g.links == [newcomer]


def test_one_source_is_turned_away_beyond_its_handshakes_and_its_rate() -> None:
    clock = FakeClock()
    g = gate(clock, per_source=4, rate=10, burst=8)
    conns = [open_from(g, "10.0.0.1")[0] for _ in range(4)]
    assert not g.allow("10.0.0.1") and g.counters["tcp_rejected_busy"] == 1
    for c in conns:
        g.closed_conn(c)
    for _ in range(4):                    # 8 tokens: 4 spent above, 4 left
        g.closed_conn(open_from(g, "10.0.0.1")[0])
    assert not g.allow("10.0.0.1") and g.counters["tcp_rejected_rate"] == 1
    assert g.allow("10.0.0.2")            # others are not held back by it
    clock.advance(0.15)                   # 10 a second: one more
    assert g.allow("10.0.0.1") and not g.allow("10.0.0.1")


def test_full_links_make_room_by_closing_the_idlest_and_wait_only_when_all_are_busy() -> None:
    clock = FakeClock()
    g = gate(clock, max_links=3, per_peer=2)
    links = []
    for i in range(3):
        conn, task = open_from(g, f"10.0.0.{i}")
        assert g.authenticated(conn, f"{i:032x}")
        links.append((conn, task))
        clock.advance(1)
    links[0][0].last_active = clock.now + 5   # the first spoke last: the second is the idlest
    conn, _ = open_from(g, "10.0.0.9")
    assert g.authenticated(conn, "9" * 32)
    assert links[1][1].cancelled and not links[0][1].cancelled and g.counters["links_evicted"] == 1
    for c in g.links:
        c.busy = 1                            # a request running on every link: the newcomer waits
    late, late_task = open_from(g, "10.0.0.8")
    assert not g.authenticated(late, "8" * 32) and late not in g.links and not late_task.cancelled
    # one identity keeps at most per_peer links: its third replaces its own idlest, not someone else's
    g2 = gate(clock, max_links=10, per_peer=2)
    mine = []
    for _ in range(2):
        conn, task = open_from(g2, "10.0.0.1")
        assert g2.authenticated(conn, "a" * 32)
        mine.append(task)
    conn, _ = open_from(g2, "10.0.0.1")
    assert g2.authenticated(conn, "a" * 32) and mine[0].cancelled and len(g2.links) == 2


async def test_a_link_with_nothing_running_is_closed_once_idle_and_a_busy_one_is_not(tmp_path: Path) -> None:
    keys = derive_keys("test-key-" + "0" * 24)
    me = load_or_create(tmp_path, "me")
    counters: Counter[str] = Counter()

    async def slow(msg: proto.Message, channel: Channel) -> proto.Message | None:
        assert isinstance(msg, proto.Ping)
        await asyncio.sleep(1.0)              # longer than the idle bound: running, so not idle
        return proto.Pong(rid=msg.rid, ts=msg.ts, name="me")

    served: list[asyncio.Task[None]] = []

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(asyncio.current_task())   # type: ignore[arg-type]
        await serve(reader, writer, keys=keys, identity=me, counters=counters, handshake_timeout=2,
                    handler=slow, idle_timeout=0.4)

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        peer = Channel(reader, writer, await handshake(reader, writer, keys, SigningKey.generate(),
                                                       initiator=True, timeout=2))
        await peer.send(proto.Ping(rid=1, ts=time.time()))
        assert isinstance(await asyncio.wait_for(peer.recv(), 3), proto.Pong)   # the link outlived 0.4 s busy
        started = time.monotonic()
        with pytest.raises(PeerUnavailable):
            await asyncio.wait_for(peer.recv(), 5)                             # then idle: closed
        assert 0.2 < time.monotonic() - started < 3
        assert counters["links_idle_closed"] == 1
        await peer.close()
    finally:
        server.close()
        for task in served:
            task.cancel()
        await asyncio.gather(*served, return_exceptions=True)
