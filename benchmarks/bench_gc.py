"""Retention off the hot path: how long a first gc over many old records holds the event loop.

Target (retention issue): the daemon prunes "off the hot path": a run over a year of records must not stall
jobs. The Pruner removes records in batches of ``retention.BATCH`` with a pause between them, so the loop is
held for one batch at a time.

A records database with JOBS old finished jobs (each with a part and a line of output) and as many hosted
runs, written straight into SQLite (building it through ``Records`` would take longer than the run), then one
``Pruner.run()`` on an event loop while a probe task wakes every millisecond and notes the longest gap.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from common import Report, cpu_busy_pct

from vesta.records import Records
from vesta.retention import BATCH, Pruner

JOBS = int(os.environ.get("VESTA_BENCH_GC_JOBS", "50000"))
LONGEST_STALL_MS = 100.0        # the longest the loop may be held by one batch
MIN_RATE = 5000.0               # job records removed per second, at least


def build(path: Path, n: int) -> None:
    Records(path).close()   # the schema
    old = time.time() - 400 * 86400
    db = sqlite3.connect(path)
    with db:
        db.executemany("INSERT INTO jobs (id, kind, args, submitter, submitter_fp, created, started, finished, "
                       "state, exit_code, log_bytes) VALUES (?, 'exec', '{\"argv\": [\"true\"]}', 'desk', ?, ?, ?, "
                       "?, 'succeeded', 0, 5)",
                       ((f"j{i:010d}", "f" * 32, old + i, old + i, old + i + 1) for i in range(n)))
        db.executemany("INSERT INTO parts (job_id, chunk, attempt, node, node_fp, started, finished, state) "
                       "VALUES (?, 0, 1, 'pi4', ?, ?, ?, 'succeeded')",
                       ((f"j{i:010d}", "p" * 32, old + i, old + i + 1) for i in range(n)))
        db.executemany("INSERT INTO logs (job_id, seq, stream, data) VALUES (?, 1, 'stdout', x'646f6e650a')",
                       ((f"j{i:010d}",) for i in range(n)))
        db.executemany("INSERT INTO hosted (job_id, chunk, peer, peer_fp, kind, args, started, finished, state) "
                       "VALUES (?, 0, 'pi4', ?, 'cpu', '{}', ?, ?, 'succeeded')",
                       ((f"h{i:010d}", "p" * 32, old + i, old + i + 1) for i in range(n)))
    db.close()


async def prune(rec: Records, root: Path) -> tuple[float, float, int]:
    """(seconds, longest loop stall in ms, job records removed)."""
    stall = [0.0]
    done = asyncio.Event()

    async def probe() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stall[0] = max(stall[0], now - last)
            last = now

    watcher = asyncio.ensure_future(probe())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    report = await Pruner(rec, root, keep_days=90, keep_artifacts_mb=2048).run()
    took = time.perf_counter() - t0
    done.set()
    await watcher
    return took, stall[0] * 1000, report.jobs


def main() -> None:
    report = Report("gc", f"gc: one retention run over {JOBS:,} old jobs and {JOBS:,} hosted runs")
    busy = cpu_busy_pct()
    with tempfile.TemporaryDirectory(prefix="vesta-bench-gc-") as tmp:
        path = Path(tmp) / "records.db"
        t0 = time.perf_counter()
        build(path, JOBS)
        report.row("build the database", time.perf_counter() - t0, "s", "straight into SQLite")
        rec = Records(path)
        try:
            took, stall_ms, removed = asyncio.run(prune(rec, Path(tmp) / "artifacts"))
            rec.commit()
        finally:
            rec.close()
    rate = removed / took if took else 0.0
    report.row("run", took, "s", f"{removed:,} job records and their parts and output, {JOBS:,} hosted runs")
    report.row("job records removed per second", rate, "/s",
               f"CPUs {busy:.0f}% busy before it started" if busy is not None else "")
    report.row("longest event-loop stall", stall_ms, "ms", f"one batch of {BATCH} jobs at a time")
    report.target(f"longest stall ≤ {LONGEST_STALL_MS:g} ms", stall_ms <= LONGEST_STALL_MS, f"{stall_ms:.1f} ms")
    report.target(f"≥ {MIN_RATE:g} job records/s", rate >= MIN_RATE and removed == JOBS,
                  f"{rate:,.0f}/s, {removed:,} of {JOBS:,}")
    report.finish()


if __name__ == "__main__":
    sys.exit(main())
