"""Placement that counts work in flight, across real daemons: a burst spreads over both nodes, a queued
job is placed as soon as a peer frees up, an unknown --on name is refused at once, and `vesta show`
says why each node was or was not chosen.

As in tests/test_submitter_daemon.py, each daemon is pinned to one core and the peer ``b`` reads an idle
/proc fixture, so what it advertises does not depend on what else runs on this machine.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Cluster, Vestad, eventually, idle_proc
from tests.test_submitter_daemon import generous

pytestmark = pytest.mark.integration


def test_a_burst_of_sixteen_jobs_spreads_over_both_nodes(cluster: Cluster, tmp_path: Path) -> None:
    # a never spills (spill_cpu_pct 100): other processes on a's core must not send the whole burst to b.
    a = cluster.add("a", cpus="0", args=generous(tmp_path, spill_cpu_pct=100))
    b = cluster.add("b", cpus="1", args=[*generous(tmp_path), "-proc-root", str(idle_proc(tmp_path / "proc-b"))])
    eventually(lambda: a.peer_names() == {"b"} and b.peer_names() == {"a"}, 5)
    eventually(lambda: next(p for p in a.peers() if p["name"] == "b")["spare_cores"] >= 0.5, 5,
               what="b to advertise a spare core")
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def submit() -> None:
        try:
            results.append(a.call("cpu", millions=20, split=False))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 16, errors
    where = [{p["node"] for p in r["parts"]} for r in results]
    assert all(len(nodes) == 1 for nodes in where), where          # --no-split: one node each
    on_b = sum(1 for nodes in where if nodes == {"b"})
    # Two one-slot nodes: half the burst each, give or take the jobs that ran while the other was busy.
    assert 4 <= on_b <= 12, where
    hosted = [h for h in b.call("jobs", hosted=True, limit=200) if h["kind"] == "cpu"]
    assert {h["job_id"] for h in hosted} == {r["job_id"] for r, nodes in zip(results, where, strict=True)
                                            if nodes == {"b"}}
    # Every job's record says where it went and why not elsewhere.
    record = a.call("show", job_id=results[0]["job_id"])
    chosen = [row["node"] for row in record["placement"] if row["chosen"]]
    assert chosen == sorted(where[0]) and {row["node"] for row in record["placement"]} == {"a", "b"}


def exec_trio(cluster: Cluster, tmp_path: Path, interval_ms: int) -> tuple[Vestad, Vestad, Vestad]:
    """a and c submit; only b allows exec, with one slot."""
    a = cluster.add("a", cpus="0", args=generous(tmp_path), interval_ms=interval_ms)
    idle = ["-proc-root", str(idle_proc(tmp_path / "proc-b"))]
    b = cluster.add("b", cpus="1", args=[*generous(tmp_path), "-allow-exec", *idle], interval_ms=interval_ms)
    c = cluster.add("c", cpus="0", interval_ms=interval_ms)
    eventually(lambda: a.peer_names() == {"b", "c"} and c.peer_names() == {"a", "b"}, 10)
    return a, b, c


def test_a_queued_job_is_placed_within_one_beacon_interval_of_a_peer_freeing_up(
        cluster: Cluster, tmp_path: Path) -> None:
    interval = 1.0
    a, b, c = exec_trio(cluster, tmp_path, int(interval * 1000))
    # c's job holds b's one slot; a learns it only from b's beacons.
    busy = c.vesta("exec", "--detach", "--on", "b", "--", "sleep", "2")
    assert busy.returncode == 0, busy.stderr
    other = busy.stdout.strip()
    eventually(lambda: len(b.status()["hosting"]) == 1, 5, what="b to run c's job")
    eventually(lambda: next(p for p in a.peers() if p["name"] == "b")["running"] == 1, 5,
               what="a to see b busy")
    out = a.vesta("exec", "--queue", "--detach", "--", "true")
    assert out.returncode == 0, out.stderr
    queued = out.stdout.strip()
    eventually(lambda: "busy with 1 of 1 slots" in a.call("show", job_id=queued)["reason"], 5,
               what="the job to wait for b's slot")
    assert c.vesta("wait", other, "--timeout", "20").returncode == 0
    done = eventually(lambda: (r := a.call("show", job_id=queued))["state"] == "succeeded" and r, 10)
    freed = c.call("show", job_id=other)["finished"]
    # b freed its slot when c's job ended; a hears it with b's next beacon and places the job at once.
    assert done["started"] - freed < interval + 0.5, (done["started"], freed)
    assert [p["node"] for p in done["parts"]] == ["b"]


def test_an_unknown_on_name_is_refused_at_once_queued_or_not(cluster: Cluster, tmp_path: Path) -> None:
    a, b, _ = exec_trio(cluster, tmp_path, 200)
    for queue in (["--queue", "--detach"], []):
        out = a.vesta("exec", *queue, "--on", "nowhere", "--", "true", timeout=10)
        assert out.returncode == 1 and "no node named 'nowhere'" in out.stderr, (queue, out.stdout, out.stderr)
    assert a.call("jobs", state="queued") == []
    out = a.vesta("cpu", "1", "--on", "nowhere", timeout=10)
    assert out.returncode == 1 and "no node named 'nowhere'" in out.stderr
    # A node seen before that is gone for now is not unknown: a queued job waits for it.
    b.stop()
    eventually(lambda: "b" not in a.peer_names(), 10)
    out = a.vesta("exec", "--queue", "--detach", "--on", "b", "--", "true")
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    eventually(lambda: a.call("show", job_id=job)["reason"] == "waiting for node b to come back", 5)


def test_vesta_show_says_why_not_there(cluster: Cluster, tmp_path: Path) -> None:
    a, _, c = exec_trio(cluster, tmp_path, 200)
    out = a.vesta("exec", "--json", "--", "echo", "hi")
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)["job_id"]
    text = a.vesta("show", job)
    assert text.returncode == 0
    assert "why not there?" in text.stdout
    after = text.stdout.split("why not there?", 1)[1]   # piped: one row a line, tab-separated
    rows = {cells[0]: cells for cells in (line.split("\t") for line in after.splitlines()) if len(cells) == 4}
    assert rows["a"][1:] == ["no", "0/1", "exec off"] and rows["c"][3] == "exec off", text.stdout
    assert rows["b"][1] == "yes" and rows["b"][3] == "-", text.stdout
    record = json.loads(a.vesta("show", job, "--json").stdout)
    rows = {r["node"]: r for r in record["placement"]}
    assert rows["b"]["chosen"] and rows["b"]["why"] == "" and rows["b"]["slots"] == 1
    assert (rows["a"]["chosen"], rows["a"]["why"]) == (False, "exec off")
