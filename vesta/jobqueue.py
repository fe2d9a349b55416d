"""Exec jobs that wait: ``vesta exec --queue`` keeps a job ``queued`` until a node can take it.

A queued job is on record (the records database) from the moment it is submitted, with everything
needed to run it: its command, limits, retries and the manifest of its input files, whose staged
copies stay under ``state_dir/inputs/JOB/`` until the job ends. So a queued job survives a restart
of the daemon: the records keep it queued (see ``records``) and this queue picks it up again.

Placement is pull-style, from the submitting node, and driven by capacity events: a chunk ending
anywhere, a beacon that shows spare (``Submitter.freed``), a node joining. Then the queue counts
the free slots of the nodes that allow exec (``placement.Placer``, which counts work in flight) and
offers that many of the oldest queued jobs, so a job is placed within one beacon interval of
capacity appearing, never after a back-off. When every node says "not now" (busy, outside its
lending hours, over its ledger cap, not around, exec off) the job stays queued with the reasons on
record (``vesta show``) and waits for the next capacity event (or ``RECHECK_S``, for a "no" no
beacon shows, such as a ledger cap); when no node could ever run it (not in any allowlist, too big)
it fails like any job. A client that submitted with ``--queue`` and waits is a
watcher: it sees the job start and its output, and its going away does not cancel the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vesta import artifacts, spec
from vesta.errors import InputError, InvalidJob, JobFailed, NotNow, PeerUnavailable, VestaError
from vesta.records import Records
from vesta.spec import FileInfo, JobRequest
from vesta.submitter import Emit, Submitter
from vesta.tasks import StopFlag, cancel_all, spawn

log = logging.getLogger(__name__)

RECHECK_S = 10.0   # a job turned away waits for capacity to appear, or at most this long (a ledger cap)


def stage_inputs(paths: list[str] | tuple[str, ...], dest: Path) -> tuple[FileInfo, ...]:
    """Copy the files to ship with a job into ``dest`` (so later edits do not change what runs, and a
    queued job keeps them across a restart), with their size and SHA-256."""
    if len(paths) > spec.MAX_INPUTS:
        raise InputError(f"--put takes at most {spec.MAX_INPUTS} files ({len(paths)} given)")
    names: dict[str, str] = {}
    for raw in paths:
        name = os.path.basename(raw.rstrip("/"))
        if not os.path.isabs(raw):
            raise InputError(f"--put {raw}: the path must be absolute (the vesta CLI makes it so)")
        try:
            st = os.stat(raw)
        except OSError as exc:
            raise InputError(f"--put {raw}: {exc.strerror.lower() if exc.strerror else exc}") from None
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"--put {raw}: not a regular file (ship a directory as an archive: tar czf)")
        if name in names:
            raise InputError(f"--put {raw}: another file is also called {name} ({names[name]}); rename one")
        if name in (artifacts.OUTPUT_DIR, "tmp"):
            raise InputError(f"--put {raw}: {name} is the name of a directory every job has; rename the file")
        names[name] = raw
    dest.mkdir(parents=True, exist_ok=True)
    os.chmod(dest, 0o700)
    staged = []
    try:
        for name, raw in names.items():
            try:
                shutil.copyfile(raw, dest / name)
                size, sha = artifacts.sha256_file(dest / name)
            except OSError as exc:
                raise InputError(f"--put {raw}: cannot read it: {exc.strerror or exc}") from None
            if size > spec.MAX_FILE_BYTES:
                raise InputError(f"--put {raw}: too big to ship")
            staged.append(FileInfo(name, size, sha, bool(os.stat(raw).st_mode & 0o100)))
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return tuple(staged)


class ExecQueue:
    """The queued exec jobs of one node and the clients waiting on them."""

    def __init__(self, submitter: Submitter, records: Records, inputs_root: Path,
                 can_place: Callable[[str | None], str], on_done: Callable[[str, dict[str, Any] | None,
                                                                               BaseException | None], None]) -> None:
        self.submitter = submitter
        self.records = records
        self.inputs_root = inputs_root
        self.can_place = can_place          # (node or None) -> why no node may take it now, or ""
        self.on_done = on_done              # (job id, result, error): for the event feed
        self.wake = asyncio.Event()
        self._placing: dict[str, StopFlag] = {}   # jobs being offered now, and their cancel switch
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watchers: dict[str, list[Emit]] = {}
        self._ends: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._parked: dict[str, float] = {}   # jobs every node just turned away: until capacity appears
        self._queued = True                   # the records held queued jobs at the last look (or one was added)
        self._rows: dict[str, dict[str, Any]] | None = None   # the queued jobs, oldest first (None: not read yet)

    async def close(self) -> None:
        """Stop the jobs being placed from the queue (the daemon is stopping)."""
        await cancel_all(self._tasks)

    def forget_stale_inputs(self) -> None:
        """Staged inputs of jobs that are no longer queued (the daemon died while they ran)."""
        keep = {row["id"] for row in self.records.queued()}
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.inputs_root):
                if entry.name not in keep:
                    shutil.rmtree(entry.path, ignore_errors=True)

    def add(self, job_id: str, request: JobRequest, *, submitter: str, fingerprint: str, sweep: str | None = None,
            seq: int | None = None) -> None:
        """Put a job on record as queued; it is tried at once. (Its inputs are staged already.) ``sweep``,
        ``seq``: the sweep it belongs to and its number there."""
        try:
            self.records.create_job(job_id, request.kind, request.to_wire(), submitter, fingerprint, state="queued",
                                    sweep=sweep, seq=seq)
        except BaseException:
            shutil.rmtree(self.inputs_root / job_id, ignore_errors=True)
            raise
        self._queued = True
        if self._rows is not None:
            self._rows[job_id] = {"id": job_id, "kind": request.kind, "args": request.to_wire(), "reason": ""}
        self.wake.set()

    def ended(self, job_id: str) -> asyncio.Future[dict[str, Any]]:
        """A future of a queued job's end (its result, or its error), registered now: one that ends later,
        however soon, completes it."""
        end: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._ends.setdefault(job_id, []).append(end)
        return end

    async def follow(self, job_id: str, emit: Emit) -> dict[str, Any]:
        """Wait for a queued job to end, passing its events to ``emit``; the job's result."""
        end: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._ends.setdefault(job_id, []).append(end)
        self._watchers.setdefault(job_id, []).append(emit)
        try:
            return await end
        finally:
            with contextlib.suppress(ValueError, KeyError):
                self._watchers[job_id].remove(emit)
                self._ends[job_id].remove(end)

    async def _emit(self, job_id: str, event: dict[str, Any]) -> None:
        for emit in list(self._watchers.get(job_id, ())):
            try:
                await emit(event)
            except (PeerUnavailable, OSError):   # that client went away; the job goes on
                with contextlib.suppress(ValueError):
                    self._watchers[job_id].remove(emit)

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job. One being offered right now stops there, or ends cancelled as soon as its
        offer comes back with no node (its switch is set before the submitter has it)."""
        flag = self._placing.get(job_id)
        if flag is not None:
            flag.set()
            return True
        row = self.records.job(job_id)
        if row is None or row["state"] != "queued":
            return False
        self._cancelled(job_id)
        return True

    def _cancelled(self, job_id: str) -> None:
        self.records.transition(job_id, "cancelled", reason="cancelled while queued")
        self._ended(job_id, None, JobFailed(f"job {job_id} cancelled while queued"))

    def _ended(self, job_id: str, result: dict[str, Any] | None, error: BaseException | None) -> None:
        self._parked.pop(job_id, None)
        if self._rows is not None:
            self._rows.pop(job_id, None)
        shutil.rmtree(self.inputs_root / job_id, ignore_errors=True)
        for end in self._ends.pop(job_id, []):
            if not end.done():
                if error is not None:
                    end.set_exception(error)
                else:
                    assert result is not None
                    end.set_result(result)
        self._watchers.pop(job_id, None)
        self.on_done(job_id, result, error)

    def capacity(self) -> None:
        """Capacity may have appeared (a chunk ended, a beacon shows spare): every queued job may be tried."""
        if self._queued:   # (nothing to do for an empty queue: this comes with every chunk's end)
            self._parked.clear()
            self.wake.set()

    async def run(self, interval: float) -> None:
        """Offer queued jobs whenever a node may take them: forever (cancel to stop)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self.wake.wait()
            self.wake.clear()
            await self.place_due()

    async def place_due(self) -> None:
        """Start offering the oldest queued jobs that may be tried now, as many as there are free slots. The
        queue is read from the records once and kept here (add and end keep it), so a pass costs the jobs it
        looks at, not the whole queue: it stops when the free slots are gone."""
        try:
            if self._rows is None:
                self._rows = {row["id"]: row for row in self.records.queued()}
        except VestaError as exc:
            log.warning("cannot read the queue: %s", exc)
            return
        self._queued = bool(self._rows)
        now = time.monotonic()
        free: dict[str | None, int] = {}   # slots left to offer, per --on
        whys: dict[str | None, str] = {}
        for row in list(self._rows.values()):
            args = row["args"]
            if row["id"] in self._placing or row["kind"] != "exec" or self._parked.get(row["id"], 0) > now:
                continue
            on = args.get("on")
            why = whys[on] if on in whys else whys.setdefault(on, self.can_place(on))
            if why:
                if why != row["reason"]:
                    self.records.wait_reason(row["id"], why)
                    row["reason"] = why
                    await self._emit(row["id"], {"type": "queued", "job_id": row["id"], "why": why})
                continue
            if on not in free:   # as many as there are free slots (one at least: the nodes decide)
                free[on] = max(1, self.submitter.free_exec_slots(on))
            if free.get(None, 1) <= 0:
                break            # no slot left anywhere: none after this one can start either
            if free[on] <= 0:
                continue
            free[on] -= 1
            if on is not None and None in free:
                free[None] -= 1
            flag = self._placing[row["id"]] = StopFlag()
            spawn(self._place(row["id"], args, flag), f"queued-{row['id']}", self._tasks)

    async def _place(self, job_id: str, args: dict[str, Any], cancel: StopFlag) -> None:
        try:
            if cancel.is_set():   # cancelled before this task first ran
                self._cancelled(job_id)
                return
            try:
                request = JobRequest.from_wire("exec", args)
            except InvalidJob as exc:   # stored by a vesta that checked less: it can never run, so it ends here
                self.records.transition(job_id, "failed", reason=f"cannot run this queued job: {exc}"[:500])
                raise
            result = await self.submitter.submit(request, lambda event: self._emit(job_id, event), job_id=job_id,
                                                 queued=True, cancel=cancel, inputs_dir=self.inputs_root / job_id)
        except NotNow as exc:   # still queued (the reasons are on record): tried again when capacity appears
            if cancel.is_set():   # cancelled while no node could take it: it ends here
                try:
                    self._cancelled(job_id)
                except VestaError as error:   # its followers still hear how it ended
                    self._ended(job_id, None, error)
                return
            self._parked[job_id] = time.monotonic() + RECHECK_S
            if self._rows is not None and job_id in self._rows:
                self._rows[job_id]["reason"] = str(exc)[:500]   # as the submitter put it on record
            del self._placing[job_id]
            await self._emit(job_id, {"type": "queued", "job_id": job_id, "why": str(exc)})
            return
        except (JobFailed, VestaError) as exc:
            self._ended(job_id, None, exc)
        except Exception as exc:
            log.exception("queued job %s failed inside vesta", job_id)
            self._ended(job_id, None, exc)
        else:
            self._ended(job_id, result, None)
        finally:
            if self._placing.pop(job_id, None) is not None:
                self.wake.set()   # a job ended: capacity may have freed for the next one
