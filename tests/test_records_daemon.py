"""What ran where, from real daemons: job records, parts, hosted runs, stored logs, restarts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Cluster, Vestad, eventually, idle_proc, tool

pytestmark = pytest.mark.integration


def pair(cluster: Cluster, tmp_path: Path, **cfg: Any) -> tuple[Vestad, Vestad]:
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"allow_exec": True, **cfg}))
    a = cluster.add("a", args=["-config", str(path)])
    b = cluster.add("b", args=["-config", str(path), "-proc-root", str(idle_proc(tmp_path / "proc-b"))])
    eventually(lambda: a.peer_names() == {"b"} and b.peer_names() == {"a"}, 5)
    return a, b


def as_json(node: Vestad, *args: str) -> Any:
    out = node.vesta(*args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_an_exec_job_is_recorded_on_both_sides_with_its_output(cluster: Cluster, tmp_path: Path) -> None:
    a, b = pair(cluster, tmp_path)
    out = a.vesta("exec", "--on", "b", "--", "sh", "-c", "echo hello; echo oops >&2; exit 4")
    assert out.returncode == 4
    job = as_json(a, "jobs")[0]
    assert job["kind"] == "exec" and job["state"] == "failed" and job["exit_code"] == 4
    assert job["args"]["argv"] == ["sh", "-c", "echo hello; echo oops >&2; exit 4"]
    record = as_json(a, "show", job["id"])
    assert record["submitter"] == "a" and record["started"] and record["finished"] >= record["started"]
    assert [(p["node"], p["state"]) for p in record["parts"]] == [("b", "succeeded")]
    logs = a.vesta("logs", job["id"])
    assert logs.returncode == 0 and logs.stdout == "hello\noops\n"
    hosted = as_json(b, "jobs", "--hosted")[0]
    assert hosted["job_id"] == job["id"] and hosted["peer"] == "a" and hosted["exit_code"] == 4
    assert hosted["state"] == "failed" and hosted["finished"] >= hosted["started"]
    text = b.vesta("jobs", "--hosted").stdout
    assert job["id"] in text and "exec sh -c" in text
    assert "succeeded" not in a.vesta("jobs", "--state", "failed").stdout
    assert a.vesta("show", "jnothere").returncode == 1


def test_output_over_the_cap_is_cut_and_marked(cluster: Cluster, tmp_path: Path) -> None:
    a, _ = pair(cluster, tmp_path, log_cap_bytes=1000)
    out = a.vesta("exec", "--", "sh", "-c", "yes x | head -c 5000")
    assert out.returncode == 0 and len(out.stdout) == 5000     # the live stream is not cut
    job = as_json(a, "jobs")[0]
    record = as_json(a, "show", job["id"])
    assert record["log_truncated"] is True and record["log_bytes"] == 1000
    stored = a.vesta("logs", job["id"]).stdout
    assert stored.startswith("x\nx\n") and len(stored.split("[vesta")[0]) == 1001 and "output truncated" in stored


def test_cpu_parts_show_a_lost_attempt_and_records_survive_kill_9(cluster: Cluster, tmp_path: Path) -> None:
    a, b = pair(cluster, tmp_path)
    proc = subprocess.Popen(tool("vesta") + ["-name", "a", "cpu", "60", "--json"], env=a.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with proc:
        try:
            eventually(lambda: b.status()["hosting"], 10, interval=0.02)
            b.kill()
            stdout, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    job_id = json.loads(stdout)["job_id"]
    record = as_json(a, "show", job_id)
    assert record["state"] == "succeeded"
    states = {(p["node"], p["state"]) for p in record["parts"]}
    assert ("b", "lost") in states and ("a", "succeeded") in states
    # a is killed in the middle of its next job: after a restart the finished record is intact
    # and the interrupted one is marked failed, not left running forever.
    proc = subprocess.Popen(tool("vesta") + ["-name", "a", "cpu", "5000"], env=a.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with proc:
        try:
            running = eventually(lambda: a.status()["jobs"], 10)[0]["job_id"]
            a.kill()
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
    a.start()
    assert as_json(a, "show", job_id)["state"] == "succeeded"
    again = as_json(a, "show", running)
    assert again["state"] == "failed" and again["reason"] == "daemon restarted"


def test_detached_exec_and_wait(cluster: Cluster, tmp_path: Path) -> None:
    a, _ = pair(cluster, tmp_path)
    out = a.vesta("exec", "--detach", "--", "sh", "-c", "sleep 4; echo done; exit 3")
    assert out.returncode == 0
    job_id = out.stdout.strip()
    assert job_id.startswith("j") and as_json(a, "show", job_id)["state"] == "running"
    out = a.vesta("wait", job_id, "--timeout", "0.2")
    assert out.returncode == 124 and "still running" in out.stderr
    out = a.vesta("wait", job_id)
    assert out.returncode == 3 and f"{job_id} failed, exit 3" in out.stdout
    assert a.vesta("logs", job_id).stdout == "done\n"
    # a detached job that cannot run anywhere is on record too, with why
    cluster.nodes[1].stop()
    eventually(lambda: a.peer_names() == set(), 5)
    out = a.vesta("exec", "--detach", "--on", "nowhere", "--", "true")
    failed = out.stdout.strip()
    out = a.vesta("wait", failed)
    assert out.returncode == 1 and "no node named 'nowhere'" in out.stdout


def test_jobs_all_gathers_every_members_records(cluster: Cluster, tmp_path: Path) -> None:
    a, b = pair(cluster, tmp_path)
    c = cluster.add("c", args=["-allow-exec"], interval_ms=1000)   # listed for seconds after it dies
    eventually(lambda: a.peer_names() == {"b", "c"} and c.peer_names() == {"a", "b"}, 5)
    assert a.vesta("exec", "--on", "b", "--", "echo", "from-a").returncode == 0
    assert c.vesta("exec", "--on", "b", "--", "echo", "from-c").returncode == 0
    assert b.vesta("cpu", "1", "--on", "b").returncode == 0
    rows = as_json(a, "jobs", "--all")
    by_node = {(r["node"], r["kind"]) for r in rows}
    assert {("a", "exec"), ("c", "exec"), ("b", "cpu")} <= by_node
    text = a.vesta("jobs", "--all").stdout
    assert "node" in text and "echo from-c" in text
    hosted = as_json(c, "jobs", "--hosted", "--all")
    assert {r["peer"] for r in hosted if r["node"] == "b"} == {"a", "c"}
    # a member that stops answering is listed as unreachable, not an error
    c.kill()
    rows = as_json(a, "jobs", "--all")
    assert [r["state"] for r in rows if r["node"] == "c"] == ["unreachable"]
    assert any(r["node"] == "b" for r in rows)
