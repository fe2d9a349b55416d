"""Bad input from the network against a real vestad: each is dropped and counted, nothing breaks."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import json
import os
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from nacl.signing import SigningKey

from tests.helpers import Cluster, Vestad, eventually, eventually_async, idle_proc, tool
from vesta import proto
from vesta.crypto import FederationKeys, derive_keys, fingerprint, seal_beacon
from vesta.errors import PeerUnavailable, ProtocolError
from vesta.identity import Identity
from vesta.link import serve
from vesta.wire import MAX_FRAME, Channel, handshake, pack_frame

pytestmark = pytest.mark.integration


def make_beacon(key: SigningKey, *, seq: int = 1, boot: int = 1, ts: float | None = None,
                name: str = "forger", port: int = 9) -> proto.Beacon:
    pub = bytes(key.verify_key)
    status = proto.NodeStatus(
        name=name, fingerprint=fingerprint(pub), host="127.0.0.1", port=port, dport=9, version="test",
        cores=1, cpu_pct=0.0, cpu_per_core=(0,), load1=0.0, mem_total_mb=1, mem_avail_mb=1,
        offered_cores=0.0, offered_mem_mb=0, spare_cores=0.0, power="grid", willingness=1.0)
    return proto.Beacon(status=status, ts=time.time() if ts is None else ts, boot=boot, seq=seq,
                        interval_ms=200, pubkey=pub)


def counters(node: Vestad) -> dict[str, int]:
    return dict(node.status()["counters"])


def send_udp(port: int, *datagrams: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for d in datagrams:
            s.sendto(d, ("127.0.0.1", port))


@pytest.fixture
def target(cluster: Cluster, tmp_path: Path) -> Vestad:
    cfg = tmp_path / "node.json"
    cfg.write_text(json.dumps({"handshake_timeout_s": 0.5}))
    return cluster.add("target", args=["-config", str(cfg)])


def test_garbage_truncated_oversized_and_wrong_key_datagrams(cluster: Cluster, target: Vestad) -> None:
    keys = derive_keys(cluster.key)
    good = seal_beacon(keys, SigningKey.generate(), proto.encode(make_beacon(SigningKey.generate())))
    wrong = seal_beacon(derive_keys("some-other-federation-key"), SigningKey.generate(), b"x")
    send_udp(cluster.dport,
             b"", b"\x00", os.urandom(7), os.urandom(300),     # garbage and too short
             good[:40], good[:-1],                              # truncated
             bytes([good[0]]) + b"\x09" + good[2:],            # bad header version
             wrong,                                             # wrong key
             os.urandom(20_000))                                # oversized
    c = eventually(lambda: (c := counters(target)).get("datagrams_received", 0) >= 9 and c, 3.0)
    assert c["dropped_oversize"] == 1
    assert c["dropped_bad_auth"] >= 3          # truncated tails and the wrong key fail authentication
    assert c["dropped_malformed"] >= 4         # empty, one byte, garbage, bad header
    assert target.peer_names() == set()
    assert target.running()


def test_forged_signature_and_mismatched_fingerprint(cluster: Cluster, target: Vestad) -> None:
    keys = derive_keys(cluster.key)
    owner, thief = SigningKey.generate(), SigningKey.generate()
    # A key holder signs a beacon that claims someone else's identity.
    claim = make_beacon(owner)
    forged = seal_beacon(keys, thief, proto.encode(claim))
    # A valid signature, but the status names another fingerprint.
    beacon = make_beacon(thief)
    wrong_fp = dataclasses.replace(beacon, pubkey=bytes(owner.verify_key))
    mismatched = seal_beacon(keys, owner, proto.encode(wrong_fp))
    send_udp(cluster.dport, forged, mismatched)
    eventually(lambda: counters(target).get("dropped_bad_auth", 0) >= 2, 3.0)
    assert target.peer_names() == set()


def test_replayed_future_and_stale_beacons(cluster: Cluster, target: Vestad) -> None:
    keys = derive_keys(cluster.key)
    node = SigningKey.generate()

    def sealed(**kw: object) -> bytes:
        return seal_beacon(keys, node, proto.encode(make_beacon(node, **kw)))  # type: ignore[arg-type]

    send_udp(cluster.dport, sealed(seq=5))
    eventually(lambda: target.peer_names() == {"forger"}, 3.0)
    first = sealed(seq=6)
    send_udp(cluster.dport, first, first,              # the same datagram twice: a duplicate
             sealed(seq=3),                            # older sequence: a replay
             sealed(seq=7, boot=0),                    # an earlier boot: a replay
             sealed(seq=8, ts=time.time() + 3600),     # an hour in the future
             sealed(seq=9, ts=time.time() - 3600))     # an hour old
    c = eventually(lambda: (c := counters(target)).get("dropped_stale") and c, 3.0)
    assert c["duplicates"] >= 1
    assert c["dropped_replay"] == 2
    assert c["dropped_future"] == 1
    assert c["dropped_stale"] == 1
    assert "check the clocks" in target.log()


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def test_silent_half_and_oversized_tcp_connections(cluster: Cluster, target: Vestad) -> None:
    port = target.status()["port"]
    silent = _connect(port)                                   # connects and sends nothing
    half = _connect(port)
    half.sendall(struct.pack(">I", 100) + b"x" * 10)          # a hello that stops half way
    huge = _connect(port)
    huge.sendall(struct.pack(">I", MAX_FRAME + 1))             # oversized length prefix
    garbage = _connect(port)
    garbage.sendall(struct.pack(">I", 64) + os.urandom(64))   # a hello that is not sealed with our key
    c = eventually(lambda: (c := counters(target)).get("tcp_handshake_failed", 0) >= 4 and c, 5.0,
                   what="four failed handshakes")
    assert c["tcp_bad_auth"] >= 1
    for s in (silent, half, huge, garbage):
        s.settimeout(3)
        assert s.recv(1) == b""                               # the daemon closed each one
        s.close()
    assert target.running()


async def test_malformed_and_oversized_frames_after_a_good_handshake(cluster: Cluster, target: Vestad) -> None:
    keys = derive_keys(cluster.key)
    port = target.status()["port"]
    me = SigningKey.generate()

    async def open_channel() -> Channel:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        session = await handshake(reader, writer, keys, me, initiator=True, timeout=3)
        return Channel(reader, writer, session)

    # A good request first: the link works.
    ch = await open_channel()
    await ch.send(proto.Ping(rid=1, ts=time.time()))
    reply = await asyncio.wait_for(ch.recv(), 3)
    assert isinstance(reply, proto.Pong) and reply.name == "target"
    # A frame not sealed with the session key closes the link.
    ch.writer.write(pack_frame(os.urandom(40)))
    with pytest.raises((PeerUnavailable, ProtocolError)):
        await asyncio.wait_for(ch.recv(), 3)
    await ch.close()
    # A sealed frame that is not a valid message gets the link closed too.
    ch = await open_channel()
    ch.writer.write(pack_frame(ch.session.send.seal(b"\xc1not msgpack")))
    with pytest.raises((PeerUnavailable, ProtocolError)):
        await asyncio.wait_for(ch.recv(), 3)
    await ch.close()
    # An oversized length prefix inside a good session.
    ch = await open_channel()
    ch.writer.write(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises((PeerUnavailable, ProtocolError)):
        await asyncio.wait_for(ch.recv(), 3)
    await ch.close()
    c = eventually(lambda: (c := counters(target)).get("tcp_bad_frames", 0) >= 3 and c, 3.0)
    assert c["tcp_oversize"] == 1
    assert c["link_messages"] >= 1
    assert target.running()
    # A legitimate identity checks the link still serves others afterwards.
    ch = await open_channel()
    await ch.send(proto.Ping(rid=2, ts=time.time()))
    assert isinstance(await asyncio.wait_for(ch.recv(), 3), proto.Pong)
    await ch.close()


def test_flood_of_connections_and_datagrams_keeps_memory_bounded(cluster: Cluster, target: Vestad) -> None:
    port = target.status()["port"]
    rss_before = psutil.Process(target.pid).memory_info().rss
    socks = []
    for _ in range(100):  # more than the daemon's inbound limit; the extra ones are closed at once
        try:
            socks.append(_connect(port))
        except OSError:
            break
    for _ in range(40):  # paced, so the kernel's receive buffer does not drop most of them
        send_udp(cluster.dport, *(os.urandom(1000) for _ in range(50)))
        time.sleep(0.01)
    eventually(lambda: counters(target).get("tcp_rejected_busy", 0) >= 1, 5.0, what="busy rejections")
    eventually(lambda: counters(target).get("dropped_malformed", 0) >= 1000, 5.0, what="datagram drops")
    for s in socks:
        s.close()
    rss_after = psutil.Process(target.pid).memory_info().rss
    assert rss_after - rss_before < 30 * 1024 * 1024
    assert target.status()["name"] == "target"


def test_control_socket_rejects_other_users(target: Vestad, cluster: Cluster) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to act as another user")
    sock_path = cluster.runtime_dir / "vestad-target.sock"
    assert (sock_path.stat().st_mode & 0o777) == 0o600
    # Loosen the file mode so only the peer-credential check stands in the way.
    os.chmod(cluster.runtime_dir, 0o755)
    os.chmod(sock_path, 0o666)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become nobody, try to talk to the daemon, report what happened
        os.close(read_fd)
        outcome = "answered"
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(3)
            s.connect(str(sock_path))
            s.sendall(struct.pack(">I", 13) + b"\x81\xa2op\xa6status"[:13])
            if s.recv(10) == b"":
                outcome = "closed"
        except (ConnectionResetError, BrokenPipeError):  # closed before or after our request: rejected
            outcome = "closed"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            outcome = f"error {type(exc).__name__}: {exc}"
        os.write(write_fd, outcome.encode())
        os._exit(0)
    os.close(write_fd)
    os.waitpid(pid, 0)
    with os.fdopen(read_fd) as f:
        outcome = f.read()
    assert outcome == "closed", f"a process of another user was not turned away: {outcome}"
    eventually(lambda: counters(target).get("control_rejected", 0) == 1, 3.0)


async def test_job_offers_that_try_to_hide_work_or_overcommit_are_refused(cluster: Cluster, tmp_path: Path) -> None:
    cfg = tmp_path / "host.json"
    cfg.write_text(json.dumps({"mem_offer_mb": 300, "handshake_timeout_s": 2}))
    host = cluster.add("host", args=["-config", str(cfg)])
    keys = derive_keys(cluster.key)
    port = host.status()["port"]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ch = Channel(reader, writer, await handshake(reader, writer, keys, SigningKey.generate(), initiator=True,
                                                 timeout=3))

    async def answer(rid: int) -> proto.Message:
        while True:
            msg = await asyncio.wait_for(ch.recv(), 5)
            if getattr(msg, "rid", None) == rid and not isinstance(msg, proto.Progress):
                return msg

    # 250 MiB held for 3 s is admitted; a second 250 MiB while the first is held would exceed 300 MiB.
    await ch.send(proto.Offer(rid=1, job_id="jmem1", spec=proto.MemSpec(mib=250, ms=3000), submitter="greedy"))
    assert isinstance(await answer(1), proto.Accept)
    await ch.send(proto.Offer(rid=2, job_id="jmem2", spec=proto.MemSpec(mib=250, ms=10), submitter="greedy"))
    refusal = await answer(2)
    assert isinstance(refusal, proto.Refuse) and refusal.reason == "memory"
    assert "250 MiB already lent" in refusal.message
    # Reusing the live request id of the first offer is refused instead of hiding a second job.
    await ch.send(proto.Offer(rid=1, job_id="jmem3", spec=proto.MemSpec(mib=10, ms=10), submitter="greedy"))
    again = await answer(1)
    assert isinstance(again, proto.Refuse) and again.reason == "invalid"
    assert len(host.status()["hosting"]) == 1
    await ch.close()
    # the link dropped: the held memory is released
    eventually(lambda: not host.status()["hosting"], 5, what="the host to stop the orphaned chunk")


def test_killing_vesta_exec_stops_the_program_on_the_peer(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.add("a")
    # b plays an idle machine: on this shared test machine a busy moment would refuse the job for capacity.
    b = cluster.add("b", args=["-allow-exec", "-proc-root", str(idle_proc(tmp_path / "proc-b"))])
    eventually(lambda: a.peer_names() == {"b"}, 5)
    token = "77.31"   # the program's own command line: `sleep 77.31`, found with pgrep
    script = f"echo started; exec sleep {token}"
    cmd = tool("vesta") + ["-name", "a", "exec", "--", "sh", "-c", script]
    with subprocess.Popen(cmd, env=a.env, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == "started\n"
        eventually(lambda: b.status()["hosting"], 5)
        assert subprocess.run(["pgrep", "-f", f"sleep {token}"], capture_output=True).returncode == 0
        proc.kill()                                  # the person hit Ctrl-C hard, or the terminal closed
    eventually(lambda: not b.status()["hosting"], 10, what="b to stop the orphaned program")
    eventually(lambda: subprocess.run(["pgrep", "-f", f"sleep {token}"], capture_output=True).returncode == 1, 5,
               what="the program on the peer to be gone after its submitter went away")
    eventually(lambda: not a.status()["jobs"], 5)


async def test_stalled_handshakes_cannot_take_over_the_daemon(cluster: Cluster, tmp_path: Path) -> None:
    cfg = tmp_path / "slow.json"
    cfg.write_text(json.dumps({"handshake_timeout_s": 20}))
    target = cluster.add("target", args=["-config", str(cfg)])
    port = target.status()["port"]
    keys = derive_keys(cluster.key)

    async def link() -> Channel:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return Channel(reader, writer, await handshake(reader, writer, keys, SigningKey.generate(),
                                                       initiator=True, timeout=5))

    friend = await link()                                  # a peer already linked before the flood
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]  # no key, silent
    try:
        # one source may hold only a few unauthenticated connections: the rest are closed at once
        eventually(lambda: target.status()["counters"].get("tcp_rejected_busy", 0) >= 30, 5,
                   what="strangers beyond the per-source handshake limit to be turned away")
        await friend.send(proto.Ping(rid=1, ts=time.time()))
        assert isinstance(await asyncio.wait_for(friend.recv(), 5), proto.Pong)   # links keep working
        assert target.status()["name"] == "target"                                # and so does control
    finally:
        for s in stalled:
            s.close()
    # once the strangers are gone, new peers link up again at once
    again = await link()
    await again.send(proto.Ping(rid=2, ts=time.time()))
    assert isinstance(await asyncio.wait_for(again.recv(), 5), proto.Pong)
    await again.close()
    await friend.close()


async def test_file_pieces_from_a_peer_are_checked_and_never_land_elsewhere(cluster: Cluster, tmp_path: Path) -> None:
    target = cluster.add("target", args=["-allow-exec", "-proc-root", str(idle_proc(tmp_path / "proc"))])
    port = target.status()["port"]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    peer = Channel(reader, writer, await handshake(reader, writer, derive_keys(cluster.key), SigningKey.generate(),
                                                   initiator=True, timeout=5))
    try:
        # Pieces for a run that does not exist (or is someone else's) are counted and dropped; the link lives.
        await peer.send(proto.FileChunk(rid=42, path="x", data=b"junk"))
        await peer.send(proto.Ping(rid=1, ts=time.time()))
        assert isinstance(await asyncio.wait_for(peer.recv(), 5), proto.Pong)
        eventually(lambda: target.status()["counters"].get("file_chunks_unexpected") == 1, 5)
        # An input that is not the file announced in the offer: the program never starts.
        announced = hashlib.sha256(b"abc").hexdigest()
        await peer.send(proto.Offer(rid=5, job_id="jhostile1",
                                    spec=proto.ExecSpec(("cat", "x"), inputs=(proto.FileInfo("x", 3, announced),))))
        assert isinstance(await asyncio.wait_for(peer.recv(), 5), proto.Accept)
        await peer.send(proto.FileChunk(rid=5, path="x", data=b"abd"))
        await peer.send(proto.FileChunk(rid=5, path="x", offset=3, eof=True, sha256=hashlib.sha256(b"abd").digest()))
        result = await asyncio.wait_for(peer.recv(), 10)
        assert isinstance(result, proto.Result) and not result.ok
        assert result.error == "input x: checksum mismatch: the file arrived damaged"
        hosted = target.call("jobs", hosted=True)[0]
        assert (hosted["job_id"], hosted["state"]) == ("jhostile1", "failed")
    finally:
        await peer.close()


async def _linked(port: int, keys: FederationKeys, source: str = "127.0.0.1") -> Channel:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    return Channel(reader, writer, await handshake(reader, writer, keys, SigningKey.generate(),
                                                   initiator=True, timeout=5))


async def _ping(port: int, keys: FederationKeys) -> None:
    ch = await _linked(port, keys)
    try:
        await ch.send(proto.Ping(rid=1, ts=time.time()))
        assert isinstance(await asyncio.wait_for(ch.recv(), 5), proto.Pong)
    finally:
        await ch.close()


async def test_strangers_holding_handshakes_from_many_addresses_do_not_keep_a_new_peer_out(
        cluster: Cluster, tmp_path: Path) -> None:
    # 4 unauthenticated connections from each of several addresses held every handshake slot: a new node's
    # link (and ping) failed for as long as they stayed.
    cfg = tmp_path / "slow.json"
    cfg.write_text(json.dumps({"handshake_timeout_s": 20}))
    target = cluster.add("target", args=["-config", str(cfg)])
    port = target.status()["port"]
    keys = derive_keys(cluster.key)
    sources = [f"127.0.0.{i}" for i in range(2, 10)]
    stop = threading.Event()
    held: list[socket.socket] = []

    def strangers() -> None:   # silent connections, round robin from every address, as fast as they go
        while not stop.is_set():
            for source in sources:
                s = socket.socket()
                try:
                    s.bind((source, 0))
                    s.connect(("127.0.0.1", port))
                except OSError:
                    s.close()
                    continue
                held.append(s)
            time.sleep(0.01)

    flood = threading.Thread(target=strangers)
    flood.start()
    try:
        eventually(lambda: target.status()["counters"].get("tcp_accepted", 0) >= 16, 10,
                   what="the strangers to hold every handshake slot")
        for _ in range(3):
            await _ping(port, keys)
        assert target.status()["counters"].get("tcp_handshakes_cut", 0) >= 1
    finally:
        stop.set()
        flood.join()
        for s in held:
            s.close()


async def test_idle_links_of_key_holders_do_not_keep_a_new_peer_out(cluster: Cluster, tmp_path: Path) -> None:
    # 64 authenticated links doing nothing took every inbound slot: new peers were refused for as long as
    # they stayed. The idlest makes room instead; and a link idle past link_idle_s is closed.
    cfg = tmp_path / "idle.json"
    cfg.write_text(json.dumps({"link_idle_s": 4}))
    target = cluster.add("target", args=["-config", str(cfg)])
    port = target.status()["port"]
    keys = derive_keys(cluster.key)
    idle = [await _linked(port, keys, f"127.0.0.{2 + i % 8}") for i in range(64)]   # 64 identities
    try:
        for _ in range(3):
            await _ping(port, keys)
        assert target.status()["counters"].get("links_evicted", 0) >= 1
        with pytest.raises(PeerUnavailable):   # the first, idlest one made room (or idled out)
            await asyncio.wait_for(idle[0].recv(), 10)
        with pytest.raises(PeerUnavailable):   # the last one idled out, after link_idle_s
            await asyncio.wait_for(idle[-1].recv(), 15)
        assert target.status()["counters"].get("links_idle_closed", 0) >= 1
    finally:
        for ch in idle:
            await ch.close()


async def test_records_of_a_member_are_checked_and_marked_with_who_sent_them(
        cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `vesta jobs --all` showed whatever a member sent, under the name it claimed; a non-numeric field raised
    # TypeError in the daemon and broke `jobs --all` until that member left.
    a = cluster.add("a")
    keys = derive_keys(cluster.key)
    liar = SigningKey.generate()
    pub = bytes(liar.verify_key)
    me = Identity(signing_key=liar, public_key=pub, fingerprint=fingerprint(pub), path=tmp_path / "liar.json")
    row = {"id": "jforged0001", "kind": "exec", "args": {"argv": ["rm", "-rf", "/home/alice"]}, "submitter": "a",
           "submitter_fp": "0" * 32, "created": time.time(), "started": None, "finished": None,
           "state": "succeeded", "exit_code": 0, "reason": "", "result": None, "log_bytes": 0, "log_dropped": 0,
           "log_truncated": False}
    sending: list[dict[str, object]] = [row]
    monkeypatch.setattr(proto.Records, "validate", lambda self: None)   # this liar sends what it likes

    async def answer(msg: proto.Message, channel: Channel) -> proto.Message | None:
        assert isinstance(msg, proto.RecordsRequest)
        return proto.Records(rid=msg.rid, node="a", rows=tuple(sending))   # claims to be a itself

    server = await asyncio.start_server(
        lambda r, w: serve(r, w, keys=keys, identity=me, counters=Counter(), handshake_timeout=5, handler=answer),
        "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def beacons() -> None:
        for seq in itertools.count(1):
            send_udp(cluster.dport, seal_beacon(keys, liar, proto.encode(make_beacon(liar, seq=seq, name="liar",
                                                                                     port=port))))
            await asyncio.sleep(0.1)

    beaconing = asyncio.ensure_future(beacons())
    try:
        await eventually_async(lambda: a.peer_names() == {"liar"}, 5)
        out = await asyncio.to_thread(a.vesta, "jobs", "--all", "--json")
        assert out.returncode == 0, out.stderr
        forged = [r for r in json.loads(out.stdout) if r["id"] == "jforged0001"]
        assert [(r["node"], r["node_id"]) for r in forged] == [("liar", me.fingerprint)]   # not "a"
        text = (await asyncio.to_thread(a.vesta, "jobs", "--all")).stdout
        assert f"liar {me.fingerprint[:8]}" in text
        sending[:] = [row | {"created": "yesterday"}, row | {"id": "jforged0002", "args": {"argv": [1, 2]}}]
        for _ in range(2):   # the bad answer breaks only the liar's own link; asked again, it is the same
            out = await asyncio.to_thread(a.vesta, "jobs", "--all", "--json")
            assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
            rows = json.loads(out.stdout)
            assert [(r["node"], r["state"]) for r in rows] == [("liar", "unreachable")], rows
            assert "records.rows[0].created must be a number" in rows[0]["reason"]
        assert a.status()["name"] == "a"
    finally:
        beaconing.cancel()
        server.close()


def _send_from(source: str, port: int, *datagrams: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        for d in datagrams:
            s.sendto(d, ("127.0.0.1", port))


def test_made_up_identities_do_not_keep_a_real_node_out_of_the_peer_table(cluster: Cluster, tmp_path: Path) -> None:
    # One beacon per made-up identity, each claiming a 1-hour interval, filled the table for 10 hours: a real
    # node arriving later was never listed.
    cfg = tmp_path / "small.json"
    cfg.write_text(json.dumps({"max_peers": 16}))
    a = cluster.add("a", args=["-config", str(cfg)])
    keys = derive_keys(cluster.key)
    for i in range(32):   # from 8 addresses, 4 each
        fake = SigningKey.generate()
        beacon = dataclasses.replace(make_beacon(fake, name=f"fake{i}"), interval_ms=3_600_000)
        _send_from(f"127.0.0.{2 + i % 8}", cluster.dport, seal_beacon(keys, fake, proto.encode(beacon)))
    eventually(lambda: len(a.call("peers")) == 17, 5, what="the fakes to fill the table")   # and a itself
    time.sleep(5.5)   # the fakes say nothing more
    b = cluster.add("b")
    eventually(lambda: "b" in a.peer_names(), 5, what="the real node to be listed")
    assert len(a.call("peers")) == 17 and a.status()["counters"].get("dropped_table_full", 0) >= 16
    assert a.vesta("ping", "b", "-c", "1").returncode == 0
    assert "b" in a.peer_names() and b.running()


def test_gossip_cannot_aim_a_stream_of_beacons_at_a_third_party(cluster: Cluster, tmp_path: Path) -> None:
    # A member naming any host and port in its gossip made every node beacon there each round: 44 KB from
    # the member caused 4.56 MB at a third party.
    a = cluster.add("a")
    keys = derive_keys(cluster.key)
    member = SigningKey.generate()
    victim = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    victim.bind(("127.0.0.1", 0))
    victim.setblocking(False)
    aim = proto.GossipEntry(fingerprint(bytes(SigningKey.generate().verify_key)), "127.0.0.1",
                            victim.getsockname()[1])
    got = 0
    try:
        for seq in range(1, 41):   # 4 s of a member's beacons, each naming the victim
            beacon = dataclasses.replace(make_beacon(member, seq=seq, name="member"), gossip=(aim,))
            _send_from("127.0.0.2", cluster.dport, seal_beacon(keys, member, proto.encode(beacon)))
            time.sleep(0.1)
            while True:
                try:
                    victim.recv(65536)
                except BlockingIOError:
                    break
                got += 1
        assert "member" in a.peer_names()
        assert 1 <= got <= 5, got   # a few probes, not one a round (20 in 4 s at a 200 ms interval)
    finally:
        victim.close()


async def test_a_burst_of_requests_slows_the_link_instead_of_cutting_it(cluster: Cluster, tmp_path: Path) -> None:
    # 256 requests in flight closed the link: a burst of 300 pings (or 12 busy exec jobs) lost it.
    target = cluster.add("target")
    ch = await _linked(target.status()["port"], derive_keys(cluster.key))
    try:
        pings = [proto.Ping(rid=rid, ts=time.time()) for rid in range(1, 301)]
        await ch.send(*pings)   # one write: the daemon reads them all before answering any
        got = set()
        for _ in pings:
            reply = await asyncio.wait_for(ch.recv(), 10)
            assert isinstance(reply, proto.Pong)
            got.add(reply.rid)
        assert got == set(range(1, 301))
        assert target.status()["counters"].get("tcp_flooded", 0) == 0
    finally:
        await ch.close()


async def test_half_sent_large_frames_cannot_take_the_daemon_s_memory(cluster: Cluster, tmp_path: Path) -> None:
    # 60 half-sent 16 MiB frames took the daemon from 47 MB to 971 MB: all links together buffer a bounded amount.
    target = cluster.add("target")
    port = target.status()["port"]
    keys = derive_keys(cluster.key)
    before = psutil.Process(target.pid).memory_info().rss
    links = [await _linked(port, keys, f"127.0.0.{2 + i % 8}") for i in range(20)]
    try:
        half = struct.pack(">I", MAX_FRAME) + b"\0" * (MAX_FRAME * 3 // 4)   # 12 MiB of each, 240 MiB in all
        for ch in links:
            ch.writer.write(half)
        await asyncio.gather(*(asyncio.wait_for(ch.writer.drain(), 2) for ch in links), return_exceptions=True)
        await asyncio.sleep(2)
        grown = psutil.Process(target.pid).memory_info().rss - before
        assert grown < 100 * 1024 * 1024, f"{grown / 2**20:.0f} MiB"   # MAX_BUFFERED (64 MiB) and a little
        await _ping(port, keys)   # small frames still go through
        assert target.status()["name"] == "target"
    finally:
        for ch in links:
            ch.writer.transport.abort()


def test_duplicates_replays_and_forgeries_change_nothing_and_skip_the_signature(cluster: Cluster,
                                                                                target: Vestad) -> None:
    """A beacon that repeats or predates the newest one of its node is dropped before its signature is
    checked (it cannot change anything); a new one with a forged signature is checked and changes nothing."""
    keys = derive_keys(cluster.key)
    owner, thief = SigningKey.generate(), SigningKey.generate()
    send_udp(cluster.dport, seal_beacon(keys, owner, proto.encode(make_beacon(owner, seq=5, name="owner"))))
    eventually(lambda: target.peer_names() == {"owner"}, 3.0)
    before = counters(target)
    # Signed by the thief in the owner's name: as a duplicate, a replay, and as news.
    send_udp(cluster.dport,
             seal_beacon(keys, thief, proto.encode(make_beacon(owner, seq=5, name="thief"))),
             seal_beacon(keys, thief, proto.encode(make_beacon(owner, seq=4, name="thief"))),
             seal_beacon(keys, thief, proto.encode(make_beacon(owner, seq=6, name="thief"))))
    c = eventually(lambda: (c := counters(target)).get("datagrams_received", 0) >= before["datagrams_received"] + 3
                   and c, 3.0)
    assert c.get("duplicates", 0) == before.get("duplicates", 0) + 1
    assert c.get("dropped_replay", 0) == before.get("dropped_replay", 0) + 1
    assert c.get("dropped_bad_auth", 0) == before.get("dropped_bad_auth", 0) + 1
    assert target.peer_names() == {"owner"}
    # The forged seq 6 was not remembered: the owner's own seq 6 is still news.
    send_udp(cluster.dport, seal_beacon(keys, owner, proto.encode(make_beacon(owner, seq=6, name="owner2"))))
    eventually(lambda: target.peer_names() == {"owner2"}, 3.0)


def test_a_goodbye_needs_a_good_signature(cluster: Cluster, target: Vestad) -> None:
    keys = derive_keys(cluster.key)
    owner, thief = SigningKey.generate(), SigningKey.generate()
    send_udp(cluster.dport, seal_beacon(keys, owner, proto.encode(make_beacon(owner, seq=1, name="owner"))))
    eventually(lambda: target.peer_names() == {"owner"}, 3.0)
    forged = dataclasses.replace(make_beacon(owner, seq=2, name="owner"), leaving=True)
    send_udp(cluster.dport, seal_beacon(keys, thief, proto.encode(forged)))
    eventually(lambda: counters(target).get("dropped_bad_auth", 0) >= 1, 3.0)
    assert target.peer_names() == {"owner"}
    real = dataclasses.replace(make_beacon(owner, seq=3, name="owner"), leaving=True)
    send_udp(cluster.dport, seal_beacon(keys, owner, proto.encode(real)))
    eventually(lambda: target.peer_names() == set(), 3.0, what="the owner's goodbye")


def test_a_beacon_of_another_protocol_version_is_refused_with_a_line_naming_it(cluster: Cluster,
                                                                               target: Vestad) -> None:
    import msgpack
    keys = derive_keys(cluster.key)
    node = SigningKey.generate()
    envelope = msgpack.unpackb(proto.encode(make_beacon(node)), raw=False)
    envelope[0] = proto.PROTO_VERSION + 1
    send_udp(cluster.dport, seal_beacon(keys, node, msgpack.packb(envelope, use_bin_type=True)))
    eventually(lambda: counters(target).get("dropped_version", 0) == 1, 3.0)
    assert f"protocol version {proto.PROTO_VERSION + 1}, this node speaks {proto.PROTO_VERSION}" in target.log()
    assert target.peer_names() == set()
