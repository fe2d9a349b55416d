"""The daemon in-process: two Daemons on loopback in one event loop, control protocol edge cases."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest

from tests.helpers import eventually_async, free_udp_port, idle_proc, new_key
from vesta import proto
from vesta.config import Config
from vesta.control import ControlClient, RemoteError
from vesta.daemon import Daemon
from vesta.errors import PeerUnavailable
from vesta.spec import CpuSpec, JobRequest


def battery_tree(root: Path, capacity: int, status: str = "Discharging", ac_online: int = 0) -> Path:
    """A /sys fixture with one laptop battery and a mains adapter."""
    bat = root / "class" / "power_supply" / "BAT0"
    bat.mkdir(parents=True, exist_ok=True)
    (bat / "type").write_text("Battery\n")
    (bat / "capacity").write_text(f"{capacity}\n")
    (bat / "status").write_text(f"{status}\n")
    ac = root / "class" / "power_supply" / "AC"
    ac.mkdir(parents=True, exist_ok=True)
    (ac / "type").write_text("Mains\n")
    (ac / "online").write_text(f"{ac_online}\n")
    return root


@pytest.fixture
async def pair(tmp_path: Path, runtime_dir: Path) -> AsyncIterator[tuple[Daemon, Daemon]]:
    cfg = Config.for_tests(key=new_key(), dport=free_udp_port())
    sys_b = battery_tree(tmp_path / "sys-b", capacity=40)
    a = await Daemon.start(cfg.with_(name="a", state_dir=tmp_path / "a"))
    b = await Daemon.start(cfg.with_(name="b", state_dir=tmp_path / "b", sys_root=str(sys_b)))
    try:
        await eventually_async(lambda: a.identity.fingerprint in b.table and b.identity.fingerprint in a.table)
        yield a, b
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def control(daemon: Daemon, op: str, **args: object) -> object:
    def call() -> object:
        with ControlClient(daemon.cfg.control_socket, timeout=5) as c:
            return c.call(op, **args)
    return await asyncio.to_thread(call)


async def test_pair_sees_each_other_with_status_and_power(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    peer_b = a.table.get(b.identity.fingerprint)
    assert peer_b is not None and peer_b.name == "b"
    # b runs on a 40 % battery fixture: "battery" mode, 35 % willingness, and its offer shrinks.
    assert peer_b.status.power == "battery" and peer_b.status.willingness == pytest.approx(0.35)
    assert peer_b.status.battery_pct == 40
    own_a = a.node_status()
    assert own_a.power == "grid" and own_a.willingness == 1.0
    assert peer_b.status.offered_cores == pytest.approx(own_a.offered_cores * 0.35, abs=0.01)
    rows = await control(a, "peers")
    assert isinstance(rows, list) and [r["name"] for r in rows] == ["a", "b"]
    assert rows[0]["state"] == "self" and rows[1]["state"] == "alive"


async def test_ping_over_the_link_pool_reuses_the_connection(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    for _ in range(3):
        reply = await control(a, "ping", node="b")
        assert isinstance(reply, dict) and reply["node"] == "b" and reply["rtt_ms"] > 0
    assert a.counters["links_opened"] == 1
    assert b.counters["link_messages"] == 3
    # by fingerprint prefix as well as by name
    reply = await control(a, "ping", node=b.identity.fingerprint[:10])
    assert isinstance(reply, dict) and reply["node"] == "b"


async def test_peer_answers_an_unsupported_message_with_an_error(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    peer = a.table.get(b.identity.fingerprint)
    assert peer is not None
    reply = await a.pool.request(peer.fingerprint, peer.addr,
                                 lambda rid: proto.Pong(rid=rid, ts=0.0, name="a"), timeout=3)
    assert isinstance(reply, proto.Error) and reply.reason == "unsupported"


async def test_events_record_peer_joins(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    events = await control(a, "events", limit=10)
    assert isinstance(events, list)
    assert any(e["kind"] == "peer_joined" and e["text"] == "b joined" for e in events)
    with pytest.raises(RemoteError, match="limit must be a positive whole number"):
        await control(a, "events", limit=-1)


async def test_control_protocol_errors(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    with pytest.raises(RemoteError, match="unknown op 'explode'"):
        await control(a, "explode")
    with pytest.raises(RemoteError, match="ping needs a node name"):
        await control(a, "ping")
    with pytest.raises(RemoteError, match="no peer named 'zed'"):
        await control(a, "ping", node="zed")

    async def raw(payload: bytes) -> dict[str, object]:
        reader, writer = await asyncio.open_unix_connection(str(a.cfg.control_socket))
        writer.write(struct.pack(">I", len(payload)) + payload)
        await writer.drain()
        (size,) = struct.unpack(">I", await reader.readexactly(4))
        reply = msgpack.unpackb(await reader.readexactly(size))
        writer.close()
        return dict(reply)

    assert (await raw(b"\xc1\xc1"))["error"] == "undecodable request"
    assert (await raw(msgpack.packb([1, 2])))["error"] == "request must be a map with an 'op'"
    assert (await raw(msgpack.packb({"op": "status", "args": 5})))["error"] == "args must be a map"
    # The daemon is unharmed.
    status = await control(a, "status")
    assert isinstance(status, dict) and status["name"] == "a"


async def test_oversized_control_request_closes_only_that_connection(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    reader, writer = await asyncio.open_unix_connection(str(a.cfg.control_socket))
    writer.write(struct.pack(">I", 64 * 1024 * 1024))
    await writer.drain()
    assert await asyncio.wait_for(reader.read(1), 3) == b""
    writer.close()
    status = await control(a, "status")
    assert isinstance(status, dict) and status["peers"]["alive"] == 1


async def test_battery_change_shows_in_the_next_beacon(pair: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    a, b = pair
    battery_tree(tmp_path / "sys-b", capacity=90, status="Charging", ac_online=1)

    def b_on_grid() -> bool:
        peer = a.table.get(b.identity.fingerprint)
        return peer is not None and peer.status.power == "grid" and peer.status.willingness == 1.0

    await eventually_async(b_on_grid, timeout=3)
    battery_tree(tmp_path / "sys-b", capacity=10)   # below battery_min_pct (15): lends nothing

    def b_out() -> bool:
        peer = a.table.get(b.identity.fingerprint)
        return peer is not None and peer.status.willingness == 0 and peer.status.offered_cores == 0

    await eventually_async(b_out, timeout=3)


async def test_stop_is_idempotent_and_removes_the_socket(tmp_path: Path, runtime_dir: Path) -> None:
    cfg = Config.for_tests(key=new_key(), dport=free_udp_port(), state_dir=tmp_path / "s")
    d = await Daemon.start(cfg)
    sock = cfg.control_socket
    assert sock.is_socket()
    await asyncio.gather(d.stop(), d.stop())
    assert not sock.exists()


class SwitchableHours:
    """Lending hours whose window the test opens and closes (a real one changes only on the minute)."""

    def __init__(self) -> None:
        self.open = True
        self.always = False

    def is_open(self, ts: float | None = None) -> bool:
        return self.open

    def describe(self, ts: float | None = None) -> str:
        return "open until Sat 08:00" if self.open else "closed; lending resumes Mon 18:00"


async def test_work_running_when_the_window_closes_is_stopped_after_grace_and_replaced(
        tmp_path: Path, runtime_dir: Path) -> None:
    cfg = Config.for_tests(key=new_key(), dport=free_udp_port(), cpu_offer_pct=100, reserve_pct=0)
    a = await Daemon.start(cfg.with_(name="a", state_dir=tmp_path / "a"))
    b = await Daemon.start(cfg.with_(name="b", state_dir=tmp_path / "b", lend_grace_s=0.3,
                                     proc_root=str(idle_proc(tmp_path / "proc-b"))))
    hours = SwitchableHours()
    b.host.hours = hours  # type: ignore[assignment]
    try:
        await eventually_async(lambda: b.identity.fingerprint in a.table, timeout=5)
        job = asyncio.ensure_future(a.submitter.submit(JobRequest(CpuSpec(300_000_000)), _ignore))
        await eventually_async(lambda: b.host.running, timeout=10)
        hours.open = False                       # the owner's agreed hours end now
        result = await asyncio.wait_for(job, 120)
        moved = [m for m in result["replaced"] if m["node"] == "b"]
        assert moved and "lending hours ended" in moved[0]["why"]
        assert sum(p["iterations"] for p in result["parts"]) == 300_000_000
        assert not b.host.running
        # and b now refuses new work from peers, saying when lending resumes
        offer = proto.Offer(rid=1, job_id="j1", spec=CpuSpec(1), count=1)
        refusal = b.host.admit(offer, a.identity.fingerprint)
        assert refusal is not None and refusal.reason == "hours" and "resumes Mon 18:00" in refusal.message
        assert b.host.admit(offer, None) is None       # the owner's own work is not bound by the hours
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def _ignore(event: dict[str, object]) -> None:
    return None


async def test_a_link_silent_through_a_whole_request_is_closed_and_the_next_reconnects(
        pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    peer = a.table.get(b.identity.fingerprint)
    assert peer is not None
    await a.pool.request(peer.fingerprint, peer.addr, lambda rid: proto.Ping(rid=rid, ts=0.0), timeout=3)
    assert a.counters["links_opened"] == 1
    # b answers nothing to a Cancel for a run it does not have: to a, the link is as silent as a frozen peer's.
    with pytest.raises(PeerUnavailable, match="no answer from peer"):
        await a.pool.request(peer.fingerprint, peer.addr, lambda rid: proto.Cancel(rid=rid), timeout=0.3)
    await eventually_async(lambda: peer.fingerprint not in a.pool._links)
    reply = await a.pool.request(peer.fingerprint, peer.addr, lambda rid: proto.Ping(rid=rid, ts=0.0), timeout=3)
    assert isinstance(reply, proto.Pong) and a.counters["links_opened"] == 2
