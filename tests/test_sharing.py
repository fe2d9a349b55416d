"""Cooperative rules across real daemons: the borrow cap, the ledger surviving kill -9, lending hours.

Both daemons read idle /proc fixtures (see tests/test_jobs.py): these tests are
about who may borrow, so a busy test machine must not turn a ledger answer
into a capacity one.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Cluster, Vestad, eventually, idle_proc

pytestmark = pytest.mark.integration


def node(cluster: Cluster, tmp_path: Path, name: str, cpus: str, **cfg: Any) -> Vestad:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"cpu_offer_pct": 100, "reserve_pct": 0, **cfg}))
    return cluster.add(name, cpus=cpus,
                       args=["-config", str(path), "-proc-root", str(idle_proc(tmp_path / f"proc-{name}"))])


def ledger_row(n: Vestad, peer: str) -> dict[str, Any] | None:
    return next((r for r in n.call("ledger")["peers"] if r["name"] == peer), None)


def test_a_leeching_peer_is_refused_at_its_cap_and_let_back_in_after_it_lends(cluster: Cluster,
                                                                               tmp_path: Path) -> None:
    # b lets a new peer borrow 2 x 0.5 = 1 core-second before it has lent anything.
    a = node(cluster, tmp_path, "a", "0")
    b = node(cluster, tmp_path, "b", "1", goodwill_core_s=0.5, max_borrow_ratio=2)
    eventually(lambda: a.peer_names() == {"b"} and b.peer_names() == {"a"}, 5)

    # a borrows job after job (about 0.2 core-seconds of b's CPU each) until b's cap stops it. Not one
    # big job: its chunks are admitted one by one, so where it crosses the cap depends on the machine's speed.
    ran = 0
    while ran < 40 and (out := a.vesta("cpu", "5", "--on", "b")).returncode == 0:
        ran += 1
    assert ran >= 2, out.stderr   # 2 x 0.2 core-s stay under the cap of 1
    assert out.returncode == 1, f"b never capped a after {ran} jobs"
    assert "b: refused (ledger: borrow cap reached: a has used" in out.stderr
    row = eventually(lambda: ledger_row(b, "a"), 3)
    assert row["lent"] >= 1.0 and row["borrowed"] == 0 and row["state"] == "capped"
    assert eventually(lambda: ledger_row(a, "b"), 3)["borrowed"] == pytest.approx(row["lent"], rel=0.05)
    assert b.status()["counters"].get("offers_refused", 0) >= 1

    # a lends to b: its cap at b grows to 2 x what it lent.
    r = b.call("cpu", millions=40, on="a")
    assert [p["node"] for p in r["parts"]] == ["a"]
    row = eventually(lambda: (row := ledger_row(b, "a")) and row["borrowed"] > 1.0 and row, 3)
    assert row["cap"] == pytest.approx(2 * row["borrowed"], rel=0.01) and row["state"] == "ok"
    r = a.call("cpu", millions=2, on="b")
    assert [p["node"] for p in r["parts"]] == ["b"]

    out = b.vesta("ledger")
    assert out.returncode == 0 and "a (" in out.stdout and "borrowed" in out.stdout and "cap" in out.stdout
    out = a.vesta("peers")
    assert "balance" in out.stdout


def test_ledger_survives_kill_9_and_a_corrupt_file_is_set_aside(cluster: Cluster, tmp_path: Path) -> None:
    a = node(cluster, tmp_path, "a", "0")
    b = node(cluster, tmp_path, "b", "1")
    eventually(lambda: a.peer_names() == {"b"}, 5)
    a.call("cpu", millions=10, on="b")
    before = eventually(lambda: ledger_row(b, "a"), 3)
    ledger_file = b.state_dir / "vestad-ledger-b.json"

    def flushed() -> bool:  # the write-behind (milliseconds) has reached the disk
        try:
            saved = json.loads(ledger_file.read_text())["peers"]
        except (OSError, ValueError, KeyError):
            return False
        return any(acct["lent_chunks"] == before["lent_chunks"] for acct in saved.values())

    eventually(flushed, 3)
    b.kill()
    b.start()
    after = ledger_row(b, "a")
    assert after is not None
    assert after["lent"] == pytest.approx(before["lent"], rel=1e-3)      # (decay over seconds is negligible)
    assert after["lent_chunks"] == before["lent_chunks"]

    # kill -9 in the middle of a stream of ledger writes: the file is whole afterwards, never corrupt.
    eventually(lambda: b.peer_names() == {"a"} and a.peer_names() == {"b"}, 5)
    import threading

    threading.Thread(target=lambda: a.vesta("cpu", "40", "--on", "b"), daemon=True).start()
    eventually(lambda: (r := ledger_row(b, "a")) and r["lent_chunks"] > before["lent_chunks"] + 1, 10, interval=0.01)
    b.kill()
    b.start()
    assert not list(b.state_dir.glob("vestad-ledger-b.json.corrupt-*"))
    assert ledger_row(b, "a")["lent_chunks"] > before["lent_chunks"]

    b.stop()
    ledger_file.write_bytes(b'{"version": 1, "peers": {"trunc')        # as a torn write would look
    b.start()
    assert b.call("ledger")["peers"] == []
    assert list(b.state_dir.glob("vestad-ledger-b.json.corrupt-*"))
    assert "is unreadable" in b.log() and "started a fresh ledger" in b.log()
    eventually(lambda: b.peer_names() == {"a"}, 5)
    a.call("cpu", millions=2, on="b")                                   # and it keeps serving
    assert eventually(lambda: ledger_row(b, "a"), 3)["lent_chunks"] >= 1


def window_not_now() -> str:
    """A daily one-hour window that starts two hours from now (local time)."""
    start = dt.datetime.now() + dt.timedelta(hours=2)
    end = start + dt.timedelta(hours=1)
    return f"daily {start:%H}:00-{end:%H}:00"


def test_a_node_outside_its_lending_hours_offers_nothing_and_refuses(cluster: Cluster, tmp_path: Path) -> None:
    window = window_not_now()
    a = node(cluster, tmp_path, "a", "0")
    b = node(cluster, tmp_path, "b", "1", lend_hours=[window])
    eventually(lambda: a.peer_names() == {"b"}, 5)
    row = next(p for p in a.peers() if p["name"] == "b")
    assert row["lending"] == "closed" and row["offered_cores"] == 0 and row["spare_cores"] == 0
    status = b.status()
    assert status["lending"]["open"] is False
    assert "closed; lending resumes" in status["lending"]["describe"]
    out = a.vesta("cpu", "2", "--on", "b")
    assert out.returncode == 1
    assert "b: refused (hours: b lends only in its agreed hours: closed; lending resumes" in out.stderr
    # Its owner's own work still runs at home.
    r = b.call("cpu", millions=2, on="b")
    assert [p["node"] for p in r["parts"]] == ["b"]
    assert "lending hours" in b.vesta("status").stdout


def test_malformed_lending_hours_are_a_config_error(cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"lend_hours": ["Mon-Fri 18:00-08:00", "Funday 25:00-26:00"]}))
    bad = cluster.add("bad", start=False, args=["-config", str(path)])
    import subprocess

    out = subprocess.run(bad.command(), env=bad.env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Funday 25:00-26:00" in lines[0] and "Mon-Fri 18:00-08:00" in lines[0]
