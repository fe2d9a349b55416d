"""Job records in SQLite: lifecycle, parts, capped logs, hosted runs, restart recovery, SIGKILL, schema."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import FakeClock
from vesta import records
from vesta.errors import ConfigError, VestaError
from vesta.records import Records, RecordsError, TransitionError, UnknownRecord
from vesta.schema import SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[1]




@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rec(tmp_path: Path, clock: FakeClock) -> Iterator[Records]:
    r = Records(tmp_path / "records.db", log_cap_bytes=1000, clock=clock)
    yield r
    r.close()


def job(r: Records, job_id: str = "j1", state: str = "running", kind: str = "cpu") -> None:
    r.create_job(job_id, kind, {"iterations": 200}, "desk", "fp-desk", state=state)


# -- lifecycle ---------------------------------------------------------------------------------------------------

def test_running_job_succeeds_with_exit_code_and_result(rec: Records, clock: FakeClock) -> None:
    t0 = clock.t
    job(rec)
    clock.advance(5)
    rec.transition("j1", "succeeded", exit_code=0, result={"digest": "ab" * 16, "n": [1, 2.5, None]})
    j = rec.job("j1")
    assert j is not None
    assert j["state"] == "succeeded" and j["kind"] == "cpu" and j["args"] == {"iterations": 200}
    assert (j["created"], j["started"], j["finished"]) == (t0, t0, t0 + 5)
    assert j["exit_code"] == 0 and j["result"] == {"digest": "ab" * 16, "n": [1, 2.5, None]}
    assert (j["submitter"], j["submitter_fp"], j["reason"], j["parts"]) == ("desk", "fp-desk", "", [])
    assert (j["log_bytes"], j["log_truncated"]) == (0, False)


def test_queued_then_running_then_failed_with_reason(rec: Records, clock: FakeClock) -> None:
    t0 = clock.t
    job(rec, state="queued")
    j = rec.job("j1")
    assert j is not None and j["state"] == "queued" and j["started"] is None
    clock.advance(2)
    rec.transition("j1", "running")
    clock.advance(3)
    rec.transition("j1", "failed", reason="no peer accepted", exit_code=1)
    j = rec.job("j1")
    assert j is not None
    assert (j["state"], j["reason"], j["exit_code"]) == ("failed", "no peer accepted", 1)
    assert (j["created"], j["started"], j["finished"]) == (t0, t0 + 2, t0 + 5)
    assert j["result"] is None


@pytest.mark.parametrize(("path", "bad"), [
    (["succeeded"], "running"),
    (["failed"], "succeeded"),
    (["cancelled"], "running"),
    ([], "queued"),        # running -> queued
    ([], "running"),       # running -> running
])
def test_illegal_transitions_raise_and_change_nothing(rec: Records, path: list[str], bad: str) -> None:
    job(rec)
    for state in path:
        rec.transition("j1", state, exit_code=0)
    before = rec.job("j1")
    with pytest.raises(TransitionError, match=f"'j1'.* to {bad}"):
        rec.transition("j1", bad, reason="nope", exit_code=9, result={"x": 1})
    assert rec.job("j1") == before


def test_queued_cannot_succeed_directly(rec: Records) -> None:
    job(rec, state="queued")
    with pytest.raises(TransitionError, match="from queued to succeeded"):
        rec.transition("j1", "succeeded")
    rec.transition("j1", "cancelled", reason="user")
    j = rec.job("j1")
    assert j is not None and j["state"] == "cancelled" and j["started"] is None and j["finished"] is not None


def test_unknown_job_and_bad_inputs(rec: Records) -> None:
    assert rec.job("nope") is None
    with pytest.raises(UnknownRecord, match="nope"):
        rec.transition("nope", "failed")
    with pytest.raises(LookupError):
        rec.add_part("nope", chunk=0, attempt=0, node="n", node_fp="f", started=1.0)
    with pytest.raises(UnknownRecord):
        rec.append_log("nope", "stdout", b"x")
    with pytest.raises(UnknownRecord):
        rec.log("nope")
    with pytest.raises(UnknownRecord):
        rec.finish_part(12345, state="lost", finished=1.0)
    with pytest.raises(UnknownRecord):
        rec.finish_hosted(12345, state="failed", finished=1.0, cpu_s=0)
    with pytest.raises(RecordsError, match="kind"):
        rec.create_job("j", "gpu", {}, "desk", "fp")
    with pytest.raises(RecordsError, match="queued or running"):
        rec.create_job("j", "cpu", {}, "desk", "fp", state="succeeded")
    with pytest.raises(RecordsError, match="JSON"):
        rec.create_job("j", "cpu", {"x": object()}, "desk", "fp")
    job(rec)
    with pytest.raises(RecordsError, match="already"):
        job(rec)
    with pytest.raises(RecordsError, match="unknown job state"):
        rec.transition("j1", "done")
    with pytest.raises(RecordsError, match="stdout or stderr"):
        rec.append_log("j1", "stdin", b"x")
    with pytest.raises(RecordsError, match="unknown job state"):
        rec.jobs(state="weird")
    assert issubclass(RecordsError, VestaError) and issubclass(TransitionError, VestaError)


# -- parts -------------------------------------------------------------------------------------------------------

def test_every_attempt_of_a_chunk_is_kept_in_order(rec: Records) -> None:
    job(rec)
    p1 = rec.add_part("j1", chunk=1, attempt=0, node="pi4", node_fp="fp-pi", started=10.0)
    p0 = rec.add_part("j1", chunk=0, attempt=0, node="desk", node_fp="fp-desk", started=10.0)
    rec.finish_part(p0, state="succeeded", finished=12.0, cpu_s=2.0, mem_mib_s=64.0, exit_code=0, result={"h": "00"})
    rec.finish_part(p1, state="lost", finished=30.0, reason="peer gone")
    p1b = rec.add_part("j1", chunk=1, attempt=1, node="laptop", node_fp="fp-lap", started=31.0)
    rec.finish_part(p1b, state="succeeded", finished=33.5, cpu_s=2.5, mem_mib_s=80.0, exit_code=0)
    with pytest.raises(TransitionError, match=f"part {p1b} cannot go from succeeded to failed"):
        rec.finish_part(p1b, state="failed", finished=40.0)
    with pytest.raises(RecordsError, match="a part ends"):
        rec.finish_part(p1b, state="running", finished=40.0)
    j = rec.job("j1")
    assert j is not None
    got = [(p["chunk"], p["attempt"], p["node"], p["node_fp"], p["started"], p["finished"], p["state"],
            p["cpu_s"], p["mem_mib_s"], p["reason"]) for p in j["parts"]]
    assert got == [
        (0, 0, "desk", "fp-desk", 10.0, 12.0, "succeeded", 2.0, 64.0, ""),
        (1, 0, "pi4", "fp-pi", 10.0, 30.0, "lost", 0.0, 0.0, "peer gone"),
        (1, 1, "laptop", "fp-lap", 31.0, 33.5, "succeeded", 2.5, 80.0, ""),
    ]
    assert j["parts"][0]["result"] == {"h": "00"} and j["parts"][0]["id"] == p0
    assert j["parts"][1]["result"] is None


def test_a_part_that_ran_on_the_spot_is_recorded_once_with_its_end(rec: Records, tmp_path: Path) -> None:
    """A tiny chunk done on the submitter's own loop: one write (deferred, durable with the job's end)."""
    job(rec)
    end = records.PartEnd("succeeded", 10.5, cpu_s=0.001, exit_code=None, result={"iterations": 1})
    pid = rec.add_part("j1", chunk=0, attempt=1, node="desk", node_fp="fp-desk", started=10.0, end=end, defer=True)
    rec.transition("j1", "succeeded")   # durable: the deferred part goes with it
    j = rec.job("j1")
    assert j is not None
    assert [(p["id"], p["node"], p["started"], p["finished"], p["state"], p["cpu_s"], p["result"])
            for p in j["parts"]] == [(pid, "desk", 10.0, 10.5, "succeeded", 0.001, {"iterations": 1})]
    rec.abandon()   # as kill -9 would: what was acknowledged is in the write log
    again = Records(rec.path)
    j = again.job("j1")
    assert j is not None and j["state"] == "succeeded" and [p["state"] for p in j["parts"]] == ["succeeded"]
    again.close()
    with Records(tmp_path / "other.db") as other, pytest.raises(RecordsError, match="a part ends"):
        other.add_part("j1", chunk=0, attempt=0, node="n", node_fp="f", started=1.0,
                       end=records.PartEnd("running", 2.0))


# -- logs --------------------------------------------------------------------------------------------------------

def test_interleaved_streams_round_trip_in_order(rec: Records) -> None:
    job(rec, kind="exec")
    rec.append_log("j1", "stdout", b"one\n")
    rec.append_log("j1", "stderr", b"warn\n")
    rec.append_log("j1", "stdout", b"")          # nothing to store
    rec.append_log("j1", "stdout", b"two\n")
    binary = bytes(range(256)) * 2
    rec.append_log("j1", "stderr", binary)
    assert rec.log("j1") == (b"one\nwarn\ntwo\n" + binary, 4)
    assert rec.log("j1", "stdout") == (b"one\ntwo\n", 3)
    assert rec.log("j1", "stderr") == (b"warn\n" + binary, 4)
    j = rec.job("j1")
    assert j is not None and j["log_bytes"] == 13 + 512 and j["log_dropped"] == 0 and not j["log_truncated"]


def test_log_after_returns_only_the_new_part(rec: Records) -> None:
    job(rec, kind="exec")
    rec.append_log("j1", "stdout", b"a")
    data, nxt = rec.log("j1")
    assert data == b"a"
    assert rec.log("j1", after=nxt) == (b"", nxt)      # nothing new: same cursor back
    rec.append_log("j1", "stderr", b"b")
    rec.append_log("j1", "stdout", b"c")
    data, nxt2 = rec.log("j1", after=nxt)
    assert data == b"bc" and nxt2 > nxt
    assert rec.log("j1", "stdout", after=nxt) == (b"c", nxt2)


def test_output_past_the_cap_is_dropped_with_one_marker(rec: Records) -> None:
    cap = rec.log_cap_bytes
    job(rec, kind="exec")
    chunks = [bytes([65 + i]) * (cap // 2) for i in range(3)]
    for c in chunks:
        rec.append_log("j1", "stdout", c)
    rec.append_log("j1", "stderr", b"late")
    marker = f"\n[vesta: output truncated after {cap} bytes]\n".encode()
    data, _ = rec.log("j1")
    assert data == chunks[0] + chunks[1] + marker
    assert data.count(b"truncated") == 1
    j = rec.job("j1")
    assert j is not None
    assert j["log_truncated"] is True and j["log_bytes"] == cap and j["log_dropped"] == cap // 2 + 4


def test_cap_cuts_inside_a_chunk(tmp_path: Path, clock: FakeClock) -> None:
    with Records(tmp_path / "r.db", log_cap_bytes=10, clock=clock) as r:
        job(r, kind="exec")
        r.append_log("j1", "stdout", b"0123456")
        r.append_log("j1", "stderr", b"789abcdef")
        assert r.log("j1")[0] == b"0123456789\n[vesta: output truncated after 10 bytes]\n"
        assert r.log("j1", "stdout")[0] == b"0123456"
        j = r.job("j1")
        assert j is not None and (j["log_bytes"], j["log_dropped"]) == (10, 6)


# -- hosted runs -------------------------------------------------------------------------------------------------

def test_hosted_runs_start_finish_and_list_newest_first(rec: Records) -> None:
    a = rec.start_hosted(job_id="x1", chunk=0, peer="desk", peer_fp="fp-desk", kind="cpu",
                         args={"iterations": 5}, started=100.0)
    b = rec.start_hosted(job_id="x2", chunk=3, peer="laptop", peer_fp="fp-lap", kind="exec",
                         args={"argv": ["make"]}, started=200.0)
    rec.finish_hosted(a, state="succeeded", finished=110.0, cpu_s=9.5, mem_mib_s=12.0, exit_code=0)
    rec.finish_hosted(b, state="failed", finished=205.0, cpu_s=1.0, exit_code=2, reason="exit status 2")
    with pytest.raises(TransitionError, match=f"hosted run {b} cannot go from failed to succeeded"):
        rec.finish_hosted(b, state="succeeded", finished=206.0, cpu_s=1.0)
    runs = rec.hosted()
    assert [r["id"] for r in runs] == [b, a]
    assert runs[0] | {"id": 0} == {"id": 0, "job_id": "x2", "chunk": 3, "peer": "laptop", "peer_fp": "fp-lap",
                                   "kind": "exec", "args": {"argv": ["make"]}, "started": 200.0, "finished": 205.0,
                                   "state": "failed", "cpu_s": 1.0, "mem_mib_s": 0.0, "exit_code": 2,
                                   "reason": "exit status 2"}
    assert runs[1]["state"] == "succeeded" and runs[1]["cpu_s"] == 9.5 and runs[1]["mem_mib_s"] == 12.0
    assert [r["id"] for r in rec.hosted(limit=1)] == [b]


@contextlib.contextmanager
def after_crash(path: Path, where: Path) -> Iterator[Records]:
    """The records as SIGKILL at this instant would leave them, reopened: a copy of the database, its WAL
    and its write log (what a dead process leaves on disk), opened under ``where``."""
    where.mkdir()
    for suffix in ("", "-wal", records.WRITES_SUFFIX):
        src = Path(f"{path}{suffix}")
        if src.exists():
            Path(f"{where / path.name}{suffix}").write_bytes(src.read_bytes())
    r = Records(where / path.name)
    try:
        yield r
    finally:
        r.close()


def test_a_deferred_write_is_durable_with_the_next_write(tmp_path: Path) -> None:
    path = tmp_path / "records.db"
    r = Records(path)
    r.create_job("j1", "cpu", {}, "desk", "fp", defer=True)
    with after_crash(path, tmp_path / "c1") as c:
        assert c.job("j1") is None
    part = r.add_part("j1", chunk=0, attempt=0, node="pi4", node_fp="fp-pi", started=1.0)
    with after_crash(path, tmp_path / "c2") as c:
        j = c.job("j1")
        assert j is not None and [p["id"] for p in j["parts"]] == [part] and c.replayed == 2
    r.finish_part(part, state="succeeded", finished=2.0, defer=True)
    with after_crash(path, tmp_path / "c3") as c:
        assert c.job("j1")["parts"][0]["reason"] == "daemon restarted"   # type: ignore[index]
    r.transition("j1", "succeeded")
    with after_crash(path, tmp_path / "c4") as c:
        j = c.job("j1")
        assert j is not None and (j["state"], j["parts"][0]["state"]) == ("succeeded", "succeeded")
    with pytest.raises(UnknownRecord):   # a failed write keeps what was deferred before it
        r.create_job("j2", "cpu", {}, "desk", "fp", defer=True)
        r.add_part("nope", chunk=0, attempt=0, node="pi4", node_fp="fp-pi", started=1.0)
    with after_crash(path, tmp_path / "c5") as c:
        assert c.job("j2") is not None and c.job("nope") is None
    r.close()


def test_logged_writes_are_replayed_once_after_a_crash(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "records.db"
    log_path = Path(f"{path}{records.WRITES_SUFFIX}")
    r = Records(path, clock=clock)
    job(r, "early")
    r.commit()
    assert log_path.stat().st_size == 0 and r.commits == 1
    job(r, "late")
    p = r.add_part("late", chunk=0, attempt=0, node="pi4", node_fp="fp-pi", started=1.0)
    r.append_log("late", "stdout", b"out")
    r.transition("late", "succeeded", exit_code=0)
    logged = log_path.read_bytes()
    assert logged
    r.abandon()                      # as SIGKILL would: nothing committed since "early"
    with contextlib.closing(sqlite3.connect(path)) as raw:
        assert [row[0] for row in raw.execute("SELECT id FROM jobs")] == ["early"]
    r2 = Records(path, clock=clock)
    assert r2.replayed == 5 and log_path.stat().st_size == 0
    j = r2.job("late")
    assert j is not None and (j["state"], j["exit_code"], j["parts"][0]["id"]) == ("succeeded", 0, p)
    assert r2.log("late") == (b"out", 1)
    r2.close()
    log_path.write_bytes(logged)     # a crash after the commit and before the log was emptied
    with Records(path, clock=clock) as r3:
        assert r3.replayed == 0      # already committed: nothing runs twice
        j = r3.job("late")
        assert j is not None and len(j["parts"]) == 1 and r3.log("late") == (b"out", 1)


def test_a_torn_write_log_tail_is_dropped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "records.db"
    log_path = Path(f"{path}{records.WRITES_SUFFIX}")
    r = Records(path)
    job(r, "whole")
    size = log_path.stat().st_size
    job(r, "torn")
    data = log_path.read_bytes()
    r.abandon()
    log_path.write_bytes(data[: size + (len(data) - size) // 2])   # a power cut in the middle of an append
    with Records(path) as r2:
        assert r2.job("whole") is not None and r2.job("torn") is None and r2.replayed == 1
    assert "torn or damaged" in caplog.text
    damaged = bytearray(data)
    damaged[-1] ^= 0xFF                                            # a flipped bit: the CRC catches it
    Records(path).abandon()
    log_path.write_bytes(bytes(damaged))
    with Records(path) as r3:
        assert r3.replayed == 0 and r3.job("torn") is None


def test_a_failed_append_loses_only_that_write_and_says_why(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "records.db"
    r = Records(path)
    job(r, "kept")
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(records.os, "write", full)
    with pytest.raises(RecordsError, match="No space left on device; the last write is lost"):
        job(r, "lost")
    monkeypatch.setattr(records.os, "write", real_write)
    assert r.job("kept") is not None and r.job("lost") is None   # the open transaction matches the log again
    job(r, "after")
    r.abandon()
    with Records(path) as r2:
        assert [j["id"] for j in r2.jobs()] == ["after", "kept"]


def test_a_write_of_several_statements_is_undone_whole_on_error(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "records.db"
    r = Records(path)
    job(r, "j")
    r.create_job("deferred", "cpu", {}, "desk", "fp", defer=True)   # before it: kept
    real = Records._exec

    def fail_on_update(self: Records, sql: str, params: tuple[object, ...]) -> sqlite3.Cursor:
        if sql.startswith("UPDATE jobs SET log_bytes"):
            raise sqlite3.OperationalError("disk I/O error")
        return real(self, sql, params)

    monkeypatch.setattr(Records, "_exec", fail_on_update)
    with pytest.raises(RecordsError, match="cannot write the records database .*: disk I/O error"):
        r.append_log("j", "stdout", b"half")   # its INSERT ran; the UPDATE after it failed
    monkeypatch.undo()
    assert r.log("j") == (b"", 0) and r.job("deferred") is not None
    r.flush()
    r.abandon()
    with Records(path) as r2:                  # the write log agrees: no half of it was logged
        assert r2.log("j") == (b"", 0) and r2.job("deferred") is not None


def test_background_checkpoint_moves_the_wal_into_the_file(tmp_path: Path) -> None:
    path = tmp_path / "records.db"
    r = Records(path, background_checkpoint=True)
    assert r.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    for i in range(300):
        job(r, f"j{i}")
        r.commit()
    assert r.commits == 300

    def jobs_in_main_file() -> int:   # the database file alone, without its WAL
        copy = tmp_path / f"copy-{r.commits}.db"
        copy.write_bytes(path.read_bytes())
        with contextlib.closing(sqlite3.connect(copy)) as db:
            try:
                return int(db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
            except sqlite3.OperationalError:   # not even the schema is there yet
                return 0

    assert jobs_in_main_file() < 300
    r.checkpoint()
    assert jobs_in_main_file() == 300
    job(r, "after")
    assert len(r.jobs(limit=1000)) == 301
    r.close()


# -- restart, SIGKILL, schema ------------------------------------------------------------------------------------

def test_restart_fails_what_was_running_and_keeps_the_queue(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "records.db"
    r = Records(path, clock=clock)
    job(r, "done")
    r.transition("done", "succeeded", exit_code=0)
    job(r, "run")
    job(r, "wait", state="queued")
    pid = r.add_part("run", chunk=0, attempt=0, node="pi4", node_fp="fp-pi", started=1.0)
    hid = r.start_hosted(job_id="x", chunk=0, peer="desk", peer_fp="fp", kind="cpu", args={}, started=1.0)
    old = r.start_hosted(job_id="y", chunk=0, peer="desk", peer_fp="fp", kind="cpu", args={}, started=0.5)
    r.finish_hosted(old, state="succeeded", finished=0.9, cpu_s=0.4, exit_code=0)
    assert r.recovered == 0
    done_before = r.job("done")
    clock.advance(60)
    r.abandon()                       # the first is never closed or committed, as after a crash
    r2 = Records(path, clock=clock)
    assert r2.recovered == 2   # one job, one hosted run
    j = r2.job("run")
    assert j is not None and (j["state"], j["reason"], j["finished"]) == ("failed", "daemon restarted", clock.t)
    assert [q["id"] for q in r2.queued()] == ["wait"]   # never started: it stays queued, to be placed later
    j = r2.job("run")
    assert j is not None and j["parts"][0]["id"] == pid
    assert (j["parts"][0]["state"], j["parts"][0]["reason"]) == ("failed", "daemon restarted")
    assert r2.job("done") == done_before
    runs = {h["id"]: h for h in r2.hosted()}
    assert (runs[hid]["state"], runs[hid]["reason"]) == ("failed", "daemon restarted")
    assert (runs[old]["state"], runs[old]["reason"]) == ("succeeded", "")
    r2.close()
    with Records(path, clock=clock) as r3:
        assert r3.recovered == 0


def test_queue_order_and_wait_reason(rec: Records, clock: FakeClock) -> None:
    job(rec, "q1", state="queued")
    clock.advance(1)
    job(rec, "q2", state="queued")
    job(rec, "r1")
    rec.wait_reason("q2", "b: capacity")
    rec.wait_reason("r1", "ignored: not queued")
    assert [(q["id"], q["reason"]) for q in rec.queued()] == [("q1", ""), ("q2", "b: capacity")]
    assert rec.job("r1")["reason"] == ""   # type: ignore[index]
    rec.transition("q1", "running")
    rec.transition("q2", "running")
    assert rec.queued() == [] and rec.job("q2")["reason"] == ""   # type: ignore[index]  # why it waited is over


def test_artifacts_are_kept_per_job_and_replaced_by_a_later_attempt(rec: Records) -> None:
    job(rec, "a")
    rec.add_artifact("a", path="out/x.bin", size=3, sha256="0" * 64, state="corrupt", reason="checksum mismatch")
    rec.add_artifact("a", path="out/x.bin", size=3, sha256="1" * 64, state="stored", node="pi4")
    rec.add_artifact("a", path="big", size=0, sha256="", state="refused", reason="over the cap")
    j = rec.job("a")
    assert j is not None
    assert [(f["path"], f["state"], f["node"]) for f in j["artifacts"]] == [("big", "refused", ""),
                                                                            ("out/x.bin", "stored", "pi4")]
    with pytest.raises(RecordsError, match="an artifact is stored"):
        rec.add_artifact("a", path="y", size=0, sha256="", state="lost")
    with pytest.raises(UnknownRecord):
        rec.add_artifact("nope", path="y", size=0, sha256="", state="stored")


_CHILD = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from vesta.records import Records
    r = Records(Path(sys.argv[1]))
    r.create_job("first", "exec", {"argv": ["true"]}, "desk", "fp")
    r.append_log("first", "stdout", b"hello")
    r.transition("first", "succeeded", exit_code=0)
    r.start_hosted(job_id="h", chunk=0, peer="pi4", peer_fp="fp-pi", kind="cpu", args={}, started=1.0)
    print("ok", flush=True)
    i = 0
    while True:                     # commit as fast as possible until killed
        r.create_job(f"n{i}", "cpu", {"i": i}, "desk", "fp")
        print(i, flush=True)
        i += 1
""")


