"""Jobs across real daemons: split, spill, refusal and re-route, a peer killed mid-job, cancel, mem.

Each daemon is pinned to one core with taskset, so on this 2-core machine two
daemons behave like two one-core machines. The submitter ``a`` measures its
real core; the peer ``b`` reads an idle /proc fixture, because on a machine
shared with the test runner (and every CLI it starts) an idle peer cannot be
real, and routing tests must not depend on what else the scheduler put on b's core.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Cluster, Vestad, eventually, idle_proc, tool
from vesta import workloads

pytestmark = pytest.mark.integration


def generous(tmp_path: Path, **extra: Any) -> list[str]:
    """A config that lends the whole (pinned) core, so a one-core daemon offers one slot."""
    cfg = tmp_path / f"lend-{len(list(tmp_path.glob('lend-*')))}.json"
    cfg.write_text(json.dumps({"cpu_offer_pct": 100, "reserve_pct": 0, "spill_cpu_pct": 80, **extra}))
    return ["-config", str(cfg)]


def pair(cluster: Cluster, tmp_path: Path, **b_kw: Any) -> tuple[Vestad, Vestad]:
    a = cluster.add("a", cpus="0", args=generous(tmp_path))
    idle = ["-proc-root", str(idle_proc(tmp_path / "proc-b"))]
    b = cluster.add("b", cpus="1", args=b_kw.pop("args", generous(tmp_path)) + idle, **b_kw)
    eventually(lambda: a.peer_names() == {"b"} and b.peer_names() == {"a"}, 5)
    return a, b


def expected_digest(job_id: str, iterations: int) -> str:
    units = workloads.units_for(iterations)
    return workloads.job_digest(workloads.hash_units(job_id, iterations, 0, units, threads=2).digests)


def cpu_json(node: Vestad, *args: str, timeout: float = 120) -> dict[str, Any]:
    out = node.vesta("cpu", *args, "--json", timeout=timeout)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_split_runs_chunks_on_every_node_and_the_digest_matches(cluster: Cluster, tmp_path: Path) -> None:
    a, b = pair(cluster, tmp_path)
    eventually(lambda: next(p for p in a.peers() if p["name"] == "b")["spare_cores"] >= 0.5, 5,
               what="b to advertise a spare core")
    eventually(lambda: a.status()["node"]["cpu_pct"] < 50, 5, what="a's own core to settle after start-up")
    # Through the test's own control client: a CLI starting up would load a's one core for a moment.
    r = a.call("cpu", millions=24)
    assert r["iterations"] == 24_000_000
    assert {p["node"] for p in r["parts"]} == {"a", "b"}, r["parts"]
    assert sum(p["iterations"] for p in r["parts"]) == 24_000_000
    assert r["chunks"] > 2 and len(r["chunk_list"]) == r["chunks"]
    assert r["digest"] == expected_digest(r["job_id"], 24_000_000)


def test_small_or_no_split_job_stays_on_one_node(cluster: Cluster, tmp_path: Path) -> None:
    a, _ = pair(cluster, tmp_path)
    r = cpu_json(a, "24", "--no-split")
    assert len(r["parts"]) == 1, (r["chunk_list"], r["replaced"])
    r = cpu_json(a, "2")   # below the split threshold
    assert len(r["parts"]) == 1
    assert r["digest"] == expected_digest(r["job_id"], 2_000_000)


def test_on_forces_a_node_and_unknown_node_is_an_error(cluster: Cluster, tmp_path: Path) -> None:
    a, _ = pair(cluster, tmp_path)
    r = cpu_json(a, "3", "--on", "b")
    assert [p["node"] for p in r["parts"]] == ["b"], r
    assert r["parts"][0]["hostname"]
    out = a.vesta("cpu", "3", "--on", "nowhere")
    assert out.returncode == 1
    assert out.stderr.strip() == "vesta: error: no node named 'nowhere' (known: a, b)"


def test_stress_makes_work_spill_to_the_peer(cluster: Cluster, tmp_path: Path) -> None:
    a, b = pair(cluster, tmp_path)
    out = a.vesta("stress", "0", "20")
    assert out.returncode == 0 and "stressing 1 cores" in out.stdout
    try:
        eventually(lambda: a.status()["node"]["cpu_pct"] > 80, 5, what="a's own core to look busy")
        eventually(lambda: next(p for p in a.peers() if p["name"] == "b")["spare_cores"] >= 0.5, 5)
        r = a.call("cpu", millions=4)   # no CLI start-up on b's core at the moment of choosing
        assert [p["node"] for p in r["parts"]] == ["b"], r["parts"]
    finally:
        out = a.vesta("stop-stress")
    assert out.returncode == 0 and "stress stopped" in out.stdout


def test_refused_chunks_are_placed_elsewhere(cluster: Cluster, tmp_path: Path) -> None:
    # b's owner starts using its core; a still sees b's last (idle) beacon and offers it work,
    # which b refuses at once: stress counts as the owner's load before any sample shows it.
    a, b = pair(cluster, tmp_path)
    eventually(lambda: next(p for p in a.peers() if p["name"] == "b")["spare_cores"] >= 0.5, 5)
    assert b.vesta("stress", "0", "30").returncode == 0
    try:
        r = cpu_json(a, "20")
    finally:
        b.vesta("stop-stress")
    assert [p["node"] for p in r["parts"]] == ["a"]
    assert r["replaced"] and r["replaced"][0]["node"] == "b"
    assert "refused (capacity" in r["replaced"][0]["why"]
    assert r["digest"] == expected_digest(r["job_id"], 20_000_000)
    assert b.status()["counters"].get("offers_refused", 0) >= 1


def test_forced_node_that_refuses_fails_with_its_reason(cluster: Cluster, tmp_path: Path) -> None:
    a, b = pair(cluster, tmp_path, args=generous(tmp_path, cpu_offer_pct=0))
    out = a.vesta("cpu", "2", "--on", "b")
    assert out.returncode == 1
    line = out.stderr.strip()
    assert line.startswith("vesta: error: no node could run job") and "b: refused (capacity" in line


def test_peer_killed_mid_job_and_the_job_still_completes(cluster: Cluster, tmp_path: Path) -> None:
    a, b = pair(cluster, tmp_path)
    eventually(lambda: next(p for p in a.peers() if p["name"] == "b")["spare_cores"] >= 0.5, 5)
    results: list[Any] = []
    submit = threading.Thread(target=lambda: results.append(a.call("cpu", millions=60)), daemon=True)
    submit.start()
    eventually(lambda: b.status()["hosting"], 10, interval=0.02, what="b to run a chunk")
    b.kill()
    submit.join(timeout=120)
    assert results, "the job did not finish"
    r = results[0]
    assert any(m["node"] == "b" and "lost" in m["why"] for m in r["replaced"]), r["replaced"]
    assert sum(p["iterations"] for p in r["parts"]) == 60_000_000
    assert r["digest"] == expected_digest(r["job_id"], 60_000_000)


def test_max_attempts_bounds_how_often_a_lost_chunk_runs_again(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.add("a", cpus="0", args=generous(tmp_path, max_attempts=1))
    b = cluster.add("b", cpus="1", args=generous(tmp_path) + ["-proc-root", str(idle_proc(tmp_path / "proc-b"))])
    eventually(lambda: a.peer_names() == {"b"}, 5)
    eventually(lambda: next(p for p in a.peers() if p["name"] == "b")["spare_cores"] >= 0.5, 5)
    proc = subprocess.Popen(tool("vesta") + ["-name", "a", "cpu", "60", "--on", "b"], env=a.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with proc:
        try:
            eventually(lambda: b.status()["hosting"], 10, interval=0.02, what="b to run a chunk")
            b.kill()
            _, stderr = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 1
    assert "chunk 0 failed 1 times (max_attempts 1); last on b: lost" in stderr, stderr
    job = a.call("jobs")[0]
    assert job["state"] == "failed"
    parts = a.call("show", job_id=job["id"])["parts"]
    assert [(p["node"], p["state"]) for p in parts] == [("b", "lost")]


def test_cancel_stops_the_job_everywhere(cluster: Cluster, tmp_path: Path) -> None:
    a, b = pair(cluster, tmp_path)
    eventually(lambda: next(p for p in a.peers() if p["name"] == "b")["spare_cores"] >= 0.5, 5)
    proc = subprocess.Popen(tool("vesta") + ["-name", "a", "cpu", "5000"], env=a.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with proc:
        try:
            job = eventually(lambda: a.status()["jobs"], 10, what="the job to start")[0]["job_id"]
            eventually(lambda: b.status()["hosting"], 10, what="b to run a chunk")
            out = a.vesta("cancel", job)
            assert out.returncode == 0 and f"cancelled {job}" in out.stdout
            _, stderr = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 1
    assert f"job {job} cancelled" in stderr
    eventually(lambda: not b.status()["hosting"] and not a.status()["jobs"], 5, what="work to stop everywhere")
    out = a.vesta("cancel", job)
    assert out.returncode == 1 and "no running job" in out.stderr


def test_mem_runs_where_it_fits_and_too_big_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.add("a", args=generous(tmp_path, mem_offer_mb=64))
    b = cluster.add("b", args=generous(tmp_path, mem_offer_mb=512))
    eventually(lambda: a.peer_names() == {"b"}, 5)
    out = a.vesta("mem", "200", "50", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["node"] == "b"
    out = a.vesta("mem", "100000", "10")
    assert out.returncode == 1
    line = out.stderr.strip()
    assert "no node can hold 100000 MiB" in line and "a offers 64 MiB" in line and "b offers 512 MiB" in line
    out = a.vesta("mem", "0", "10")
    assert out.returncode == 2
    _ = b


def test_cpu_text_output_and_bad_arguments(cluster: Cluster, tmp_path: Path) -> None:
    a, _ = pair(cluster, tmp_path)
    out = a.vesta("cpu", "2")
    assert out.returncode == 0, out.stderr
    assert "digest" in out.stdout and "M it/s" in out.stdout and "iterations in" in out.stdout
    for bad in (["cpu", "0"], ["cpu", "abc"], ["cpu", "-5"], ["stress", "1", "0"]):
        out = a.vesta(*bad)
        assert out.returncode in (1, 2), bad
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
