"""Real vestad processes on this host: discovery, expiry, restart, the CLI against them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.helpers import Cluster, eventually

pytestmark = pytest.mark.integration


def test_three_daemons_discover_each_other_by_broadcast_alone(cluster: Cluster) -> None:
    nodes = [cluster.add(n, start=False) for n in ("desk", "pi4", "laptop")]
    for node in nodes:
        node.start(wait=False)
    for node in nodes:
        node.wait_ready()
    t0 = time.monotonic()
    for node in nodes:
        others = {n.name for n in nodes} - {node.name}
        eventually(lambda node=node, others=others: node.peer_names() == others, timeout=3.0,
                   what=f"{node.name} to list {others}")
    assert time.monotonic() - t0 < 3.0
    # Every daemon reports live load and a real TCP address for the others.
    for row in nodes[0].peers():
        assert row["cores"] >= 1 and 0 <= row["cpu_pct"] <= 100
        assert row["address"].startswith("127.0.0.1:") and not row["address"].endswith(":0")
        assert len(row["fingerprint"]) == 32
        assert row["state"] == "alive"


def test_wrong_key_node_is_never_listed_and_is_counted(cluster: Cluster) -> None:
    a = cluster.add("alpha")
    b = cluster.add("beta")
    intruder = cluster.add("intruder", key="not-the-federation-key-at-all-0000")
    eventually(lambda: a.peer_names() == {"beta"} and b.peer_names() == {"alpha"}, 3.0)
    eventually(lambda: a.status()["counters"].get("dropped_bad_auth", 0) >= 3, 3.0,
               what="alpha to count the intruder's beacons as bad")
    time.sleep(0.5)  # several more intruder beacons: still never listed
    assert a.peer_names() == {"beta"}
    assert intruder.peer_names() == set()
    assert intruder.status()["counters"].get("dropped_bad_auth", 0) >= 1
    assert a.status()["key_id"] == b.status()["key_id"] != intruder.status()["key_id"]
    # The daemon logged it once, readably, and kept serving.
    assert "wrong federation key" in a.log()
    assert a.running() and b.running()


def test_killed_daemon_expires_and_returns_with_the_same_fingerprint(cluster: Cluster) -> None:
    a = cluster.add("stay")
    b = cluster.add("flaky")
    eventually(lambda: a.peer_names() == {"flaky"}, 3.0)
    fingerprint = b.status()["fingerprint"]
    b.kill()
    # Suspect after 3 missed intervals (0.6 s), removed after 10 (2 s) at a 200 ms interval.
    eventually(lambda: [p["state"] for p in a.peers()] == ["suspect"], 2.0, what="flaky to turn suspect")
    eventually(lambda: a.peer_names() == set(), 4.0, what="flaky to expire")
    b.start()
    row = eventually(lambda: next((p for p in a.peers() if p["name"] == "flaky"), None), 3.0)
    assert row["fingerprint"] == fingerprint
    assert b.status()["fingerprint"] == fingerprint
    assert "flaky left" in a.log() or "peer flaky left" in a.log()


def test_sigterm_stops_cleanly_and_removes_the_socket(cluster: Cluster) -> None:
    a = cluster.add("tidy")
    sock = cluster.runtime_dir / "vestad-tidy.sock"
    assert sock.is_socket()
    assert (sock.stat().st_mode & 0o777) == 0o600
    assert a.stop() == 0
    assert not sock.exists()
    assert "stopped" in a.log()


def test_cli_peers_and_status_against_real_daemons(cluster: Cluster) -> None:
    a = cluster.add("desk")
    cluster.add("pi4")
    eventually(lambda: a.peer_names() == {"pi4"}, 3.0)

    out = a.vesta("peers")
    assert out.returncode == 0, out.stderr
    assert "desk (self)" in out.stdout and "pi4" in out.stdout and "cpu%" in out.stdout

    out = a.vesta("peers", "--json")
    rows = json.loads(out.stdout)
    assert {r["name"] for r in rows} == {"desk", "pi4"}
    assert all(len(r["fingerprint"]) == 32 for r in rows)

    out = a.vesta("status", "--json")
    status = json.loads(out.stdout)
    assert status["name"] == "desk" and status["peers"]["alive"] == 1
    assert status["fingerprint"] in a.log()

    out = a.vesta("status")
    assert out.returncode == 0 and status["fingerprint"] in out.stdout and "dropped packets" in out.stdout

    out = a.vesta("ping", "pi4", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["node"] == "pi4"

    out = a.vesta("ping", "nobody")
    assert out.returncode == 1
    assert out.stderr.strip() == "vesta: error: no peer named 'nobody' (known: pi4); see `vesta peers`"


def test_a_stopped_daemon_says_goodbye_and_is_dropped_at_once(cluster: Cluster, tmp_path: Path) -> None:
    cfg = tmp_path / "slow.json"
    cfg.write_text(json.dumps({"advertise_spare_ms": 1000}))   # a silent peer turns suspect only after 3 s
    a = cluster.add("stay", args=["-config", str(cfg)])
    b = cluster.add("going", args=["-config", str(cfg)])
    eventually(lambda: a.peer_names() == {"going"}, 5.0)
    b.stop()
    # Gone well before a timeout could have noticed (suspect after 3 s, removed after 10 s).
    eventually(lambda: a.peer_names() == set(), 1.5, what="going to be dropped on its goodbye")
    assert "said goodbye" in a.log()
    assert a.status()["counters"]["goodbyes"] == 1