def test_committed_records_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "records.db"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ok"
        last = -1
        while last < 30:
            line = child.stdout.readline()
            assert line, child.stderr.read() if child.stderr else ""
            last = int(line)
        child.send_signal(signal.SIGKILL)   # mid-write, most likely
    finally:
        child.kill()
        child.communicate(timeout=10)
    assert child.returncode == -signal.SIGKILL
    assert Path(f"{path}-wal").exists()     # the records were still in the WAL, never checkpointed by a close
    with Records(path) as r:
        assert r.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        first = r.job("first")
        assert first is not None and first["state"] == "succeeded" and r.log("first")[0] == b"hello"
        for i in range(last + 1):    # every job the child reported committed is there
            j = r.job(f"n{i}")
            assert j is not None and j["args"] == {"i": i}
            assert (j["state"], j["reason"]) == ("failed", "daemon restarted")
        assert r.hosted()[0]["state"] == "failed"


def test_new_database_is_wal_current_version_and_private(rec: Records, tmp_path: Path) -> None:
    assert rec.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == len(records.MIGRATIONS)
    assert rec.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert rec.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert stat.S_IMODE(os.stat(tmp_path / "records.db").st_mode) == 0o600


def test_newer_schema_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "records.db"
    Records(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(ConfigError, match=rf"schema version {SCHEMA_VERSION + 1}, this vesta knows up to "
                                          rf"{SCHEMA_VERSION}: upgrade vesta"):
        Records(path)
    assert list(tmp_path.glob("*.corrupt-*")) == []   # not mistaken for corruption


def test_migrations_apply_in_order_and_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "records.db"
    shipped = records.MIGRATIONS
    with contextlib.closing(sqlite3.connect(path)) as first:   # a database written by the first release
        first.executescript(f"BEGIN; {shipped[0]} PRAGMA user_version=1; COMMIT;")
        with first:
            first.execute("INSERT INTO jobs (id, kind, args, submitter, submitter_fp, created, started, state) "
                          "VALUES ('j1', 'cpu', '{}', 'desk', 'fp', 1.0, 1.0, 'running')")
    monkeypatch.setattr(records, "MIGRATIONS", (*shipped, "CREATE TABLE t (x); CREATE TABLE t (x);"))
    with pytest.raises(RecordsError, match="cannot be opened"):
        Records(path)
    db = sqlite3.connect(path)
    # Each step is its own transaction: the good steps stayed, the failed one left nothing behind.
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(shipped)
    assert db.execute("SELECT count(*) FROM sqlite_master WHERE name='t'").fetchone()[0] == 0
    db.close()
    monkeypatch.setattr(records, "MIGRATIONS", (*shipped, "ALTER TABLE jobs ADD COLUMN note TEXT;"))
    with Records(path) as r:
        assert r.db.execute("PRAGMA user_version").fetchone()[0] == len(shipped) + 1
        j = r.job("j1")
        assert j is not None and j["state"] == "failed"   # restart recovery ran after the migration
        assert j["artifacts"] == []                        # the v1 -> v2 table is there


def test_garbage_file_is_moved_aside_and_a_fresh_db_starts(tmp_path: Path, clock: FakeClock,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "records.db"
    path.write_bytes(b"this is not a database, just bytes\n" * 200)
    with Records(path, clock=clock) as r:
        job(r)
        assert r.job("j1") is not None
    aside = tmp_path / f"records.db.corrupt-{int(clock.t)}"
    assert aside.read_bytes().startswith(b"this is not a database")
    assert "corrupt" in caplog.text
    with Records(path, clock=clock) as r:     # and the fresh one reopens cleanly
        assert r.job("j1") is not None


# -- listing -----------------------------------------------------------------------------------------------------

def test_jobs_filters_and_lists_newest_first(rec: Records, clock: FakeClock) -> None:
    for i in range(6):
        job(rec, f"j{i}")
        clock.advance(1)
    for i in (1, 3, 4):
        rec.transition(f"j{i}", "succeeded")
    rec.transition("j5", "failed", reason="boom")
    assert [j["id"] for j in rec.jobs()] == ["j5", "j4", "j3", "j2", "j1", "j0"]
    assert [j["id"] for j in rec.jobs(limit=2)] == ["j5", "j4"]
    assert [j["id"] for j in rec.jobs(state="succeeded")] == ["j4", "j3", "j1"]
    assert [j["id"] for j in rec.jobs(state="succeeded", limit=1)] == ["j4"]
    assert [j["id"] for j in rec.jobs(state="running")] == ["j2", "j0"]
    assert rec.jobs(state="cancelled") == []
    listed = rec.jobs(state="failed")[0]
    assert "parts" not in listed and listed["reason"] == "boom" and listed["args"] == {"iterations": 200}
    with pytest.raises(RecordsError, match="limit"):
        rec.jobs(limit=0)
