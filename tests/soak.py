"""The standing attack suite: ``scripts/soak`` runs it in full, ``tests/test_soak.py`` a small version.

Real vestad processes on loopback: a *target*, an *honest* peer beside it, and a *late* honest node that
joins in the middle of the attack. Every input surface is fed hostile input, the attackers sending from
other loopback addresses (127.0.0.2 and up) than the honest nodes (127.0.0.1):

The inputs counted are those that reached a daemon: every connection and control request, and the datagrams
the daemons received (the kernel drops those a full receive buffer cannot take; the sender is paced).

- ``udp_garbage``: random datagrams of every size, truncated, bit-flipped and wrong-key beacons;
- ``udp_member``: beacons sealed and signed with the key: made-up identities with random names and
  impossible capacity, replays, stale and future ones, the target's own name (a member can say anything);
- ``tcp_nokey``: connections that send random bytes or half a handshake, then hang up;
- ``tcp_frames``: links opened with the key, then a bad frame (garbage, unsealed, oversized, a sealed
  message with bad fields);
- ``control``: control socket requests with random ops, random argument types and broken frames.

RSS is measured after a warm-up of 2 % of every case, which fills the daemons' bounded tables (peer table,
replay memory, name book, warn-once memory; the warm-up's own growth is printed beside it), so what it
shows is growth beyond those bounds. The daemons beacon at vestad's default interval (1 s).
Datagrams sent by unicast reach one of the daemons that share the discovery port (``SO_REUSEPORT``), so the
UDP cases hit the target and the honest peer both: RSS growth is the larger of the two, CPU their sum.
Meanwhile the honest nodes ping the target every half second; after the attack 20 ``kill -9`` cycles hit
the target in the middle of jobs split with its peer, and after each restart its records database and
ledger are checked and every job it had answered must be on record. What it prints, each with PASS or FAIL:
crashes (daemon deaths and tracebacks in the logs, 0), RSS growth of the target over the attack
(<= 5 MiB), CPU per 1,000 hostile inputs (reported), made-up identities listed with more capacity than
plausible or under the target's name (0), honest pings refused during the attack (0), and
records and ledger integrity after the kill cycles (intact).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import psutil
from nacl.signing import SigningKey

from tests.helpers import Cluster, Vestad, eventually, idle_proc, short_tmpdir
from vesta import proto
from vesta.crypto import FederationKeys, derive_keys, fingerprint, seal_beacon
from vesta.status import PLAUSIBLE_CORES
from vesta.wire import Channel, handshake, pack_frame

RSS_BUDGET = 5 << 20
FULL = {"udp_garbage": 950_000, "udp_member": 300_000, "tcp_nokey": 20_000, "tcp_frames": 5_000, "control": 30_000}


def attacker(i: int) -> str:
    """An attacking source address: 127.0.0.2 .. 127.0.0.250 (the honest nodes are 127.0.0.1)."""
    return f"127.0.0.{2 + i % 249}"


def random_status(rng: random.Random, key: SigningKey, name: str | None = None) -> proto.NodeStatus:
    cores = rng.choice([1, 4, 4096])
    return proto.NodeStatus(
        name=name or rng.choice(["laptop", "desk", "x" * 32, f"n{rng.randrange(1 << 30)}"]),
        fingerprint=fingerprint(bytes(key.verify_key)), host=rng.choice(["", "127.0.0.1", "10.9.9.9"]),
        port=rng.randrange(1, 65536), dport=rng.randrange(1, 65536), version="soak", cores=cores,
        cpu_pct=rng.uniform(0, 100), cpu_per_core=tuple(rng.randrange(101) for _ in range(min(cores, 8))),
        load1=rng.uniform(0, 1e6), mem_total_mb=rng.randrange(1 << 32), mem_avail_mb=rng.randrange(1 << 32),
        offered_cores=float(rng.randrange(4097)), offered_mem_mb=rng.randrange(1 << 32),
        spare_cores=float(rng.randrange(4097)), power=rng.choice(proto.POWER_MODES), willingness=rng.random(),
        hash_rate=rng.uniform(0, 1e13), running=rng.randrange(1 << 20), exec_allowed=rng.random() < 0.5)


def beacon(rng: random.Random, key: SigningKey, *, name: str | None = None, ts: float | None = None,
           seq: int | None = None) -> bytes:
    msg = proto.Beacon(status=random_status(rng, key, name), ts=time.time() if ts is None else ts,
                       boot=rng.randrange(1, 1 << 62), seq=rng.randrange(1 << 62) if seq is None else seq,
                       interval_ms=rng.choice([20, 1000, 3_600_000]), pubkey=bytes(key.verify_key))
    return proto.encode(msg)


@dataclass
class Soak:
    """One run of the suite; ``scale`` multiplies the input counts of ``FULL`` (1.0: >= 10**6 in all)."""

    scale: float = 1.0
    kill_cycles: int = 20
    need: int | None = None   # inputs that must reach a daemon (None: 10**6 x scale)
    say: Callable[[str], None] = lambda line: print(line, flush=True)  # noqa: T201 - the script's output
    base: Path = field(default_factory=lambda: short_tmpdir("soak"))
    sent: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    pings: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(20))

    def __post_init__(self) -> None:
        self.cluster = Cluster(self.base)
        self.keys: FederationKeys = derive_keys(self.cluster.key)
        self.wrong = derive_keys("not-the-federation-key-at-all")

    def count(self, case: str) -> int:
        return max(20, int(FULL[case] * self.scale))

    # ------------------------------------------------------------------ the cases

    def udp_garbage(self, n: int) -> int:
        key, rng = SigningKey.generate(), self.rng
        good = seal_beacon(self.keys, key, beacon(rng, key))
        samples: list[Callable[[], bytes]] = [
            lambda: rng.randbytes(rng.randrange(0, 1500)),
            lambda: good[: rng.randrange(len(good))],
            lambda: _flip(good, rng),
            lambda: seal_beacon(self.wrong, key, b"\x93\x01\x02\x03"),
        ]
        pool = [s() for s in samples for _ in range(200)]
        pool += [rng.randbytes(rng.randrange(9000, 65000)) for _ in range(16)]   # oversized: few, they fill buffers
        socks = [_udp_from(attacker(i)) for i in range(16)]
        try:
            for i in range(n):
                _send(socks[i % 16], pool[rng.randrange(len(pool))], self.cluster.dport)
                if i % 100 == 99:
                    time.sleep(0.005)   # paced (20,000 a second): what the kernel drops never reached a daemon
        finally:
            for s in socks:
                s.close()
        return n

    def udp_member(self, n: int) -> int:
        rng = self.rng
        keys = [SigningKey.generate() for _ in range(64)]
        pool: list[bytes] = []
        for i in range(min(n, 2000)):
            key = keys[i % len(keys)]
            kind = i % 5
            ts = {3: time.time() + 3600, 4: time.time() - 3600}.get(kind)
            name = "target" if kind == 2 else None
            pool.append(seal_beacon(self.keys, key, beacon(rng, key, name=name, ts=ts)))
        socks = [_udp_from(attacker(i)) for i in range(16)]
        try:
            for i in range(n):   # fresh ones a while, then replays of them (dropped as replays or duplicates)
                _send(socks[i % 16], pool[i % len(pool)], self.cluster.dport)
                if i % 100 == 99:
                    time.sleep(0.005)
        finally:
            for s in socks:
                s.close()
        return n

    async def tcp_nokey(self, n: int, port: int) -> int:
        rng = self.rng

        async def one(i: int) -> None:
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                async with asyncio.timeout(5):
                    _, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(attacker(i), 0))
                    writer.write(rng.randbytes(rng.randrange(0, 200)))
                    with contextlib.suppress(OSError):
                        await writer.drain()
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()

        for start in range(0, n, 64):
            await asyncio.gather(*(one(i) for i in range(start, min(n, start + 64))))
        return n

    async def tcp_frames(self, n: int, port: int) -> int:
        rng = self.rng

        def bad(ch: Channel) -> bytes:
            return [lambda: pack_frame(rng.randbytes(rng.randrange(1, 300))),
                    lambda: pack_frame(ch.session.send.seal(rng.randbytes(rng.randrange(1, 300)))),
                    lambda: struct.pack(">I", (1 << 31) + rng.randrange(1 << 20)),
                    lambda: pack_frame(ch.session.send.seal(msgpack.packb(
                        [proto.PROTO_VERSION, rng.randrange(1, 40), {"rid": rng.choice([-1, "x", (1 << 64) - 1])}]))),
                    ][rng.randrange(4)]()

        async def one(i: int) -> None:
            with contextlib.suppress(Exception):   # whatever the daemon does to a bad link is its right
                async with asyncio.timeout(5):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(attacker(i), 0))
                    try:
                        session = await handshake(reader, writer, self.keys, SigningKey.generate(),
                                                  initiator=True, timeout=5)
                        writer.write(bad(Channel(reader, writer, session)))
                        await writer.drain()
                        await reader.read(1)   # the daemon hangs up
                    finally:
                        writer.close()

        for start in range(0, n, 16):
            await asyncio.gather(*(one(i) for i in range(start, min(n, start + 16))))
        return n

    def control(self, n: int, target: Vestad) -> int:
        rng = self.rng
        path = target.runtime_dir / f"vestad-{target.name}.sock"
        ops = ["status", "peers", "ping", "events", "jobs", "show", "logs", "ledger", "cancel", "artifacts",
               "snapshot", "link-rerun", "cpu", "mem", "exec", "nope", "", None, 7]
        junk: list[Any] = [None, -1, (1 << 64) - 1, "x" * 300, [1, 2], {"a": {}}, 3.5, b"\xff", True, float("nan")]

        def request(i: int) -> Any:
            op = rng.choice(ops)
            if op in ("cpu", "mem", "exec"):   # never a valid job: always a field of the wrong kind
                args = {rng.choice(["millions", "mib", "argv", "on", "ms"]): rng.choice(junk[:-1] + ["-", -5])}
            else:
                args = {rng.choice(["node", "job_id", "limit", "after", "all", "state"]): rng.choice(junk)
                        for _ in range(rng.randrange(3))}
            body: Any = {"op": op, "args": args, "id": i} if rng.random() < 0.9 else rng.choice(junk)
            return body

        sent = 0
        while sent < n:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(str(path))
                batch = min(50, n - sent)
                if rng.random() < 0.05:   # a broken frame: too long, or cut
                    s.sendall(rng.choice([struct.pack(">I", 1 << 30), b"\x00\x00", struct.pack(">I", 9) + b"ab"]))
                    sent += 1
                    continue
                s.sendall(b"".join(pack_frame(msgpack.packb(request(sent + k))) for k in range(batch)))
                sent += batch
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_WR)
                    while s.recv(65536):
                        pass
        return n

    # ------------------------------------------------------------------ honest traffic

    @contextlib.contextmanager
    def honest_traffic(self, target: Vestad, honest: Vestad) -> Iterator[None]:
        stop = threading.Event()

        def ping() -> None:
            while not stop.wait(0.5):
                self.pings += 1
                try:
                    honest.call("ping", node="target")
                except Exception as exc:  # noqa: BLE001 - every failure is a refusal to count
                    self.refused.append(f"honest ping failed: {exc}")

        thread = threading.Thread(target=ping, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(10)

    # ------------------------------------------------------------------ the run

    def run(self) -> bool:
        try:
            return self._run()
        finally:
            self.cluster.close()

    def _node(self, name: str) -> Vestad:
        # vestad's default beacon interval (1 s: a peer is dropped after 10 s of silence), not the tests' 200 ms
        return self.cluster.add(name, args=["-proc-root", str(idle_proc(self.base / f"proc-{name}"))],
                                interval_ms=1000)

    def _run(self) -> bool:
        target, honest = self._node("target"), self._node("honest")
        eventually(lambda: "honest" in target.peer_names() and "target" in honest.peer_names(), 15,
                   what="the honest peer and the target to see each other")
        procs = [psutil.Process(target.pid), psutil.Process(honest.pid)]
        port = int(target.status()["port"])
        cases: list[tuple[str, Callable[[int], int]]] = [
            ("udp_garbage", self.udp_garbage), ("udp_member", self.udp_member),
            ("tcp_nokey", lambda n: asyncio.run(self.tcp_nokey(n, port))),
            ("tcp_frames", lambda n: asyncio.run(self.tcp_frames(n, port))),
            ("control", lambda n: self.control(n, target))]
        # warm-up, 2 % of the attack: every path the attack takes has run, and the bounded tables (peers,
        # replay memory, names, warn-once) have filled, before RSS is measured; what that took is shown too
        rss_start = [p.memory_info().rss for p in procs]
        for name, case in cases:
            case(max(20, self.count(name) // 50))
        time.sleep(1.0)
        rss0 = [p.memory_info().rss for p in procs]
        warm = max(r0 - r for r0, r in zip(rss0, rss_start, strict=True))
        cpu0 = sum(sum(p.cpu_times()[:2]) for p in procs)
        late: Vestad | None = None
        with self.honest_traffic(target, honest):
            for i, (name, case) in enumerate(cases):
                t0 = time.monotonic()
                self.sent[name] = case(self.count(name))
                self.say(f"  {name:12} {self.sent[name]:>9,} inputs in {time.monotonic() - t0:6.1f} s")
                if i == 1:   # a new honest node arrives in the middle of the attack
                    late = self._node("late")
            assert late is not None
            try:
                eventually(lambda: "late" in target.peer_names() and "target" in late.peer_names(), 15,
                           what="the late node and the target to list each other")
                late.call("ping", node="target")
            except Exception as exc:  # noqa: BLE001 - counted
                self.refused.append(f"late node not admitted: {exc}")
        time.sleep(1.0)
        # what members said about themselves: capacity clamped, the target's name still the target's
        target_fp = target.status()["fingerprint"]
        members = [r for n in (target, honest) for r in n.peers() if r["version"] == "soak"]
        lies = [f"{r['name']}: {r['cores']} cores" for r in members
                if r["cores"] > PLAUSIBLE_CORES or r["offered_cores"] > r["cores"]
                or r["spare_cores"] > r["offered_cores"]]
        lies += [f"an impostor is shown as 'target' ({r['fingerprint'][:8]})" for r in honest.peers()
                 if r["name"] == "target" and r["fingerprint"] != target_fp]
        growth = max(p.memory_info().rss - r for p, r in zip(procs, rss0, strict=True))
        cpu = sum(sum(p.cpu_times()[:2]) for p in procs) - cpu0
        received = sum(n.status()["counters"].get("datagrams_received", 0) for n in (target, honest, late))
        total = sum(self.sent.values())
        # the datagrams that reached a daemon (the kernel drops what a full receive buffer cannot take), plus
        # every connection and control request (each reached it)
        reached = min(received, self.sent["udp_garbage"] + self.sent["udp_member"]) + sum(
            self.sent[c] for c in ("tcp_nokey", "tcp_frames", "control"))
        crashes = self._crashes()
        integrity = self.kill_cycles_check(target, honest)
        crashes += self._crashes()
        rows = [
            ("hostile inputs", f"{reached:,} reached a daemon ({total:,} sent; {received:,} datagrams received)",
             reached >= (1_000_000 * self.scale if self.need is None else self.need), ">= 10^6"),
            ("crashes", str(crashes), crashes == 0, "0"),
            ("RSS growth", f"{growth / (1 << 20):+.2f} MiB (the larger of target and honest; {warm / (1 << 20):+.2f} "
                           f"MiB in the warm-up)", growth <= RSS_BUDGET, "<= 5 MiB"),
            ("CPU per 1,000 inputs", f"{cpu / total * 1000 * 1000:.1f} ms (target and honest together)", True,
             "reported"),
            ("member lies believed", f"{len(lies)} (of {len(members)} made-up identities listed)"
             + (f": {lies[0]}" if lies else ""), not lies, "0"),
            ("honest refused", f"{len(self.refused)} of {self.pings + 1}"
                               + (f" ({self.refused[0]})" if self.refused else ""), not self.refused, "0"),
            (f"kill -9 x {self.kill_cycles}", integrity or "intact", not integrity, "intact"),
        ]
        ok = all(r[2] for r in rows)
        for what, measured, passed, target_ in rows:
            self.say(f"{what:22} {measured:60} {target_:10} {'PASS' if passed else 'FAIL'}")
        return ok

    def _crashes(self) -> int:
        dead = sum(1 for n in self.cluster.nodes if n.proc is not None and n.proc.poll() is not None
                   and n.proc.returncode != -9)
        return dead + sum(n.log().count("Traceback") for n in self.cluster.nodes)

    def kill_cycles_check(self, target: Vestad, honest: Vestad) -> str:
        """kill -9 the target mid-job ``kill_cycles`` times; "" when records and ledger stayed intact."""
        answered: list[str] = []
        state = target.state_dir
        for cycle in range(self.kill_cycles):
            eventually(lambda: "honest" in target.peer_names(), 15, what="the target to see its peer again")
            done = threading.Event()

            def submit(done: threading.Event = done) -> None:
                while not done.is_set():
                    try:
                        answered.append(target.call("cpu", millions=2)["job_id"])
                    except Exception:  # noqa: BLE001 - the daemon died under it: not answered
                        return

            thread = threading.Thread(target=submit, daemon=True)
            thread.start()
            time.sleep(self.rng.uniform(0.3, 1.2))
            target.kill()
            done.set()
            thread.join(10)
            target.start()
            problem = self._intact(state, target, answered)
            if problem:
                return f"cycle {cycle + 1}: {problem}"
        return ""

    @staticmethod
    def _intact(state: Path, target: Vestad, answered: list[str]) -> str:
        db = sqlite3.connect(f"file:{state / 'vestad-records-target.db'}?mode=ro", uri=True)
        try:
            check = db.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            db.close()
        if check != "ok":
            return f"records integrity_check: {check}"
        if list(state.glob("*.corrupt-*")):
            return f"moved aside as corrupt: {[p.name for p in state.glob('*.corrupt-*')]}"
        ledger = json.loads((state / "vestad-ledger-target.json").read_text()) if (
            state / "vestad-ledger-target.json").exists() else {"peers": {}}
        for fp, acct in ledger["peers"].items():
            if not all(isinstance(acct[k], (int, float)) and acct[k] >= 0 for k in ("lent", "borrowed")):
                return f"ledger account {fp[:8]} invalid: {acct}"
        jobs = {j["id"]: j for j in target.call("jobs", limit=10_000)}
        lost = [j for j in answered if j not in jobs]
        if lost:
            return f"{len(lost)} answered job(s) not on record: {lost[:3]}"
        wrong = [j for j in answered if jobs[j]["state"] != "succeeded"]
        if wrong:
            return f"answered job(s) not recorded as succeeded: {wrong[:3]}"
        return ""


def _flip(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _udp_from(source: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((source, 0))
    return s


def _send(s: socket.socket, data: bytes, port: int) -> None:
    with contextlib.suppress(OSError):   # a full send buffer, a datagram too large: the next one goes
        s.sendto(data, ("127.0.0.1", port))


def main(argv: list[str]) -> int:
    scale = float(argv[0]) if argv else 1.0
    cycles = int(argv[1]) if len(argv) > 1 else 20
    soak = Soak(scale=scale, kill_cycles=cycles)
    soak.say(f"soak: scale {scale:g} ({sum(soak.count(c) for c in FULL):,} hostile inputs), {cycles} kill -9 cycles")
    ok = soak.run()
    soak.say("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
