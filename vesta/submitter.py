"""Jobs this node submits: place chunks, re-place them, merge the results (the host's side is ``host``).

``Submitter.submit(request)`` runs one ``spec.JobRequest``. The job is cut into chunks (see
``autopilot``); each chosen node holds at most its slots of chunks at once and gets the next chunk when
one finishes (``_Schedule``). A chunk that is refused, or whose node dies or drops the link, goes back to
the queue and that node leaves this job; the job fails only when no node is left, with the reason of
each. The submitting node is the last resort for its own cpu and mem work. One chunk's life, on this
node or a peer, is ``chunks.ChunkRun``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vesta import artifacts, autopilot, outcome, proto, workloads
from vesta.autopilot import Choice, NodeView
from vesta.chunks import ChunkOutcome, ChunkRun, Job, OnBorrowed, RunLocal, new_job_id
from vesta.errors import JobCancelled, JobFailed, NotNow, VestaError
from vesta.hostexec import OnOutput
from vesta.link import LinkPool
from vesta.peertable import PeerTable
from vesta.records import Records
from vesta.spec import STORED, CpuSpec, ExecSpec, JobRequest, MemSpec
from vesta.tasks import StopFlag

log = logging.getLogger(__name__)

REFRESH_EVERY = 0.5      # seconds between looks for peers that became free during a split job

Emit = Callable[[dict[str, Any]], Awaitable[None]]
MakeOffer = Callable[[int, int, int], Callable[[int], proto.Offer]]   # (chunk, start, count) -> (rid -> Offer)
# Refusals that may not last: a queued job waits them out instead of failing.
PASSING = frozenset({"capacity", "hours", "ledger", "busy"})

__all__ = ["Emit", "Job", "Submitter", "new_job_id"]


class Submitter:
    """Runs jobs submitted on this node."""

    def __init__(self, *, name: str, fingerprint: str, pool: LinkPool, table: PeerTable,
                 views: Callable[[], list[NodeView]], spill_cpu_pct: float, counters: Counter[str],
                 run_local: RunLocal, on_borrowed: OnBorrowed = lambda fp, name, offer, result: None,
                 on_event: Callable[[str, str], None] = lambda kind, text: None,
                 records: Records | None = None, artifacts_dir: Path | None = None, artifact_cap: int = 0,
                 max_attempts: int = 3) -> None:
        self.artifacts_dir = artifacts_dir   # where each exec job's $VESTA_OUTPUT files are stored (JOB/...)
        self.artifact_cap = artifact_cap     # bytes of them per job
        self.max_attempts = max_attempts     # runs of a cpu/mem chunk lost to failures before its job fails
        self.on_borrowed = on_borrowed
        self.on_event = on_event
        self.records = records
        self.name = name
        self.fingerprint = fingerprint
        self.pool = pool
        self.table = table
        self.views = views
        self.spill_cpu_pct = spill_cpu_pct
        self.counters = counters
        self.run_local = run_local
        self.debits = autopilot.Debits()
        self.jobs: dict[str, Job] = {}

    # ------------------------------------------------------------ the job's record

    def _register(self, job: Job) -> None:
        """Put the job on record: committed with its first part, before any chunk is offered (``_Schedule``),
        or with its end if it fails first. Nothing may be awaited from here to there."""
        self.jobs[job.job_id] = job
        if self.records is not None and not job.queued:   # a queued job is on record already
            self.records.create_job(job.job_id, job.kind, job.request.to_wire(), self.name, self.fingerprint,
                                    defer=True)

    def _add_part(self, job: Job, o: ChunkOutcome) -> None:
        if self.records is not None and o.part_id is None:
            o.part_id = self.records.add_part(job.job_id, chunk=o.chunk, attempt=o.attempt, node=o.node.name,
                                              node_fp=o.node.fingerprint, started=o.placed)

    def _mark_running(self, job: Job, o: ChunkOutcome) -> None:
        """A node accepted a chunk: a queued job is now running; an exec job re-run after a lost
        attempt starts its artifacts afresh."""
        if job.sink is not None and o.attempt > 1:
            job.sink.restart()
        if job.queued:
            job.queued = False
            if self.records is not None:
                try:
                    self.records.transition(job.job_id, "running")
                except VestaError as exc:
                    log.warning("could not record the start of job %s: %s", job.job_id, exc)
            self._add_part(job, o)

    def _record_part(self, o: ChunkOutcome, cancelled: bool = False, defer: bool = False) -> None:
        """One attempt at one chunk, as it ended."""
        if self.records is None or o.part_id is None:
            return
        r = o.result
        state = outcome.attempt_state(ok=o.ok, refused=bool(o.refused), cancelled=cancelled, has_result=r is not None,
                                      error=o.error or (r.error if r else ""))
        try:
            self.records.finish_part(o.part_id, state=state, finished=time.time(), cpu_s=r.cpu_s if r else 0.0,
                                     exit_code=r.exit_code if r else None, reason=(o.refused or o.error)[:500],
                                     result={"hostname": r.hostname, "iterations": r.iterations} if r else None,
                                     defer=defer)
        except VestaError as exc:
            log.warning("could not record part %s: %s", o.part_id, exc)
        o.part_id = None

    def _finish(self, job: Job, state: str, *, reason: str = "", exit_code: int | None = None,
                result: dict[str, Any] | None = None) -> None:
        """Record how a job ended (once) and forget it."""
        self.jobs.pop(job.job_id, None)
        if self.records is not None:
            try:
                self.records.transition(job.job_id, state, reason=reason[:500], exit_code=exit_code, result=result)
            except VestaError as exc:
                log.warning("could not record the end of job %s: %s", job.job_id, exc)

    def _failed(self, job: Job, exc: BaseException) -> None:
        if job.job_id not in self.jobs:
            return
        if job.queued and isinstance(exc, (NotNow, asyncio.CancelledError)):   # never started: still queued
            self.jobs.pop(job.job_id, None)
            if self.records is not None and isinstance(exc, NotNow):
                self.records.wait_reason(job.job_id, str(exc)[:500])
            return
        reason = (str(exc) if isinstance(exc, VestaError)
                  else "daemon stopped" if isinstance(exc, asyncio.CancelledError)
                  else f"internal error: {type(exc).__name__}")
        self._finish(job, "cancelled" if isinstance(exc, JobCancelled) else "failed", reason=reason)

    def _store_artifacts(self, job: Job, node: str = "") -> list[dict[str, Any]]:
        """Close the job's artifact sink and put what it got on record."""
        if job.sink is None:
            return []
        files = [dataclasses.asdict(f) for f in job.sink.finish()]
        job.sink = None
        for f in files:
            f.pop("executable", None)
            if self.records is not None:
                try:
                    self.records.add_artifact(job.job_id, node=node, **f)
                except VestaError as exc:
                    log.warning("could not record artifact %s of job %s: %s", f["path"], job.job_id, exc)
        return files

    # ------------------------------------------------------------ submitting

    def cancel(self, job_id: str) -> bool:
        job = self.jobs.get(job_id)
        if job is None:
            return False
        job.cancel.set()
        return True

    def _pick(self, on: str | None) -> list[NodeView]:
        views = self.views()
        if on is None:
            return views
        match = [v for v in views if v.name == on or (len(on) >= 8 and v.fingerprint.startswith(on))]
        if not match:
            known = ", ".join(sorted(v.name for v in views))
            raise JobFailed(f"no node named {on!r} (known: {known})")
        return match

    async def submit(self, request: JobRequest, emit: Emit, *, job_id: str | None = None, queued: bool = False,
                     cancel: StopFlag | None = None, inputs_dir: Path | None = None) -> dict[str, Any]:
        """Run a job to its end; its result as the control socket answers it.

        ``queued``: the job is on record as queued already, and when no node can take it now for reasons that
        pass, NotNow leaves it so (the exec queue tries again later). ``cancel``: the job's cancel switch, when
        the caller made it before the job got here. ``inputs_dir``: where its --put files are staged."""
        job = Job(job_id or new_job_id(), request, cancel=cancel or StopFlag(), queued=queued, inputs_dir=inputs_dir)
        spec = request.spec
        if isinstance(spec, CpuSpec):
            return await self._cpu(job, spec, emit)
        if isinstance(spec, MemSpec):
            return await self._mem(job, spec, emit)
        return await self._exec(job, spec, emit)

    async def _cpu(self, job: Job, spec: CpuSpec, emit: Emit) -> dict[str, Any]:
        on, split = job.request.on, job.request.split
        units = workloads.units_for(spec.iterations)
        nodes = self._pick(on)
        if on is not None:
            choices = [Choice(n, max(1, autopilot.slots(n, self.debits))) for n in nodes]
        else:
            choices = autopilot.choose(nodes, spill_cpu_pct=self.spill_cpu_pct, units=units, split=split,
                                       debits=self.debits)
        total = sum(c.slots for c in choices)
        splittable = on is None and split and units >= autopilot.SPLIT_MIN_UNITS
        chunks = autopilot.cut(units, autopilot.cut_size_slots(nodes, total) if splittable else total)

        def refresh() -> list[Choice]:  # peers that became free after the job started may join it
            return autopilot.choose(self.views(), spill_cpu_pct=self.spill_cpu_pct, units=units, split=True,
                                    debits=self.debits, fallback=False)

        self._register(job)
        try:
            t0 = time.perf_counter()
            start = {"type": "start", "job_id": job.job_id, "iterations": spec.iterations, "units": units,
                     "chunks": len(chunks), "nodes": [c.node.name for c in choices]}
            outcomes = await _Schedule(self, job, choices, chunks, emit, start, allow_local_fallback=on is None,
                                       refresh=refresh if splittable else None).run()
        except BaseException as exc:
            self._failed(job, exc)
            raise
        return self._cpu_result(job, spec, units, outcomes, time.perf_counter() - t0)

    def _cpu_result(self, job: Job, spec: CpuSpec, units: int, outcomes: list[ChunkOutcome],
                    elapsed: float) -> dict[str, Any]:
        """Merge a cpu job's chunks: its digest from the unit digests in order, and what each node did."""
        digests = [d for o in sorted(outcomes, key=lambda o: o.start) if o.result for d in o.result.digests]
        if len(digests) != units:
            self._finish(job, "failed", reason=f"got {len(digests)} of {units} unit digests")
            raise JobFailed(f"job {job.job_id}: got {len(digests)} of {units} unit digests")
        parts: dict[str, dict[str, Any]] = {}
        for o in outcomes:
            assert o.result is not None
            p = parts.setdefault(o.node.name, {"node": o.node.name, "hostname": o.result.hostname, "chunks": 0,
                                               "units": 0, "iterations": 0, "busy_s": 0.0, "cpu_s": 0.0})
            p["chunks"] += 1
            p["units"] += o.count
            p["iterations"] += o.result.iterations
            p["busy_s"] += o.result.elapsed_s
            p["cpu_s"] += o.result.cpu_s
        for p in parts.values():
            p["rate"] = p["iterations"] / p["busy_s"] if p["busy_s"] else 0.0
            p["share_pct"] = 100.0 * p["iterations"] / spec.iterations
        digest = workloads.job_digest(digests)
        self._finish(job, "succeeded", result={"digest": digest, "elapsed_s": elapsed,
                                               "nodes": {p["node"]: p["iterations"] for p in parts.values()}})
        return {"job_id": job.job_id, "kind": "cpu", "iterations": spec.iterations, "units": units,
                "chunks": len(outcomes), "digest": digest, "elapsed_s": elapsed,
                "rate": spec.iterations / elapsed if elapsed else 0.0,
                "parts": sorted(parts.values(), key=lambda p: -p["iterations"]), "replaced": job.replaced,
                "chunk_list": [{"chunk": o.chunk, "node": o.node.name, "start": o.start, "count": o.count,
                                "elapsed_s": o.result.elapsed_s if o.result else 0.0}
                               for o in sorted(outcomes, key=lambda o: o.chunk)]}

    async def _mem(self, job: Job, spec: MemSpec, emit: Emit) -> dict[str, Any]:
        nodes = self._pick(job.request.on)
        fits = autopilot.fits_memory(nodes, spec.mib)
        if not fits:
            offers = ", ".join(f"{n.name} offers {n.offered_mem_mb} MiB" for n in nodes)
            raise JobFailed(f"no node can hold {spec.mib} MiB ({offers}); try less, or raise mem_offer_mb")
        self._register(job)
        t0 = time.perf_counter()
        try:
            start = {"type": "start", "job_id": job.job_id, "mib": spec.mib, "ms": spec.ms,
                     "nodes": [n.name for n in fits]}
            outcomes = await _Schedule(self, job, [Choice(n, 1) for n in fits], [(0, 1)], emit, start,
                                       allow_local_fallback=False, one_at_a_time=True).run()
        except BaseException as exc:
            self._failed(job, exc)
            raise
        o = outcomes[0]
        assert o.result is not None
        self._finish(job, "succeeded", result={"node": o.node.name})
        return {"job_id": job.job_id, "kind": "mem", "mib": spec.mib, "ms": spec.ms, "node": o.node.name,
                "hostname": o.result.hostname, "elapsed_s": time.perf_counter() - t0, "replaced": job.replaced}

    def _exec_candidates(self, job: Job) -> list[NodeView]:
        """The nodes an exec job may go to, best first; a queued job that finds none stays queued (NotNow)."""
        on = job.request.on
        try:
            nodes = self._pick(on)
            allowed = [n for n in nodes if n.exec_allowed]
            if on is None and not allowed:
                states = ", ".join(f"{n.name}: exec off" for n in nodes)
                raise JobFailed(f"no node allows exec ({states}): start a node with -allow-exec")
        except JobFailed as exc:   # a node may yet come, or allow exec after a restart
            raise NotNow(str(exc)) if job.queued else exc from None
        candidates = nodes if on is not None else [
            c.node for c in autopilot.choose(allowed, spill_cpu_pct=self.spill_cpu_pct, split=False,
                                             debits=self.debits, exec_job=True)]
        return candidates + [n for n in allowed if n not in candidates]

    async def _exec(self, job: Job, spec: ExecSpec, emit: Emit) -> dict[str, Any]:
        self._register(job)   # first: a job that cannot start is on record too
        try:
            candidates = self._exec_candidates(job)
        except BaseException as exc:
            self._failed(job, exc)
            raise
        if self.artifacts_dir is not None and self.artifact_cap > 0:
            job.sink = artifacts.Sink(self.artifacts_dir / job.job_id, cap=self.artifact_cap)
        t0 = time.perf_counter()

        async def output(stream: str, data: bytes) -> None:
            if self.records is not None:
                self.records.append_log(job.job_id, stream, data)
            await emit({"type": "output", "stream": stream, "data": data})

        try:
            start = {"type": "start", "job_id": job.job_id, "argv": list(spec.argv),
                     "nodes": [n.name for n in candidates]}
            outcomes = await _Schedule(self, job, [Choice(n, 1) for n in candidates], [(0, 1)], emit, start,
                                       allow_local_fallback=False, one_at_a_time=True,
                                       max_attempts=1 + job.request.retries, on_output=output).run()
        except BaseException as exc:
            self._store_artifacts(job)
            self._failed(job, exc)
            raise
        r, node = outcomes[0].result, outcomes[0].node.name
        assert r is not None
        stored_in = job.sink.dest if job.sink is not None else None
        files = self._store_artifacts(job, node)
        self._finish(job, "succeeded" if r.exit_code == 0 else "failed", reason=r.error, exit_code=r.exit_code,
                     result={"node": node, "signal": r.signal, "cpu_s": r.cpu_s,
                             "artifacts": sum(1 for f in files if f["state"] == STORED)})
        return {"job_id": job.job_id, "kind": "exec", "argv": list(spec.argv), "node": node,
                "hostname": r.hostname, "exit_code": r.exit_code, "signal": r.signal, "reason": r.error,
                "elapsed_s": time.perf_counter() - t0, "run_s": r.elapsed_s, "cpu_s": r.cpu_s,
                "replaced": job.replaced, "artifacts": files,
                "artifacts_dir": str(stored_in) if stored_in is not None and files else None}

    def offer_maker(self, job: Job) -> MakeOffer:
        """How this job's chunks are offered: the job's spec, whole, with the chunk's place in it."""
        spec = job.request.spec
        cap = job.sink.cap if job.sink is not None else 0
        return lambda i, start, count: (lambda rid: proto.Offer(
            rid=rid, job_id=job.job_id, spec=spec, chunk=i, start=start, count=count, submitter=self.name,
            output_cap=cap if isinstance(spec, ExecSpec) else 0))


