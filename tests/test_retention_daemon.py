"""Retention on a real daemon: `vesta gc` through the control socket (a dry run changes nothing), the daily run
the daemon starts by itself, and bad retention settings as one-line config errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from tests.helpers import Cluster, eventually, eventually_async, free_udp_port, new_key
from tests.test_metrics import scrape
from vesta import daemon as daemon_module
from vesta.config import Config
from vesta.control import ControlClient
from vesta.daemon import Daemon
from vesta.errors import ConfigError
from vesta.records import PartEnd, Records
from vesta.spec import ExecSpec, JobRequest

DAY = 86400.0
MIB = 1 << 20


def seed(state_dir: Path, name: str, jobs: dict[str, tuple[float, int]], queued: tuple[str, ...] = ()) -> None:
    """Records made before the daemon starts: for each job, when it ended (days ago) and bytes of its stored
    files; ``queued`` jobs (as old as the oldest) wait for a node that never comes."""
    ages = [days for days, _ in jobs.values()] or [0.0]
    clock_at = [time.time()]
    rec = Records(state_dir / f"vestad-records-{name}.db", clock=lambda: clock_at[0])
    try:
        for job_id in queued:
            clock_at[0] = time.time() - max(ages) * DAY
            request = JobRequest(ExecSpec(("true",)), on="nowhere", queue=True)
            rec.create_job(job_id, "exec", request.to_wire(), name, "f" * 32, state="queued")
        for job_id, (days, size) in sorted(jobs.items(), key=lambda kv: -kv[1][0]):
            clock_at[0] = time.time() - days * DAY
            rec.create_job(job_id, "exec", JobRequest(ExecSpec(("true",))).to_wire(), name, "f" * 32)
            rec.add_part(job_id, chunk=0, attempt=1, node=name, node_fp="f" * 32, started=clock_at[0],
                         end=PartEnd("succeeded", clock_at[0], cpu_s=0.01))
            rec.append_log(job_id, "stdout", b"done\n")
            if size:
                data = os.urandom(size)
                path = state_dir / "artifacts" / job_id / "result.bin"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                rec.add_artifact(job_id, path="result.bin", size=size, sha256=hashlib.sha256(data).hexdigest(),
                                 state="stored", node=name)
            rec.transition(job_id, "succeeded", exit_code=0)
    finally:
        rec.close()


def disk_state(state_dir: Path, name: str) -> tuple[list[str], dict[str, bytes], bytes]:
    """The committed database, every artifact file, and the write log: all a gc could change."""
    db = state_dir / f"vestad-records-{name}.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        dump = list(con.iterdump())
    finally:
        con.close()
    root = state_dir / "artifacts"
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    return dump, files, Path(f"{db}-writes").read_bytes()


@pytest.mark.integration
def test_vesta_gc_dry_run_changes_nothing_and_gc_removes_what_it_said(cluster: Cluster, tmp_path: Path) -> None:
    state = cluster.base / "a"
    seed(state, "a", {"jold": (40.0, 1000), "jmid": (10.0, 2 * MIB), "jnew": (5.0, 2 * MIB)}, queued=("jwait",))
    config = tmp_path / "a.json"
    config.write_text(json.dumps({"keep_days": 30, "keep_artifacts_mb": 3}))
    a = cluster.add("a", args=["-config", str(config), "-allow-exec", "-metrics", "127.0.0.1:0"])
    made = a.vesta("exec", "--", "sh", "-c", 'echo fresh > "$VESTA_OUTPUT/fresh.txt"')
    assert made.returncode == 0, made.stderr
    fresh = a.call("jobs", limit=1)[0]["id"]
    writes = state / "vestad-records-a.db-writes"
    eventually(lambda: writes.stat().st_size == 0, 10, what="the records to be committed")
    before = disk_state(state, "a")

    dry = a.vesta("gc", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would remove 1 job(s) that ended over 30 days ago" in dry.stdout and "dry run" in dry.stdout
    dry_json = json.loads(a.vesta("gc", "--dry-run", "--json").stdout)
    assert dry_json["job_ids"] == ["jold"] and dry_json["artifact_ids"] == ["jmid", "jold"]
    time.sleep(1.5)   # past a records commit: anything a dry run wrote would be in the database now
    assert disk_state(state, "a") == before

    done = a.vesta("gc", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report | {"dry_run": True} == dry_json
    assert report["artifacts_after"] == report["artifacts_before"] - 1000 - 2 * MIB <= 3 * MIB
    gone = a.vesta("show", "jold")
    assert gone.returncode == 1 and "no job 'jold'" in gone.stderr and "Traceback" not in gone.stderr
    pruned = a.call("artifacts", job_id="jmid")["files"]
    assert pruned[0]["state"] == "pruned" and "keep_artifacts_mb (3 MiB)" in pruned[0]["reason"]
    assert not (state / "artifacts" / "jmid").exists() and (state / "artifacts" / "jnew" / "result.bin").exists()
    assert a.call("artifacts", job_id=fresh)["files"][0]["state"] == "stored"
    assert a.call("show", job_id="jwait")["state"] == "queued"   # as old as jold, but still waiting
    metrics = scrape(a.status()["metrics"])
    assert metrics[("vesta_pruned_total", (("what", "jobs"),))] == 1
    assert metrics[("vesta_pruned_total", (("what", "artifact_jobs"),))] == 2
    again = a.vesta("gc")
    assert again.returncode == 0 and "removed 0 job(s)" in again.stdout


@pytest.mark.integration
def test_bad_retention_settings_are_one_line_config_errors(cluster: Cluster, tmp_path: Path) -> None:
    for field, value, said in (("keep_days", 0, "must be from 1 to 36500 (got 0)"),
                               ("keep_artifacts_mb", "2G", "must be a whole number")):
        config = tmp_path / f"{field}.json"
        config.write_text(json.dumps({field: value}))
        node = cluster.add(f"bad-{field}".replace("_", "-"), args=["-config", str(config)], start=False)
        node.start(wait=False)
        assert node.proc is not None and node.proc.wait(timeout=20) == 2
        lines = [line for line in node.log().splitlines() if "error" in line]
        assert len(lines) == 1 and f"field '{field}' {said}" in lines[0], node.log()
        assert "Traceback" not in node.log()


async def test_the_daemon_prunes_by_itself_soon_after_start(tmp_path: Path, runtime_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_module, "GC_FIRST_S", 0.2)
    state = tmp_path / "d"
    seed(state, "d", {"jold": (100.0, 10), "jnew": (1.0, 10)})
    cfg = Config.for_tests(name="d", key=new_key(), dport=free_udp_port(), state_dir=state)
    d = await Daemon.start(cfg)
    try:
        await eventually_async(lambda: d.counters["gc_runs"], timeout=10)   # counted when the run is over
        assert d.records.job("jold") is None and d.records.job("jnew") is not None
        assert not (state / "artifacts" / "jold").exists() and (state / "artifacts" / "jnew").exists()
        await asyncio.sleep(0.5)
        assert d.counters["gc_runs"] == 1   # then not again before a day has passed

        def bad_request() -> None:
            with ControlClient(cfg.control_socket, timeout=5) as c:
                c.call("gc", dry_run="yes")
        with pytest.raises(ConfigError, match="^dry_run must be true or false$"):
            await asyncio.to_thread(bad_request)
    finally:
        await d.stop()
