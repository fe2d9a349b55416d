"""Retention: keep the records and artifacts of a node that runs for months within bounds (``vesta gc``).

Two rules, both from the config:

* ``keep_days`` (90): a job record (its parts, output and artifact rows) and a hosted run that ended more than
  this long ago are removed, with the job's stored files.
* ``keep_artifacts_mb`` (2048): when the files under ``STATE_DIR/artifacts`` take more than this, the files of
  the jobs that ended longest ago are removed, job by job, until they fit. The record stays and lists each
  file as ``pruned``, with why.

Never touched: a job that is queued or running, one with a part still running (the ledger charges a part when
it ends, so that record is one the ledger still needs), one the daemon is driving right now (``active``), a
hosted run still running, and a transfer in progress (``.vesta-incoming-*``). The ledger keeps its own
amounts in its own file (they fade by its half-life); nothing here changes them.

``Pruner.run(dry_run=True)`` works out the same ``Report`` and changes nothing. Records go first, then
files: a crash between the two leaves a directory no record lists, which the daemon removes when it starts
(``artifacts.remove_unrecorded``) or the next run does. The work is done in batches with a pause between,
and the files are measured and removed in a worker thread, so a first run over a year of records does not
hold up the event loop. The daemon runs it once shortly after start and then once a day.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vesta.records import Records

log = logging.getLogger(__name__)

DAY_S = 86400.0
BATCH = 500            # records removed per statement, with a pause for the event loop between batches


@dataclass
class Report:
    """What one run freed (or, dry, would free)."""

    dry_run: bool
    keep_days: float
    keep_artifacts_bytes: int
    jobs: int = 0                   # job records removed (older than keep_days)
    log_bytes: int = 0              # the stored output those records held
    hosted: int = 0                 # hosted-run records removed
    artifact_jobs: int = 0          # jobs whose stored files were removed (an old record, or over the budget)
    artifact_bytes: int = 0         # bytes of those files
    artifacts_before: int = 0       # bytes under artifacts/ before the run
    artifacts_after: int = 0        # ... and after it (what it would be, dry)
    unprunable_bytes: int = 0       # bytes of jobs still queued or running: never removed
    job_ids: list[str] = field(default_factory=list)       # the first MAX_LISTED job records removed
    artifact_ids: list[str] = field(default_factory=list)  # the first MAX_LISTED jobs whose files went

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


MAX_LISTED = 100


def tree_size(path: str) -> int:
    """Bytes of the files under ``path`` (links not followed)."""
    total = 0
    for top, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(top, name)).st_size
    return total


def job_dirs(root: Path) -> dict[str, int]:
    """The job directories under ``root`` (``artifacts/``) and the bytes of each; transfers in progress
    (``.vesta-incoming-*``) and anything that is not a plain directory are left out."""
    out: dict[str, int] = {}
    try:
        entries = list(os.scandir(root))
    except OSError:
        return out
    for entry in entries:
        if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
            out[entry.name] = tree_size(entry.path)
    return out


class Pruner:
    """Applies ``keep_days`` and ``keep_artifacts_mb`` to one node's records and artifacts."""

    def __init__(self, records: Records, artifacts_dir: Path, *, keep_days: float, keep_artifacts_mb: int,
                 clock: Callable[[], float] = time.time, active: Callable[[], set[str]] = set,
                 counters: Counter[str] | None = None) -> None:
        self.records = records
        self.artifacts_dir = artifacts_dir
        self.keep_days = keep_days
        self.keep_artifacts_bytes = keep_artifacts_mb << 20
        self.clock = clock
        self.active = active        # () -> ids of the jobs the daemon is driving now: never touched
        self.counters = counters    # gc_* counters for the metrics
        self._lock = asyncio.Lock()

    async def run(self, *, dry_run: bool = False) -> Report:
        """Prune now (one run at a time); ``dry_run`` works out the same report and changes nothing."""
        async with self._lock:
            report = Report(dry_run=dry_run, keep_days=self.keep_days, keep_artifacts_bytes=self.keep_artifacts_bytes)
            sizes = await asyncio.to_thread(job_dirs, self.artifacts_dir)
            report.artifacts_before = sum(sizes.values())
            doomed: dict[str, int] = {}   # job id -> bytes of its directory, to remove
            await self._old_records(report, sizes, doomed, dry_run)
            self._over_budget(report, sizes, doomed, dry_run)
            report.artifact_jobs = len(doomed)
            report.artifact_bytes = sum(doomed.values())
            report.artifact_ids = sorted(doomed)[:MAX_LISTED]
            report.artifacts_after = report.artifacts_before - report.artifact_bytes
            if not dry_run:
                await asyncio.to_thread(self._remove, list(doomed))
                if self.counters is not None:
                    self.counters["gc_runs"] += 1
                    self.counters["gc_pruned_jobs"] += report.jobs
                    self.counters["gc_pruned_hosted"] += report.hosted
                    self.counters["gc_pruned_artifact_jobs"] += report.artifact_jobs
                    self.counters["gc_pruned_artifact_bytes"] += report.artifact_bytes
                if report.jobs or report.hosted or doomed:
                    log.info("gc: removed %d job record(s), %d hosted run(s), the files of %d job(s) (%d bytes)",
                             report.jobs, report.hosted, report.artifact_jobs, report.artifact_bytes)
            return report

    async def _old_records(self, report: Report, sizes: dict[str, int], doomed: dict[str, int],
                           dry_run: bool) -> None:
        """Records that ended more than keep_days ago, and the files of those jobs."""
        before = self.clock() - self.keep_days * DAY_S
        after: tuple[float, str] = (float("-inf"), "")
        while rows := self.records.old_jobs(before, after, BATCH):
            after = (rows[-1]["created"], rows[-1]["id"])
            active = self.active()
            ids = [r["id"] for r in rows if r["id"] not in active]
            report.jobs += len(ids)
            report.log_bytes += sum(r["log_bytes"] for r in rows if r["id"] not in active)
            report.job_ids.extend(ids[: MAX_LISTED - len(report.job_ids)])
            for job_id in ids:
                if job_id in sizes:
                    doomed[job_id] = sizes.pop(job_id)
            if not dry_run:
                self.records.delete_jobs(ids)
            await asyncio.sleep(0)
        hosted_after: tuple[float, int] = (float("-inf"), 0)
        while hosted := self.records.old_hosted(before, hosted_after, BATCH):
            hosted_after = (hosted[-1]["started"], hosted[-1]["id"])
            report.hosted += len(hosted)
            if not dry_run:
                self.records.delete_hosted([h["id"] for h in hosted])
            await asyncio.sleep(0)

    def _over_budget(self, report: Report, sizes: dict[str, int], doomed: dict[str, int], dry_run: bool) -> None:
        """The files of the jobs that ended longest ago, until what is left fits keep_artifacts_mb."""
        total = sum(sizes.values())
        if total <= self.keep_artifacts_bytes:
            return
        names = list(sizes)
        ended = self.records.ended(names)
        known = self.records.known(names)
        active = self.active()
        # A directory no record names was left by a crash (see the module doc): it goes first.
        order = sorted((ended.get(job_id, float("-inf")), job_id) for job_id in names
                       if job_id not in active and (job_id in ended or job_id not in known))
        report.unprunable_bytes = total - sum(sizes[job_id] for _, job_id in order)
        day = time.strftime("%Y-%m-%d", time.localtime(self.clock()))
        reason = f"over keep_artifacts_mb ({self.keep_artifacts_bytes >> 20} MiB); removed {day}"
        for _, job_id in order:
            if total <= self.keep_artifacts_bytes:
                break
            size = sizes.pop(job_id)
            doomed[job_id] = size
            total -= size
            if not dry_run and job_id in known:
                self.records.prune_artifacts(job_id, reason)

    def _remove(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            shutil.rmtree(self.artifacts_dir / job_id, ignore_errors=True)
