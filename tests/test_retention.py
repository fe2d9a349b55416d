"""Retention (vesta gc) as a unit: records and artifacts pruned by age and by size with a fake clock; never a
queued or running job's, nor one with a part still running; a dry run changes nothing."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import FakeClock
from vesta.records import PartEnd, Records
from vesta.retention import BATCH, Pruner

DAY = 86400.0
MIB = 1 << 20


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rec(tmp_path: Path, clock: FakeClock) -> Iterator[Records]:
    r = Records(tmp_path / "records.db", clock=clock)
    yield r
    r.close()


def finished_job(r: Records, job_id: str, *, state: str = "succeeded", output: bytes = b"") -> None:
    r.create_job(job_id, "exec", {"argv": ["true"]}, "desk", "d" * 32)
    r.add_part(job_id, chunk=0, attempt=1, node="pi4", node_fp="p" * 32, started=r.clock(),
               end=PartEnd("succeeded", r.clock(), cpu_s=0.1))
    if output:
        r.append_log(job_id, "stdout", output)
    r.transition(job_id, state, exit_code=0)


def with_files(r: Records, root: Path, job_id: str, size: int) -> Path:
    """``size`` bytes of stored artifacts of a job, on disk and on record."""
    data = os.urandom(size)
    path = root / job_id / "out.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    r.add_artifact(job_id, path="out.bin", size=size, sha256=hashlib.sha256(data).hexdigest(), state="stored",
                   node="pi4")
    return path


def pruner(r: Records, root: Path, clock: FakeClock, **kw: object) -> Pruner:
    kw = {"keep_days": 90.0, "keep_artifacts_mb": 2048} | kw
    return Pruner(r, root, clock=clock, **kw)  # type: ignore[arg-type]


async def test_records_older_than_keep_days_go_with_their_files_and_nothing_else(
        rec: Records, clock: FakeClock, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    finished_job(rec, "jold", output=b"x" * 1000)
    old_file = with_files(rec, root, "jold", 10)
    finished_job(rec, "jfailed", state="failed")
    rec.create_job("jqueued", "exec", {"argv": ["true"]}, "desk", "d" * 32, state="queued")
    rec.create_job("jrunning", "exec", {"argv": ["true"]}, "desk", "d" * 32)
    running_file = with_files(rec, root, "jrunning", 10)
    rec.create_job("jpart", "cpu", {"iterations": 1}, "desk", "d" * 32)   # ended, but a part still runs
    part = rec.add_part("jpart", chunk=0, attempt=1, node="pi4", node_fp="p" * 32, started=clock())
    rec.transition("jpart", "failed", reason="chunk 1 failed")
    old_run = rec.start_hosted(job_id="jx", chunk=0, peer="pi4", peer_fp="p" * 32, kind="cpu", args={}, started=clock())
    rec.finish_hosted(old_run, state="succeeded", finished=clock(), cpu_s=1.0)
    busy_run = rec.start_hosted(job_id="jy", chunk=0, peer="pi4", peer_fp="p" * 32, kind="cpu", args={},
                                started=clock())
    clock.advance(60 * DAY)
    finished_job(rec, "jnew")
    new_run = rec.start_hosted(job_id="jz", chunk=0, peer="pi4", peer_fp="p" * 32, kind="cpu", args={},
                               started=clock())
    rec.finish_hosted(new_run, state="succeeded", finished=clock(), cpu_s=1.0)

    clock.advance(30 * DAY - 1)   # the first jobs ended 90 days ago less a second: not yet
    report = await pruner(rec, root, clock).run()
    assert (report.jobs, report.hosted, report.artifact_jobs) == (0, 0, 0)

    clock.advance(2)
    counters: Counter[str] = Counter()
    report = await pruner(rec, root, clock, counters=counters).run()
    assert sorted(report.job_ids) == ["jfailed", "jold"] and report.jobs == 2
    assert report.log_bytes == 1000 and report.hosted == 1
    assert report.artifact_ids == ["jold"] and report.artifact_bytes == 10
    assert rec.job("jold") is None and rec.job("jfailed") is None and not old_file.parent.exists()
    assert rec.log("jnew")[0] == b"" and rec.job("jnew") is not None
    for kept in ("jqueued", "jrunning", "jpart"):
        assert rec.job(kept) is not None, kept
    assert running_file.exists()
    assert sorted(h["id"] for h in rec.hosted()) == sorted([busy_run, new_run])
    assert counters["gc_pruned_jobs"] == 2 and counters["gc_pruned_hosted"] == 1
    assert counters["gc_pruned_artifact_jobs"] == 1 and counters["gc_pruned_artifact_bytes"] == 10
    # the running part ends (and is charged): its job may go at the next run
    rec.finish_part(part, state="lost", finished=clock(), reason="node died")
    assert (await pruner(rec, root, clock).run()).job_ids == ["jpart"]


async def test_artifacts_over_the_budget_go_oldest_first_and_the_record_says_so(
        rec: Records, clock: FakeClock, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    rec.create_job("jrunning", "exec", {"argv": ["true"]}, "desk", "d" * 32)   # the oldest, but running
    running = with_files(rec, root, "jrunning", MIB)
    paths = {}
    for name in ("j1", "j2", "j3", "j4"):
        clock.advance(3600)
        finished_job(rec, name)
        paths[name] = with_files(rec, root, name, MIB)
    crashed = root / "jgone" / "half.bin"   # a directory no record lists (a crash between record and files)
    crashed.parent.mkdir()
    crashed.write_bytes(b"z" * 100)
    (root / ".vesta-incoming-x").mkdir()     # a transfer in progress
    (root / ".vesta-incoming-x" / "part").write_bytes(b"y" * MIB)

    report = await pruner(rec, root, clock, keep_artifacts_mb=3).run()
    # 5 MiB + 100 bytes of jobs' files, 3 MiB allowed: the unlisted directory, j1 and j2 go; j3, j4 and the
    # running job's stay (3 MiB)
    assert report.artifacts_before == 5 * MIB + 100 and report.artifacts_after == 3 * MIB
    assert sorted(report.artifact_ids) == ["j1", "j2", "jgone"] and report.jobs == 0
    assert not crashed.parent.exists() and not paths["j1"].exists() and not paths["j2"].exists()
    assert paths["j3"].exists() and paths["j4"].exists() and running.exists()
    assert (root / ".vesta-incoming-x" / "part").exists()
    pruned = rec.artifacts("j1")[0]
    assert pruned["state"] == "pruned" and "keep_artifacts_mb (3 MiB)" in pruned["reason"]
    assert rec.job("j1") is not None and rec.artifacts("j3")[0]["state"] == "stored"

    # with room for nothing, only the running job's files are left
    report = await pruner(rec, root, clock, keep_artifacts_mb=0).run()
    assert sorted(report.artifact_ids) == ["j3", "j4"] and report.unprunable_bytes == MIB
    assert running.exists() and rec.artifacts("jrunning")[0]["state"] == "stored"


async def test_a_job_the_daemon_is_driving_is_never_touched(rec: Records, clock: FakeClock, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    finished_job(rec, "jold")
    with_files(rec, root, "jold", MIB)
    clock.advance(100 * DAY)
    report = await pruner(rec, root, clock, keep_artifacts_mb=0, active=lambda: {"jold"}).run()
    assert (report.jobs, report.artifact_jobs) == (0, 0)
    assert rec.job("jold") is not None and (root / "jold" / "out.bin").exists()


def snapshot(rec: Records, root: Path) -> tuple[list[str], dict[str, bytes]]:
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    return list(rec.db.iterdump()), files


async def test_a_dry_run_changes_nothing_and_reports_what_a_real_run_does(
        rec: Records, clock: FakeClock, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    for name in ("j1", "j2", "j3"):
        finished_job(rec, name, output=b"hello\n")
        with_files(rec, root, name, MIB)
        clock.advance(40 * DAY)
    run = rec.start_hosted(job_id="jx", chunk=0, peer="pi4", peer_fp="p" * 32, kind="cpu", args={}, started=0.0)
    rec.finish_hosted(run, state="succeeded", finished=1.0, cpu_s=1.0)
    before = snapshot(rec, root)
    log_before = rec.writes_path.read_bytes()
    counters: Counter[str] = Counter()
    dry = await pruner(rec, root, clock, keep_artifacts_mb=1, counters=counters).run(dry_run=True)
    assert snapshot(rec, root) == before and rec.writes_path.read_bytes() == log_before and not counters
    assert dry.dry_run and dry.job_ids == ["j1"] and dry.hosted == 1 and sorted(dry.artifact_ids) == ["j1", "j2"]
    real = await pruner(rec, root, clock, keep_artifacts_mb=1).run()
    assert real.to_json() | {"dry_run": True} == dry.to_json()
    assert snapshot(rec, root) != before


async def test_many_old_records_go_in_batches_and_the_removal_survives_a_crash(
        tmp_path: Path, clock: FakeClock) -> None:
    rec = Records(tmp_path / "records.db", clock=clock)
    n = 2 * BATCH + 7
    for i in range(n):
        finished_job(rec, f"j{i:05d}")
    rec.commit()
    clock.advance(91 * DAY)
    finished_job(rec, "jnew")
    report = await pruner(rec, tmp_path / "artifacts", clock).run()
    assert report.jobs == n and len(report.job_ids) == 100
    rec.abandon()   # as kill -9 would leave it: the removal is in the write log only
    again = Records(tmp_path / "records.db", clock=clock)
    try:
        assert [j["id"] for j in again.jobs(limit=10)] == ["jnew"] and again.replayed > 0
    finally:
        again.close()
