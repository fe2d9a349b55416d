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
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vesta import artifacts, autopilot, outcome, proto, workloads
from vesta.autopilot import NodeView
from vesta.chunks import ChunkOutcome, ChunkRun, Job, OnBorrowed, RunLocal, RunNow, new_job_id
from vesta.errors import JobCancelled, JobFailed, NotNow, VestaError
from vesta.hostexec import OnOutput
from vesta.link import LinkPool
from vesta.peertable import PeerTable
from vesta.placement import JobPlan, Placer, Start, Want
from vesta.records import PartEnd, Records
from vesta.spec import STORED, CpuSpec, ExecSpec, JobRequest, MemSpec
from vesta.tasks import StopFlag

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], Awaitable[None]]
MakeOffer = Callable[[int, int, int], Callable[[int], proto.Offer]]   # (chunk, start, count) -> (rid -> Offer)
VIEWS_FRESH_S = 0.05   # a job takes the views as they are when they are this recent (beacons refresh them)
PROGRESS_EVERY = 0.25  # seconds between a running job's progress events
WAIT_POLL_S = 5.0      # a job waiting for a slot is placed by the event that frees one; it looks anyway this often

__all__ = ["Emit", "Job", "Submitter", "new_job_id"]


class Submitter:
    """Runs jobs submitted on this node."""

    def __init__(self, *, name: str, fingerprint: str, pool: LinkPool, table: PeerTable,
                 views: Callable[[], list[NodeView]], spill_cpu_pct: float, counters: Counter[str],
                 run_local: RunLocal, run_now: RunNow | None = None,
                 on_borrowed: OnBorrowed = lambda fp, name, offer, result: None,
                 on_event: Callable[[str, str], None] = lambda kind, text: None,
                 on_chunk: Callable[[float], None] = lambda seconds: None,
                 records: Records | None = None, artifacts_dir: Path | None = None, artifact_cap: int = 0,
                 max_attempts: int = 3) -> None:
        self.artifacts_dir = artifacts_dir   # where each exec job's $VESTA_OUTPUT files are stored (JOB/...)
        self.artifact_cap = artifact_cap     # bytes of them per job
        self.max_attempts = max_attempts     # runs of a cpu/mem chunk lost to failures before its job fails
        self.on_borrowed = on_borrowed
        self.on_event = on_event
        self.on_chunk = on_chunk             # (seconds from a chunk's offer to its end): the metrics histogram
        self.records = records
        self.name = name
        self.fingerprint = fingerprint
        self.pool = pool
        self.table = table
        self.views = views
        self.spill_cpu_pct = spill_cpu_pct
        self.counters = counters
        self.run_local = run_local
        self.run_now = run_now   # a chunk done on the spot (a tiny cpu chunk), else None: through run_local
        self.placer = Placer(spill_cpu_pct=spill_cpu_pct)   # every node's slots and our chunks in flight
        self.on_free: Callable[[], None] = lambda: None   # capacity may have appeared (the exec queue listens)
        self._waiting: dict[int, tuple[JobPlan, asyncio.Future[list[Start]]]] = {}   # jobs waiting for slots, FIFO
        self._refreshed = -1e9
        self.plans: dict[str, JobPlan] = {}
        self.jobs: dict[str, Job] = {}

    # ------------------------------------------------------------ capacity events

    def refresh(self, *, now: bool = True) -> None:
        """Take in the latest views (a beacon came, a node left); wakes whoever waits if a slot appeared.
        ``now=False``: not if they were taken in the last ``VIEWS_FRESH_S`` (every beacon brings them in)."""
        t = time.monotonic()
        if not now and t - self._refreshed < VIEWS_FRESH_S:
            return
        self._refreshed = t
        if self.placer.update(self.views()):
            self.freed()

    def freed(self) -> None:
        """A slot may be free now (a chunk ended anywhere, a beacon shows spare): place the waiting jobs, and
        tell the exec queue."""
        self.place_waiting()
        self.on_free()

    def place_waiting(self) -> None:
        """The jobs waiting for a slot are placed, oldest first, until the free slots are gone (each gets its
        starts; none is woken for nothing). Usually the first waiter takes the slot: one plan, not one per
        waiting job."""
        placer = self.placer
        served = []
        for key, (plan, waiter) in self._waiting.items():
            if not any(placer.free(fp) > 0 for fp in placer.views):
                break
            starts = [] if waiter.done() else plan.next()
            if starts or waiter.done():
                served.append(key)
            if starts:
                waiter.set_result(starts)   # its callbacks run later: the dict is not changed under this loop
        for key in served:
            del self._waiting[key]

    def free_exec_slots(self, on: str | None) -> int:
        """Free slots on the nodes that may take an exec job now (the exec queue offers that many)."""
        self.refresh()
        want = Want("exec", on)
        return sum(self.placer.free(fp) for fp, v in self.placer.views.items() if not self.placer.why_not(v, want))

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

    def _record_part(self, job: Job, o: ChunkOutcome, cancelled: bool = False, defer: bool = False) -> None:
        """One attempt at one chunk, as it ended (one that ran on the spot goes on record only now)."""
        if self.records is None or (o.part_id is None and not o.spot):
            return
        r = o.result
        state = outcome.attempt_state(ok=o.ok, refused=bool(o.refused), cancelled=cancelled, has_result=r is not None,
                                      error=o.error or (r.error if r else ""))
        end = PartEnd(state, time.time(), cpu_s=r.cpu_s if r else 0.0, exit_code=r.exit_code if r else None,
                      reason=(o.refused or o.error)[:500],
                      result={"hostname": r.hostname, "iterations": r.iterations} if r else None)
        try:
            if o.part_id is None:
                self.records.add_part(job.job_id, chunk=o.chunk, attempt=o.attempt, node=o.node.name,
                                      node_fp=o.node.fingerprint, started=o.placed, end=end, defer=defer)
            else:
                self.records.finish_part(o.part_id, state=end.state, finished=end.finished, cpu_s=end.cpu_s,
                                         exit_code=end.exit_code, reason=end.reason, result=end.result, defer=defer)
        except VestaError as exc:
            log.warning("could not record part %s of job %s: %s", o.part_id or "", job.job_id, exc)
        o.part_id, o.spot = None, False

    def _placement(self, job: Job) -> list[dict[str, Any]] | None:
        """The job's placement decision, to put on record with its end (or its wait)."""
        plan = self.plans.pop(job.job_id, None)
        return None if plan is None else [r.to_json() for r in plan.decision()]

    def _finish(self, job: Job, state: str, *, reason: str = "", exit_code: int | None = None,
                result: dict[str, Any] | None = None) -> None:
        """Record how a job ended (once), with its placement decision, and forget it."""
        self.jobs.pop(job.job_id, None)
        placement = self._placement(job)
        if self.records is not None:
            try:
                self.records.transition(job.job_id, state, reason=reason[:500], exit_code=exit_code, result=result,
                                        placement=placement)
            except VestaError as exc:
                log.warning("could not record the end of job %s: %s", job.job_id, exc)

    def _failed(self, job: Job, exc: BaseException) -> None:
        if job.job_id not in self.jobs:
            return
        if job.queued and isinstance(exc, (NotNow, asyncio.CancelledError)):   # never started: still queued
            self.jobs.pop(job.job_id, None)
            placement = self._placement(job)
            if self.records is not None and isinstance(exc, NotNow):
                self.records.wait_reason(job.job_id, str(exc)[:500], placement)
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
        self.refresh(now=False)
        views = list(self.placer.views.values())
        if on is None:
            return views
        match = [v for v in views if v.name == on or (len(on) >= 8 and v.fingerprint.startswith(on))]
        if not match:
            known = ", ".join(sorted(v.name for v in views))
            raise JobFailed(f"no node named {on!r} (known: {known})")
        return match

    def check_on(self, on: str | None) -> None:
        """Refuse at once a ``--on`` name no node has ever had (a node seen before may come back)."""
        self.refresh()
        if on is not None and not self.placer.known(on):
            known = ", ".join(sorted(v.name for v in self.placer.views.values()))
            raise JobFailed(f"no node named {on!r} (known: {known})")

    def _plan(self, job: Job, plan: JobPlan) -> JobPlan:
        self.plans[job.job_id] = plan
        return plan

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
        """A cpu job waits for slots: it never runs more chunks at once than the nodes have slots."""
        on, split = job.request.on, job.request.split
        units = workloads.units_for(spec.iterations)
        nodes = self._pick(on)
        want = Want("cpu", on, need=job.request.need)
        if on is None and split and units >= autopilot.SPLIT_MIN_UNITS:
            free = sum(self.placer.free(v.fingerprint) for v in nodes)
            plan = JobPlan(self.placer, want, autopilot.cut(units, autopilot.cut_size_slots(nodes, free)),
                           max_attempts=self.max_attempts)
        else:   # on the single best node, one chunk per slot it has free when placed
            plan = JobPlan(self.placer, want, [(0, units)], pinned=True, max_attempts=self.max_attempts,
                           cut=lambda slots: autopilot.cut(units, max(1, slots)))
        self._register(job)
        try:
            t0 = time.perf_counter()
            start = {"type": "start", "job_id": job.job_id, "iterations": spec.iterations, "units": units}
            outcomes = await _Schedule(self, job, self._plan(job, plan), emit, start).run()
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
        if not autopilot.fits_memory(nodes, spec.mib):
            offers = ", ".join(f"{n.name} offers {n.offered_mem_mb} MiB" for n in nodes)
            raise JobFailed(f"no node can hold {spec.mib} MiB ({offers}); try less, or raise mem_offer_mb")
        want = Want("mem", job.request.on, mem_mib=spec.mib, need=job.request.need)
        plan = JobPlan(self.placer, want, [(0, 1)], patient=False, one_at_a_time=True,
                       max_attempts=self.max_attempts)
        self._register(job)
        t0 = time.perf_counter()
        try:
            start = {"type": "start", "job_id": job.job_id, "mib": spec.mib, "ms": spec.ms}
            outcomes = await _Schedule(self, job, self._plan(job, plan), emit, start).run()
        except BaseException as exc:
            self._failed(job, exc)
            raise
        o = outcomes[0]
        assert o.result is not None
        self._finish(job, "succeeded", result={"node": o.node.name})
        return {"job_id": job.job_id, "kind": "mem", "mib": spec.mib, "ms": spec.ms, "node": o.node.name,
                "hostname": o.result.hostname, "elapsed_s": time.perf_counter() - t0, "replaced": job.replaced}

    def _exec_check(self, job: Job) -> None:
        """Some node may take an exec job; a queued job that finds none stays queued (NotNow)."""
        on = job.request.on
        try:
            nodes = self._pick(on)
            if on is None and not any(n.exec_allowed for n in nodes):
                states = ", ".join(f"{n.name}: exec off" for n in nodes)
                raise JobFailed(f"no node allows exec ({states}): start a node with -allow-exec")
        except JobFailed as exc:   # a node may yet come, or allow exec after a restart
            raise NotNow(str(exc)) if job.queued else exc from None

    async def _exec(self, job: Job, spec: ExecSpec, emit: Emit) -> dict[str, Any]:
        self._register(job)   # first: a job that cannot start is on record too
        try:
            self._exec_check(job)
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

        # A queued job waits for a free slot (in the queue); any other is offered to the nodes in turn.
        want = Want("exec", job.request.on, need=job.request.need)
        plan = JobPlan(self.placer, want, [(0, 1)], patient=job.queued, one_at_a_time=True,
                       max_attempts=1 + job.request.retries)
        try:
            start = {"type": "start", "job_id": job.job_id, "argv": list(spec.argv)}
            outcomes = await _Schedule(self, job, self._plan(job, plan), emit, start, on_output=output).run()
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
    """Drives one job's ``JobPlan``: starts the chunks it says where it says, feeds it how each ended,
    and waits for a slot when it has none (a chunk ending anywhere, a beacon that shows spare)."""

    sub: Submitter
    job: Job
    plan: JobPlan
    emit: Emit
    start_event: dict[str, Any] | None
    on_output: OnOutput | None = None
    running: dict[asyncio.Future[ChunkOutcome], tuple[int, ChunkOutcome]] = field(default_factory=dict)
    done: list[ChunkOutcome] = field(default_factory=list)
    progress: int = 0

    def __post_init__(self) -> None:
        self.offer = self.sub.offer_maker(self.job)

    async def run(self) -> list[ChunkOutcome]:
        job, plan = self.job, self.plan
        last_emit = time.monotonic()
        cancel_wait: asyncio.Future[None] | None = None   # made when the job first has to wait
        try:
            while not plan.complete():
                if job.cancel.is_set():
                    raise JobCancelled(f"job {job.job_id} cancelled")
                for s in plan.next():
                    self._start(s)
                spot = [t for t in self.running if t.done()]   # chunks done on the spot (tiny cpu work)
                for task in spot:
                    await self._settle(task)
                if spot:
                    continue   # place what they left, or the job is complete
                if not self.running:
                    self._stuck()   # raises, unless the job may wait for a slot
                else:
                    if self.sub.records is not None:
                        self.sub.records.flush()   # the job and its parts are on disk before anything else runs
                    if self.start_event is not None:   # after the records are on disk: never names a job they lack
                        await self.emit(self.start_event | {"nodes": [v.name for v in plan.chosen.values()]})
                        self.start_event = None
                if cancel_wait is None:
                    cancel_wait = job.cancel.future()
                await self._wait(cancel_wait)
                if self.running and time.monotonic() - last_emit >= 0.25:
                    last_emit = time.monotonic()
                    await self.emit({"type": "progress", "done": self.progress, "running": len(self.running),
                                     "finished": len(self.done)})
                for task in [t for t in self.running if t.done()]:
                    await self._settle(task)
            if self.start_event is not None:   # a job done on the spot: its start, then (the caller) its end
                await self.emit(self.start_event | {"nodes": [v.name for v in plan.chosen.values()]})
                self.start_event = None
        finally:
            if cancel_wait is not None:
                cancel_wait.cancel()
            if self.running:
                job.cancel.set()
                await asyncio.gather(*self.running, return_exceptions=True)
                for token, o in self.running.values():
                    o.error = o.error or "cancelled"
                    self.sub._record_part(job, o, cancelled=True)
                    plan.ended(token, ok=False, error=o.error)
                self.sub.freed()
        return self.done

    async def _wait(self, cancel_wait: asyncio.Future[None]) -> None:
        """Until a chunk ends, the job is cancelled, or (with chunks still to place) a slot is found for it
        (``Submitter.freed``), or a while has passed (``WAIT_POLL_S``: the views are looked at again)."""
        waiting: list[asyncio.Future[Any]] = [*self.running, cancel_wait]
        slot: asyncio.Future[list[Start]] | None = None
        if self.plan.queue:
            slot = asyncio.get_running_loop().create_future()
            self.sub._waiting[id(self)] = (self.plan, slot)
            waiting.append(slot)
        try:
            await asyncio.wait(waiting, timeout=PROGRESS_EVERY if self.running else WAIT_POLL_S,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            if slot is not None:
                self.sub._waiting.pop(id(self), None)
                for s in slot.result() if slot.done() else ():   # its slots are held: start them, even now
                    self._start(s)
        if not self.running:
            self.sub.refresh(now=False)

    def _stuck(self) -> None:
        """Nothing runs and nothing could start: fail, or (queued) stay queued, unless a node of the job
        may yet free a slot."""
        plan = self.plan
        names = {fp: v.name for fp, v in plan.chosen.items()}
        why = "; ".join(f"{names.get(fp, fp[:8])}: {reason}" for fp, reason in plan.left.items())
        if plan.stuck() == "fail":
            if self.job.queued and (plan.passing or not plan.left):
                raise NotNow(f"waiting: {why or self._why_not()}")
            raise JobFailed(f"no node could run job {self.job.job_id} ({why or self._why_not()})")
        if self.job.queued:
            raise NotNow(f"waiting: {self._why_not()}")

    def _why_not(self) -> str:
        return "; ".join(f"{r.node}: {r.why}" for r in self.plan.rows() if not r.chosen) or "no node available"

    def _start(self, s: Start) -> None:
        job, sub, node = self.job, self.sub, s.node
        start, count = self.plan.chunks[s.chunk]
        o = ChunkOutcome(node, s.chunk, start, count)
        job.running_by_node[node.name] += 1
        job.first_by_node.setdefault(node.name, time.monotonic())
        o.attempt, o.placed = s.attempt, time.time()

        def progress(n: int) -> None:
            self.progress += n
            job.done_by_node[node.name] += n

        chunk = ChunkRun(job, o, self.offer(s.chunk, start, count), progress, self.on_output,
                         lambda: sub._mark_running(job, o))
        ended = chunk.now(sub.run_now) if node.local and sub.run_now is not None else None
        if ended is not None:   # nothing ran anywhere before it was over: its part goes on record with its end
            done: asyncio.Future[ChunkOutcome] = asyncio.get_running_loop().create_future()
            done.set_result(ended)
            self.running[done] = (s.token, o)
            return
        if not job.queued:   # a queued job's tries are on record only once one is accepted
            sub._add_part(job, o)
        work = chunk.here(sub.run_local) if node.local else chunk.there(sub.pool, sub.table, sub.on_borrowed)
        self.running[asyncio.ensure_future(work)] = (s.token, o)

    async def _settle(self, task: asyncio.Future[ChunkOutcome]) -> None:
        """A chunk ended: keep its result, or put it back for another node."""
        job, sub = self.job, self.sub
        o = task.result()
        token, _ = self.running.pop(task)
        sub.on_chunk(time.time() - o.placed)
        job.running_by_node[o.node.name] -= 1
        # The job's last part ends in the same commit as the job (_finish follows, nothing awaited).
        sub._record_part(job, o, defer=o.ok and not self.plan.queue and not self.running)
        verdict = self.plan.ended(token, ok=o.ok, refused=o.refused, error=o.error, started=o.started)
        sub.freed()   # its slot is free: a job waiting for one may take it
        if verdict == "done":
            self.done.append(o)
            return
        if verdict == "failed":
            lost, limit = self.plan.lost[o.chunk], self.plan.max_attempts
            ended = JobCancelled if job.cancel.is_set() else JobFailed   # its run was stopped by the cancel
            if job.kind == "exec" and limit == 1:   # it may have had effects: not twice
                raise ended(f"job {job.job_id} on {o.node.name}: {o.error} (not re-run: it may "
                            "have had effects; vesta exec --retries N allows re-runs)")
            raise ended(f"job {job.job_id}: chunk {o.chunk} failed {lost} times "
                        f"(max_attempts {limit}); last on {o.node.name}: {o.error}")
        why = self.plan.left[o.node.fingerprint]
        sub.counters["chunks_replaced"] += 1
        moved = {"node": o.node.name, "chunk": o.chunk, "why": why}
        job.replaced.append(moved)
        await self.emit({"type": "replaced", **moved})
        sub.on_event("moved", f"{job.job_id} chunk {o.chunk} moved off {o.node.name}: {why}")
        log.info("job %s chunk %d re-placed: %s %s", job.job_id, o.chunk, o.node.name, why)
