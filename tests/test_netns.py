"""A real LAN in network namespaces: broadcast across a bridge, a seed across a router, gossip.

Three vestads share a bridged /24 and find each other by broadcast alone; a
fourth, on another subnet behind a router, knows only one of them (-seed).
The other two never had a seed, so only gossip can tell them of it. Needs
root; with VESTA_REQUIRE_NETNS=1 (as .ci/run sets) a missing capability is a
failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests import netns
from tests.helpers import Vestad, eventually, free_udp_port, idle_proc, new_key, short_tmpdir

pytestmark = [pytest.mark.integration, pytest.mark.netns]

WAIT = 10.0   # seconds: the bound on every wait below (beacons go every 0.2 s)


def require_netns() -> None:
    reason = netns.available()
    if reason is None:
        return
    if os.environ.get("VESTA_REQUIRE_NETNS") == "1":
        pytest.fail(f"VESTA_REQUIRE_NETNS=1 but network namespaces are unavailable: {reason}")
    pytest.skip(reason)


def host_of(row: dict[str, object]) -> str:
    host, _, port = str(row["address"]).rpartition(":")
    assert port.isdigit() and int(port) > 0, row
    return host


def test_lan_broadcast_then_seed_across_a_router_then_gossip(tmp_path: Path) -> None:
    require_netns()
    key, dport, runtime = new_key(), free_udp_port(), short_tmpdir()
    nodes: list[Vestad] = []
    try:
        with netns.Lan() as lan:
            def node(name: str, host: netns.Host, args: list[str] | None = None) -> Vestad:
                n = Vestad(name, key, dport, tmp_path / name, runtime, args=args or [], netns=host.ns,
                           bind=None, interval_ms=200)
                nodes.append(n)
                return n

            addr = {f"a{i}": h.addr for i, h in enumerate(lan.hosts_a, 1)} | {"d4": lan.host_b.addr}
            a1, a2, a3 = (node(f"a{i}", h) for i, h in enumerate(lan.hosts_a, 1))
            d4 = node("d4", lan.host_b, ["-seed", f"{lan.hosts_a[0].addr}:{dport}"])
            lan_a = [a1, a2, a3]
            try:
                # 1. Subnet A, no seeds, D not started yet: only broadcast can introduce them.
                for n in lan_a:
                    n.start(wait=False)
                for n in lan_a:
                    n.wait_ready()
                for n in lan_a:
                    others = {m.name for m in lan_a} - {n.name}
                    eventually(lambda n=n, others=others: n.peer_names() == others, WAIT,
                               what=f"{n.name} to find {sorted(others)} by broadcast")
                    assert n.status()["seeds"] == []

                # 2. D on subnet B, seeded with A1 only; A2 and A3 can learn of it by gossip alone.
                d4.start()
                assert d4.status()["seeds"] == [f"{addr['a1']}:{dport}"]
                everyone = {n.name for n in nodes}
                for n in nodes:
                    others = everyone - {n.name}
                    eventually(lambda n=n, others=others: n.peer_names() == others, WAIT,
                               what=f"{n.name} to list {sorted(others)}")

                # Every table holds the namespace addresses (the beacons' sources), never loopback.
                for n in nodes:
                    rows = n.peers()
                    assert {r["name"]: host_of(r) for r in rows} == {m: a for m, a in addr.items() if m != n.name}
                    assert all(r["state"] == "alive" for r in rows), rows

                # A2 had no seed and is not on D's subnet: it heard of D by gossip first.
                d_fp = d4.status()["fingerprint"]
                eventually(lambda: f"learned of peer={d_fp[:8]} addr={addr['d4']}:{dport} by gossip" in a2.log(),
                           WAIT, what="a2's log to say it learned of d4 by gossip")

                # 3. The encrypted TCP link works across the router, both ways.
                pong = a2.call("ping", node="d4")
                assert pong["node"] == "d4" and pong["fingerprint"] == d_fp
                assert pong["address"].startswith(f"{addr['d4']}:")
                pong = d4.call("ping", node="a3")
                assert pong["node"] == "a3" and pong["address"].startswith(f"{addr['a3']}:")
                for n in nodes:
                    assert n.running(), n.log()
            except BaseException:
                print(lan.describe())  # noqa: T201 - shown by pytest only for a failing test
                for n in nodes:
                    print(f"===== {n.name}\n{n.log()}")  # noqa: T201
                raise
            finally:
                for n in nodes:
                    n.stop()   # before the namespaces go
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def test_two_subnets_with_seeds_detect_a_killed_node_and_carry_jobs(tmp_path: Path) -> None:
    """Two subnets joined by a router and a seed each way: jobs cross the router, a SIGKILLed node is
    suspected and then dropped by everyone, and one that stops says goodbye."""
    import json

    require_netns()
    key, dport, runtime = new_key(), free_udp_port(), short_tmpdir()
    nodes: list[Vestad] = []
    try:
        with netns.Lan(hosts_a=2) as lan:
            a1_host, a2_host = lan.hosts_a
            cfg = tmp_path / "node.json"
            # Suspect after 1.5 s, gone after 5 s; lend what there is.
            cfg.write_text(json.dumps({"advertise_spare_ms": 500, "cpu_offer_pct": 100, "reserve_pct": 0}))

            def node(name: str, host: netns.Host, seed: netns.Host) -> Vestad:
                # Each plays an idle machine (this one's cores are shared by every namespace and test).
                idle = idle_proc(tmp_path / f"proc-{name}")
                n = Vestad(name, key, dport, tmp_path / name, runtime, netns=host.ns, bind=None, interval_ms=500,
                           args=["-seed", f"{seed.addr}:{dport}", "-config", str(cfg), "-proc-root", str(idle)])
                nodes.append(n)
                return n

            a1 = node("a1", a1_host, lan.host_b)
            a2 = node("a2", a2_host, lan.host_b)
            b = node("b", lan.host_b, a1_host)
            try:
                for n in nodes:
                    n.start(wait=False)
                for n in nodes:
                    n.wait_ready()
                for n in nodes:
                    others = {"a1", "a2", "b"} - {n.name}
                    eventually(lambda n=n, others=others: n.peer_names() == others, WAIT,
                               what=f"{n.name} to list {sorted(others)}")
                # Jobs cross the router, each way.
                for src, dst in ((b, "a2"), (a1, "b")):
                    eventually(lambda src=src, dst=dst: next(p for p in src.peers() if p["name"] == dst)["spare_cores"]
                               >= 0.5, WAIT, what=f"{dst} to offer a spare core to {src.name}")
                    out = src.vesta("cpu", "2", "--on", dst, "--json", timeout=60)
                    assert out.returncode == 0, out.stderr
                    assert {p["node"] for p in json.loads(out.stdout)["parts"]} == {dst}
                # A SIGKILLed node on subnet A: b, across the router, suspects it, then drops it.
                a2.kill()
                eventually(lambda: {p["name"]: p["state"] for p in b.peers()}.get("a2") in ("suspect", None),
                           WAIT, what="b to suspect a2")
                eventually(lambda: b.peer_names() == {"a1"} and a1.peer_names() == {"b"}, WAIT,
                           what="a2 to be dropped everywhere")
                # Jobs still go where they can.
                eventually(lambda: next(p for p in b.peers() if p["name"] == "a1")["spare_cores"] >= 0.5, WAIT,
                           what="a1 to offer a spare core")
                out = b.vesta("cpu", "2", "--on", "a1", "--json", timeout=60)
                assert out.returncode == 0, out.stderr
                # A node that stops says goodbye: b drops it long before a timeout would (5 s).
                a1.stop()
                eventually(lambda: b.peer_names() == set(), 2.0, what="a1's goodbye to reach b across the router")
                assert "said goodbye" in b.log()
                assert b.running(), b.log()
            except BaseException:
                print(lan.describe())  # noqa: T201 - shown by pytest only for a failing test
                for n in nodes:
                    print(f"===== {n.name}\n{n.log()}")  # noqa: T201
                raise
            finally:
                for n in nodes:
                    n.stop()
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