@dataclass
class _Schedule:
    """Hands a job's chunks to its nodes, at most each node's slots at once, and re-places what fails."""

    sub: Submitter
    job: Job
    choices: list[Choice]
    chunks: list[tuple[int, int]]
    emit: Emit
    start_event: dict[str, Any] | None
    allow_local_fallback: bool
    one_at_a_time: bool = False
    max_attempts: int = 0
    on_output: OnOutput | None = None
    refresh: Callable[[], list[Choice]] | None = None
    queue: deque[tuple[int, int, int]] = field(default_factory=deque)
    free: dict[str, int] = field(default_factory=dict)          # slots left per node (fingerprint)
    order: list[NodeView] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)      # node name -> why it left the job
    running: dict[asyncio.Task[ChunkOutcome], ChunkOutcome] = field(default_factory=dict)
    done: list[ChunkOutcome] = field(default_factory=list)
    progress: int = 0
    attempts: Counter[int] = field(default_factory=Counter)
    lost: Counter[int] = field(default_factory=Counter)         # runs of each chunk that started and did not finish
    passing: set[str] = field(default_factory=set)              # nodes whose "no" may not last

    def __post_init__(self) -> None:
        self.queue.extend((i, start, count) for i, (start, count) in enumerate(self.chunks))
        self.free = {c.node.fingerprint: c.slots for c in self.choices}
        self.order = [c.node for c in self.choices]
        self.max_attempts = self.max_attempts or self.sub.max_attempts
        self.offer = self.sub.offer_maker(self.job)

    async def run(self) -> list[ChunkOutcome]:
        job = self.job
        last_emit = last_refresh = time.monotonic()
        cancel_wait = job.cancel.future()
        try:
            while self.queue or self.running:
                if job.cancel.is_set():
                    raise JobCancelled(f"job {job.job_id} cancelled")
                if self.refresh is not None and self.queue and time.monotonic() - last_refresh >= REFRESH_EVERY:
                    last_refresh = time.monotonic()
                    await self._add_free_nodes()
                self._place()
                if not self.running:
                    self._no_node()   # raises, or brings in this node as the last resort
                    continue
                if self.sub.records is not None:
                    self.sub.records.flush()   # the job and its parts are on disk before anything else runs
                if self.start_event is not None:   # after the records are on disk: it never names a job they lack
                    await self.emit(self.start_event)
                    self.start_event = None
                waiting: list[asyncio.Future[Any]] = [*self.running, cancel_wait]
                await asyncio.wait(waiting, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
                if time.monotonic() - last_emit >= 0.25:
                    last_emit = time.monotonic()
                    await self.emit({"type": "progress", "done": self.progress, "running": len(self.running),
                                     "finished": len(self.done)})
                for task in [t for t in self.running if t.done()]:
                    await self._settle(task)
        finally:
            cancel_wait.cancel()
            if self.running:
                job.cancel.set()
                await asyncio.gather(*self.running, return_exceptions=True)
                for o in self.running.values():
                    o.error = o.error or "cancelled"
                    self.sub._record_part(o, cancelled=True)
        return self.done

    async def _add_free_nodes(self) -> None:
        """Peers that became free after the job started join it."""
        assert self.refresh is not None
        for c in self.refresh():
            if c.node.fingerprint not in self.free and c.node.name not in self.failures:
                self.order.append(c.node)
                self.free[c.node.fingerprint] = c.slots
                await self.emit({"type": "joined", "node": c.node.name})

    def _place(self) -> None:
        """Start a chunk on every free slot."""
        for node in self.order:
            while self.queue and self.free.get(node.fingerprint, 0) > 0:
                self._start(node, *self.queue.popleft())
            if self.one_at_a_time and self.running:
                break

    def _start(self, node: NodeView, i: int, start: int, count: int) -> None:
        job, sub = self.job, self.sub
        self.free[node.fingerprint] -= 1
        o = ChunkOutcome(node, i, start, count)
        if not node.local:
            sub.debits.place(node.fingerprint)
        job.running_by_node[node.name] += 1
        job.first_by_node.setdefault(node.name, time.monotonic())
        self.attempts[i] += 1
        o.attempt, o.placed = self.attempts[i], time.time()
        if not job.queued:   # a queued job's tries are on record only once one is accepted
            sub._add_part(job, o)

        def progress(n: int) -> None:
            self.progress += n
            job.done_by_node[node.name] += n

        chunk = ChunkRun(job, o, self.offer(i, start, count), progress, self.on_output,
                         lambda: sub._mark_running(job, o))
        work = chunk.here(sub.run_local) if node.local else chunk.there(sub.pool, sub.table, sub.on_borrowed)
        self.running[asyncio.ensure_future(work)] = o

    def _no_node(self) -> None:
        """Nothing runs and nothing could be placed: this node as the last resort, else the job fails (or,
        queued, waits)."""
        local = next((v for v in self.sub.views() if v.local), None)
        if (self.allow_local_fallback and local is not None and local.fingerprint not in self.free
                and local.fingerprint not in {n.fingerprint for n in self.order}):
            self.order.append(local)
            self.free[local.fingerprint] = 1
            return
        why = "; ".join(f"{name}: {reason}" for name, reason in self.failures.items()) or "no node available"
        if self.job.queued and (self.passing or not self.failures):
            raise NotNow(f"waiting: {why}")
        raise JobFailed(f"no node could run job {self.job.job_id} ({why})")

    async def _settle(self, task: asyncio.Task[ChunkOutcome]) -> None:
        """A chunk ended: keep its result, or put it back for another node."""
        job, sub = self.job, self.sub
        o = task.result()
        del self.running[task]
        job.running_by_node[o.node.name] -= 1
        # The job's last part ends in the same commit as the job (_finish follows, nothing awaited).
        sub._record_part(o, defer=o.ok and not self.queue and not self.running)
        fp = o.node.fingerprint
        if o.ok:
            self.done.append(o)
            self.free[fp] = self.free.get(fp, 0) + 1
            return
        if not o.node.local:
            sub.debits.release(fp)
        why = self.failures[o.node.name] = o.refused and f"refused ({o.refused}: {o.error})" or o.error
        if o.refused in PASSING or not (o.started or o.refused):
            self.passing.add(o.node.name)
        if o.started:   # a run that began counts as an attempt; a refusal does not
            self.lost[o.chunk] += 1
            if self.lost[o.chunk] >= self.max_attempts:
                ended = JobCancelled if job.cancel.is_set() else JobFailed   # its run was stopped by the cancel
                if job.kind == "exec" and self.max_attempts == 1:   # it may have had effects: not twice
                    raise ended(f"job {job.job_id} on {o.node.name}: {o.error} (not re-run: it may "
                                    "have had effects; vesta exec --retries N allows re-runs)")
                raise ended(f"job {job.job_id}: chunk {o.chunk} failed {self.lost[o.chunk]} times "
                                f"(max_attempts {self.max_attempts}); last on {o.node.name}: {o.error}")
        self.free[fp] = -len(self.chunks)          # this node is out of this job
        self.queue.appendleft((o.chunk, o.start, o.count))
        sub.counters["chunks_replaced"] += 1
        moved = {"node": o.node.name, "chunk": o.chunk, "why": why}
        job.replaced.append(moved)
        await self.emit({"type": "replaced", **moved})
        sub.on_event("moved", f"{job.job_id} chunk {o.chunk} moved off {o.node.name}: {why}")
        log.info("job %s chunk %d re-placed: %s %s", job.job_id, o.chunk, o.node.name, why)
