"""Sweeps (``vesta map``): one command over many inputs, run by the daemon as a job group.

A sweep is on record (table ``sweeps``) from the moment it is submitted, with its whole ``SweepSpec``; each
of its jobs is an ordinary queued exec job (``jobqueue``) that names the sweep and its number in it. So the
sweep belongs to the daemon: the ``vesta map`` that submitted it only follows it, and may go away (even
with SIGKILL) while it runs; ``vesta wait SWEEP`` follows it again. A daemon killed with SIGKILL finds its
running sweeps in the records when it starts (``Sweeps.resume``): a number whose job ended and was
reported is done; one whose job ended but was not reported yet is reported now; a job still queued is
placed by the queue as before; a job that was running when the daemon died (``daemon restarted``) is run
again as a new job, and both stay on record. Each number's result is given out once: its job is marked
``reported`` in the records after its joblog line is written, and a resumed sweep skips numbers the
joblog already has.

At most ``-j`` jobs are in the queue at once (default: all of them; the queue places as many as the
federation has slots for). A job that fails is run again, up to ``--retries`` times, on a node it has not
failed on where there is one. ``--halt`` stops a sweep after enough failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vesta.errors import InputError, InvalidJob, JobFailed, NotFound, PeerUnavailable, VestaError
from vesta.inputcache import NOT_KEPT
from vesta.jobqueue import ExecQueue, stage_inputs
from vesta.placement import Want
from vesta.records import Records
from vesta.schema import RESTARTED
from vesta.spec import ExecSpec, FileInfo, JobRequest
from vesta.submitter import Emit, Submitter, new_job_id
from vesta.sweepspec import JOBLOG_HEADER, SweepSpec, is_sweep_id, joblog_line, read_joblog
from vesta.tasks import cancel_all, spawn

log = logging.getLogger(__name__)

INTERRUPTED = {RESTARTED, "daemon stopped"}   # a job ended so never ran to its end: it runs again
PROGRESS_EVERY = 0.25                          # seconds between progress events while jobs start
MAX_REPORTED_OUTPUT = 1 << 20                  # bytes of each stream a follower gets with a job's end
FORGET_AFTER_S = 60.0                          # a sweep that ended is kept in memory this long
MAX_UNSTARTED = 3                              # times a job whose shared input never came is run again
FOLLOWER_WAIT_S = 10.0                         # a follower that takes no event for this long is dropped


def new_sweep_id() -> str:
    return "s" + secrets.token_hex(5)


class Sweeps:
    """The sweeps of one daemon."""

    def __init__(self, *, name: str, fingerprint: str, records: Records, queue: ExecQueue, submitter: Submitter,
                 root: Path, on_event: Callable[[str, str], None] = lambda kind, text: None) -> None:
        self.name = name
        self.fingerprint = fingerprint
        self.records = records
        self.queue = queue
        self.submitter = submitter
        self.root = root              # state_dir/sweeps: each sweep's shared --put files, staged once
        self.on_event = on_event
        self.runs: dict[str, SweepRun] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    async def close(self) -> None:
        """Stop following the sweeps (the daemon stops); they stay running on record and resume at start."""
        await cancel_all(self._tasks)

    async def start(self, spec: SweepSpec) -> SweepRun:
        """Put a new sweep on record and start it."""
        if spec.on is not None:
            self.submitter.check_on(spec.on)
        if spec.need:
            self._check_need(spec)
        sweep_id = new_sweep_id()
        shared: tuple[FileInfo, ...] = ()
        if spec.puts:
            shared = await asyncio.to_thread(stage_inputs, list(spec.puts), self.root / sweep_id)
        clash = {f.path for f in shared} & {os.path.basename(p) for p in spec.put_each}
        if clash:
            shutil.rmtree(self.root / sweep_id, ignore_errors=True)
            raise InputError(f"--put and --put-each both ship a file called {sorted(clash)[0]}; rename one")
        if spec.joblog:
            await asyncio.to_thread(_start_joblog, spec)
        try:
            self.records.create_sweep(sweep_id, spec.to_wire() | {"shared": [f.to_wire() for f in shared]}, self.name)
        except BaseException:
            shutil.rmtree(self.root / sweep_id, ignore_errors=True)
            raise
        run = SweepRun(self, sweep_id, spec, shared)
        self._begin(run)
        self.on_event("sweep", f"{sweep_id} started: {len(run.todo)} jobs of {' '.join(spec.template)[:60]}")
        return run

    def _check_need(self, spec: SweepSpec) -> None:
        """A --need no node has fails at once, as `vesta exec --need` does (a busy node is waited for)."""
        placer = self.submitter.placer
        self.submitter.refresh()
        views = list(placer.views.values())
        if not any(all(label in v.labels for label in spec.need) for v in views):
            raise JobFailed("no node has " + ", ".join(spec.need) + " (" + "; ".join(
                f"{v.name}: {', '.join(v.labels) or 'no labels'}" for v in views) + "); see vesta peers")

    def resume(self) -> int:
        """Pick up the sweeps the records say are running (the daemon stopped or died under them). Call it
        before the exec queue runs: the jobs it still holds are followed from their first moment."""
        resumed = 0
        for row in self.records.sweeps(running=True, limit=100_000):
            args = row["args"] or {}
            try:
                spec = SweepSpec.from_wire(args)
                shared = tuple(FileInfo.from_wire(f) for f in args.get("shared") or ())
            except InvalidJob as exc:
                self.records.end_sweep(row["id"], "failed", f"cannot resume this sweep: {exc}"[:500])
                continue
            run = SweepRun(self, row["id"], spec, shared, created=row["created"])
            run.load(self.records.sweep_jobs(row["id"]))
            self._begin(run)
            resumed += 1
            log.info("sweep %s resumed: %d done, %d to run, %d in the queue", row["id"], run.done, len(run.todo),
                     len(run.running))
        return resumed

    def _begin(self, run: SweepRun) -> None:
        self.runs[run.sweep_id] = run
        spawn(run.run(), f"sweep-{run.sweep_id}", self._tasks)

    def cancel(self, sweep_id: str) -> bool:
        run = self.runs.get(sweep_id)
        if run is None or run.finished.done():
            return False
        run.stop("cancelled", now=True)
        return True

    def other_node(self, tried: list[str], spec: SweepSpec) -> str | None:
        """A node that may take the job and has not failed it yet (the most free slots first), for a retry."""
        if spec.on is not None:
            return spec.on
        placer = self.submitter.placer
        self.submitter.refresh()
        want = Want("exec", None, need=spec.need)
        able = [v for v in placer.views.values() if not placer.why_not(v, want) and v.name not in tried]
        able.sort(key=lambda v: -placer.free(v.fingerprint))
        return able[0].name if able else None

    def show(self, sweep_id: str) -> dict[str, Any]:
        """The record of a sweep, with its counts and every job of it."""
        row = self.records.sweep(sweep_id)
        if row is None:
            raise NotFound(f"no sweep {sweep_id!r} in this node's records (see `vesta jobs`)")
        row["counts"] = self.records.sweep_counts(sweep_id)
        run = self.runs.get(sweep_id)
        row["live"] = run.summary() if run is not None else None
        row["jobs"] = [{k: j.get(k) for k in ("id", "sweep_seq", "state", "exit_code", "reason", "created", "started",
                                              "finished", "outcome", "reported")}
                       | {"node": (j.get("result") or {}).get("node"), "argv": (j.get("args") or {}).get("argv")}
                       for j in self.records.sweep_jobs(sweep_id)]
        return row


class SweepRun:
    """One sweep being run: what is left to start, what is in the queue, what has ended."""

    def __init__(self, owner: Sweeps, sweep_id: str, spec: SweepSpec, shared: tuple[FileInfo, ...],
                 created: float | None = None) -> None:
        self.owner = owner
        self.sweep_id = sweep_id
        self.spec = spec
        self.shared = shared
        self.created = created if created is not None else time.time()
        self.numbers = spec.to_run()
        self.todo: deque[int] = deque(self.numbers)
        self.running: dict[str, int] = {}                   # job id -> its number (queued or running)
        self._ends: dict[asyncio.Future[Any], str] = {}      # a job's end -> its id
        self._settle_first: list[dict[str, Any]] = []        # jobs that ended but were not reported (resume)
        self.attempts: Counter[int] = Counter()              # runs of each number that ended (not interrupted)
        self.tried: dict[int, list[str]] = {}                # nodes each number failed on
        self.unstarted: Counter[int] = Counter()             # runs of each number that never started (see NOT_KEPT)
        self.done = self.succeeded = self.failed = self.rerun = 0
        self.per_node: Counter[str] = Counter()
        self.logged: set[int] = set()                        # numbers with a joblog line from this sweep
        self.followers: list[Emit] = []
        self.finished: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.stopping = ""                                   # why no more jobs start ("" while they do)
        self.cancelled = False
        self._wake = asyncio.Event()
        self._last_progress = 0.0

    # ------------------------------------------------------------ resuming

    def load(self, jobs: list[dict[str, Any]]) -> None:
        """Where each number stands, from the sweep's jobs on record (a restart)."""
        if self.spec.joblog:
            self.logged = set(_joblog_seqs(self.spec))
        by_seq: dict[int, list[dict[str, Any]]] = {}
        for j in jobs:
            by_seq.setdefault(int(j["sweep_seq"]), []).append(j)
        wanted = set(self.numbers)
        for seq, rows in by_seq.items():
            if seq not in wanted:
                continue
            last = rows[-1]
            settled = rows if last["reported"] else rows[:-1]   # an unreported end is counted when it is settled
            for j in settled:
                if j["state"] not in ("queued", "running") and j["reason"] not in INTERRUPTED:
                    self.attempts[seq] += 1
                    if j["state"] != "succeeded":
                        self.tried.setdefault(seq, []).append(str((j.get("result") or {}).get("node") or ""))
            if last["state"] == "queued":
                self.todo.remove(seq)
                self._follow(last["id"], seq)
            elif last["state"] == "running" or last["reason"] in INTERRUPTED:
                self.rerun += 1   # it runs again from the start of the queue; the records keep both jobs
                self.todo.remove(seq)
                self.todo.appendleft(seq)
                self.owner.on_event("sweep", f"{self.sweep_id} job {seq} ({last['id']}) runs again: "
                                             f"{last['reason'] or 'it was running when the daemon stopped'}")
            elif last["reported"]:
                self.todo.remove(seq)
                self._count(last)
            else:
                self.todo.remove(seq)
                self._settle_first.append(last)

    # ------------------------------------------------------------ running

    async def run(self) -> None:
        try:
            for row in self._settle_first:
                await self._settle(row, int(row["sweep_seq"]))
            self._settle_first.clear()
            while True:
                limit = self.spec.jobs or len(self.numbers)
                while self.todo and not self.stopping and len(self.running) < limit:
                    await self._start(self.todo.popleft())
                await self._progress()
                if not self.running:
                    break
                self._wake.clear()
                wake = asyncio.ensure_future(self._wake.wait())
                try:
                    done, _ = await asyncio.wait([*self._ends, wake], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wake.cancel()
                for end in done:
                    job_id = self._ends.pop(end, None)
                    if job_id is None:
                        continue
                    seq = self.running.pop(job_id)
                    ended = self.owner.records.job(job_id)
                    if ended is not None:
                        await self._settle(ended, seq)
            self._end()
        except asyncio.CancelledError:   # the daemon stops: the sweep stays running on record
            raise
        except Exception as exc:
            log.exception("sweep %s failed inside vestad", self.sweep_id)
            self.stopping = self.stopping or f"internal error: {type(exc).__name__}: {exc}"
            self._end()

    def _follow(self, job_id: str, seq: int) -> None:
        end = self.owner.queue.ended(job_id)
        end.add_done_callback(_consume)
        self._ends[end] = job_id
        self.running[job_id] = seq

    async def _start(self, seq: int, on: str | None = None) -> None:
        """Put job number ``seq`` in the queue (on ``on`` when given: a retry elsewhere)."""
        spec, owner = self.spec, self.owner
        job_id = new_job_id()
        inputs_dir = owner.queue.inputs_root / job_id
        argv = spec.argv(seq)
        try:
            inputs = await asyncio.to_thread(self._stage, seq, inputs_dir)
            share = self.sweep_id if self.shared else ""   # nodes keep the shared files for the next jobs
            request = JobRequest(ExecSpec(argv, timeout_s=spec.timeout_s, mem_mib=spec.mem_mib, inputs=inputs,
                                          share=share, shared=len(self.shared)),
                                 on=on or spec.on, need=spec.need, queue=True)
            request.validate()
        except VestaError as exc:   # its --put-each file is missing, say: this number fails, on record
            shutil.rmtree(inputs_dir, ignore_errors=True)
            args = {"argv": list(argv), "on": on or spec.on}
            owner.records.create_job(job_id, "exec", args, owner.name, owner.fingerprint, state="queued",
                                     sweep=self.sweep_id, seq=seq)
            owner.records.transition(job_id, "failed", reason=str(exc)[:500])
            row = owner.records.job(job_id)
            assert row is not None
            await self._settle(row, seq)
            return
        owner.queue.add(job_id, request, submitter=owner.name, fingerprint=owner.fingerprint, sweep=self.sweep_id,
                        seq=seq)
        self._follow(job_id, seq)

    def _stage(self, seq: int, dest: Path) -> tuple[FileInfo, ...]:
        """The job's inputs in its own directory: its --put-each files copied, the shared ones linked."""
        each = stage_inputs(list(self.spec.put_each_paths(seq)), dest) if self.spec.put_each else ()
        if self.shared:
            dest.mkdir(parents=True, exist_ok=True)
            os.chmod(dest, 0o700)
            for f in self.shared:
                src = self.owner.root / self.sweep_id / f.path
                try:
                    os.link(src, dest / f.path)
                except OSError:
                    shutil.copyfile(src, dest / f.path)
        return (*self.shared, *each)

    async def _settle(self, row: dict[str, Any], seq: int) -> None:
        """A job of the sweep ended: run it again (interrupted, or a retry), or report it as its number's result."""
        if row["state"] == "failed" and row["reason"] in INTERRUPTED and not self.stopping:
            self.rerun += 1
            self.todo.appendleft(seq)
            return
        if NOT_KEPT in (row["reason"] or "") and self.unstarted[seq] < MAX_UNSTARTED and not self.stopping:
            self.unstarted[seq] += 1   # its shared input never reached it: it never started, so it runs again
            self.rerun += 1
            self.todo.appendleft(seq)
            return
        ok = row["state"] == "succeeded" and row.get("exit_code") == 0
        if row["state"] != "cancelled":
            self.attempts[seq] += 1
        if not ok and row["state"] != "cancelled" and self.attempts[seq] <= self.spec.retries and not self.stopping:
            node = str((row.get("result") or {}).get("node") or "")
            tried = self.tried.setdefault(seq, [])
            tried.append(node)
            await self._start(seq, self.owner.other_node(tried, self.spec))
            return
        await self._report(row, seq, ok)
        if not ok:
            self._halt_check()

    async def _report(self, row: dict[str, Any], seq: int, ok: bool) -> None:
        records, spec = self.owner.records, self.spec
        job_id = row["id"]
        stdout, _ = records.log(job_id, "stdout")
        stderr, _ = records.log(job_id, "stderr")
        result = row.get("result") or {}
        node = str(result.get("node") or "")
        signal = int(result.get("signal") or 0)
        code = row.get("exit_code")
        exitval = code if code is not None else (-1 if not signal else 128 + signal)
        started = row.get("started") or row.get("created") or time.time()
        runtime = max(0.0, (row.get("finished") or started) - started)
        sent = sum(i[1] for i in (row.get("args") or {}).get("inputs") or [])
        if spec.joblog and seq not in self.logged:
            line = joblog_line(seq, node or ":", started, runtime, sent, len(stdout) + len(stderr), exitval, signal,
                               spec.command(seq))
            await asyncio.to_thread(_append, spec.joblog, line)
            self.logged.add(seq)
        if spec.results:
            stored = self.owner.submitter.artifacts_dir
            await asyncio.to_thread(_write_results, Path(spec.results) / str(seq), stdout, stderr, exitval, node,
                                    stored / job_id if stored is not None else None, records.artifacts(job_id))
        records.mark_reported(job_id)
        self._count(row)
        await self._emit({"type": "sweep-job", "sweep_id": self.sweep_id, "seq": seq, "job_id": job_id, "node": node,
                          "ok": ok, "exit_code": code, "signal": signal or None, "outcome": row.get("outcome"),
                          "reason": row.get("reason") or "", "command": spec.command(seq), "start": started,
                          "runtime": runtime, "stdout": stdout[:MAX_REPORTED_OUTPUT],
                          "stderr": stderr[:MAX_REPORTED_OUTPUT], "sweep": self.summary()})

    def _count(self, row: dict[str, Any]) -> None:
        self.done += 1
        node = str((row.get("result") or {}).get("node") or "")
        if node:
            self.per_node[node] += 1
        if row["state"] == "succeeded" and row.get("exit_code") == 0:
            self.succeeded += 1
        else:
            self.failed += 1

    def _halt_check(self) -> None:
        halt = self.spec.halt
        if not self.stopping and halt.reached(self.failed, len(self.numbers)):
            self.stop(f"halted: {self.failed} job{'s' if self.failed != 1 else ''} failed (--halt {halt.text()})",
                      now=halt.when == "now")

    def stop(self, why: str, *, now: bool) -> None:
        """Start no more jobs; with ``now``, cancel those in the queue or running too."""
        if not self.stopping:
            self.stopping = why
        self.cancelled = self.cancelled or why == "cancelled"
        self.todo.clear()
        if now:
            for job_id in list(self.running):
                if not self.owner.submitter.cancel(job_id):
                    self.owner.queue.cancel(job_id)
        self._wake.set()

    def _end(self) -> None:
        left = len(self.numbers) - self.done
        state = "cancelled" if self.cancelled else "succeeded" if not self.failed and not left else "failed"
        reason = self.stopping or (f"{self.failed} of {len(self.numbers)} jobs failed" if self.failed else "")
        try:
            self.owner.records.end_sweep(self.sweep_id, state, reason[:500])
        except VestaError as exc:
            log.warning("could not record the end of sweep %s: %s", self.sweep_id, exc)
        shutil.rmtree(self.owner.root / self.sweep_id, ignore_errors=True)
        summary = self.summary() | {"state": state, "reason": reason, "exit_code": exit_code(self.failed, left)}
        self.owner.on_event("sweep", f"{self.sweep_id} {state}: {self.succeeded} succeeded, {self.failed} failed"
                                     + (f", {left} not run" if left else ""))
        if not self.finished.done():
            self.finished.set_result(summary)
        # followed from memory a while longer (a `vesta wait` that comes now), then from the records
        asyncio.get_running_loop().call_later(FORGET_AFTER_S, self.owner.runs.pop, self.sweep_id, None)

    # ------------------------------------------------------------ followers

    def summary(self) -> dict[str, Any]:
        """Where the sweep stands."""
        state = ("running" if not self.finished.done() else self.finished.result()["state"])
        return {"sweep_id": self.sweep_id, "state": state, "total": len(self.numbers), "done": self.done,
                "succeeded": self.succeeded, "failed": self.failed, "running": len(self.running),
                "waiting": len(self.todo), "rerun": self.rerun, "per_node": dict(self.per_node),
                "created": self.created, "reason": self.stopping,
                "exit_code": exit_code(self.failed, len(self.numbers) - self.done if self.finished.done() else 0)}

    async def follow(self, emit: Emit) -> dict[str, Any]:
        """Pass the sweep's events to ``emit`` until it ends; its summary. The sweep goes on if the follower goes."""
        self.followers.append(emit)
        try:
            await emit({"type": "sweep-start", **self.summary(), "command": " ".join(self.spec.template)})
            return await asyncio.shield(self.finished)
        finally:
            with contextlib.suppress(ValueError):
                self.followers.remove(emit)

    async def _progress(self) -> None:
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_EVERY or not self.running:
            self._last_progress = now
            await self._emit({"type": "sweep-progress", **self.summary()})

    async def _emit(self, event: dict[str, Any]) -> None:
        for emit in list(self.followers):
            try:
                async with asyncio.timeout(FOLLOWER_WAIT_S):
                    await emit(event)
            except (PeerUnavailable, OSError, TimeoutError):   # that client went away (or stopped reading): the
                # sweep goes on without it
                with contextlib.suppress(ValueError):
                    self.followers.remove(emit)


__all__ = ["SweepRun", "Sweeps", "is_sweep_id", "new_sweep_id"]


def exit_code(failed: int, not_run: int = 0) -> int:
    """GNU parallel's: 0 when every job succeeded, else how many failed (or never ran), at most 101."""
    return min(101, failed + max(0, not_run))


def _consume(end: asyncio.Future[Any]) -> None:
    """A job's end is read from the records: its error, if any, is not news (and must not be logged as lost)."""
    if not end.cancelled():
        end.exception()


def _start_joblog(spec: SweepSpec) -> None:
    """A new sweep's joblog: the header in a new (or emptied) file, or, resuming, the file as it is."""
    path = Path(spec.joblog)
    try:
        if spec.joblog_from == 0:
            path.write_text(JOBLOG_HEADER + "\n")
    except OSError as exc:
        raise InputError(f"--joblog {path}: cannot write it: {exc.strerror or exc}") from None


def _joblog_seqs(spec: SweepSpec) -> list[int]:
    """The numbers the sweep's joblog has lines for, after what was there before the sweep started."""
    try:
        with open(spec.joblog, encoding="utf-8", errors="replace") as f:
            f.seek(spec.joblog_from)
            return list(read_joblog(f))
    except OSError:
        return []


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _write_results(dest: Path, stdout: bytes, stderr: bytes, exitval: int, node: str, artifacts_dir: Path | None,
                   files: list[dict[str, Any]]) -> None:
    """``--results DIR``: DIR/SEQ/{stdout,stderr,exit,node} and the job's artifacts under DIR/SEQ/artifacts."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "stdout").write_bytes(stdout)
        (dest / "stderr").write_bytes(stderr)
        (dest / "exit").write_text(f"{exitval}\n")
        (dest / "node").write_text(f"{node}\n")
        for f in files:
            if f["state"] != "stored" or artifacts_dir is None:
                continue
            target = dest / "artifacts" / f["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(artifacts_dir / f["path"], target)
    except OSError as exc:
        log.warning("--results %s: %s", dest, exc.strerror or exc)
