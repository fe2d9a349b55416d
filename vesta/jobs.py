"""Jobs this node submits: place chunks, re-place them, merge the results (the host's side is ``host``).

Submitter: a job is cut into chunks (see ``autopilot``); each chosen node
holds at most its slots of chunks at once and gets the next chunk when one
finishes. A chunk that is refused, or whose node dies or drops the link, goes
back to the queue and that node leaves this job; the job fails only when no
node is left, with the reason of each. The submitting node is the last
resort for its own cpu and mem work.

"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vesta import artifacts, autopilot, executor, outcome, proto
from vesta.autopilot import Choice, NodeView
from vesta.errors import PeerUnavailable, Refused, VestaError
from vesta.host import ExecFiles, LocalRun, OnOutput
from vesta.link import LinkPool, Stream
from vesta.peertable import PeerTable
from vesta.records import Records
from vesta.tasks import StopFlag

log = logging.getLogger(__name__)

ACCEPT_TIMEOUT = 10.0    # an offer must be answered within this
SILENCE_TIMEOUT = 15.0   # a running chunk whose host says nothing this long is lost
REFRESH_EVERY = 0.5      # seconds between looks for peers that became free during a split job
CANCEL_WAIT = 3.0        # after Cancel, how long to wait for the host's last Result
CANCEL_SEND_S = 1.0      # a Cancel to a node this side gave up on: at most this long to send it

Emit = Callable[[dict[str, Any]], Awaitable[None]]
RunLocal = Callable[[proto.Offer, LocalRun], Awaitable[proto.Result]]
# Refusals that may not last: a queued job waits them out instead of failing.
PASSING = frozenset({"capacity", "hours", "ledger", "busy"})


class JobFailed(VestaError):
    """No node could run the job; the message says why for each node."""


class NotNow(JobFailed):
    """No node can take a queued job right now, for reasons that pass (busy, outside its hours, not
    around, exec off): it stays queued. The message says why for each node."""


def new_job_id() -> str:
    return "j" + secrets.token_hex(5)


@dataclass
class ChunkOutcome:
    node: NodeView
    chunk: int
    start: int
    count: int
    ok: bool = False
    result: proto.Result | None = None
    refused: str = ""        # refuse reason word
    error: str = ""          # why it did not complete
    started: bool = False    # the node accepted it (it may have run, at least in part)
    part_id: int | None = None  # its row in the records
    attempt: int = 0         # which attempt at this chunk
    placed: float = 0.0      # when it was offered (wall clock)


@dataclass
class Job:
    job_id: str
    kind: str
    cancel: StopFlag = field(default_factory=lambda: StopFlag())
    replaced: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    running_by_node: Counter[str] = field(default_factory=Counter)    # chunks running now, per node name
    done_by_node: Counter[str] = field(default_factory=Counter)       # iterations done so far, per node name
    first_by_node: dict[str, float] = field(default_factory=dict)     # monotonic time of its first chunk
    queued: bool = False                  # on record as queued until a node accepts it
    inputs: tuple[artifacts.FileInfo, ...] = ()   # exec: files shipped with it (--put) ...
    inputs_dir: Path | None = None                # ... staged here on the submitting node
    sink: artifacts.Sink | None = None            # exec: where its $VESTA_OUTPUT files are stored

    def flows(self, me: str) -> list[dict[str, Any]]:
        """This job's live flows: which node works for us, how many chunks, how fast."""
        now = time.monotonic()
        out = []
        for node, chunks in self.running_by_node.items():
            if chunks <= 0:
                continue
            spent = max(now - self.first_by_node.get(node, now), 1e-3)
            out.append({"from": node, "to": me, "job_id": self.job_id, "kind": self.kind, "chunks": chunks,
                        "done": self.done_by_node[node], "rate": self.done_by_node[node] / spent})
        return out


class Submitter:
    """Runs jobs submitted on this node."""

    def __init__(self, *, name: str, fingerprint: str, pool: LinkPool, table: PeerTable,
                 views: Callable[[], list[NodeView]], spill_cpu_pct: float, counters: Counter[str],
                 run_local: RunLocal, on_borrowed: Callable[[str, str, proto.Offer, proto.Result], None]
                 = lambda fp, name, offer, result: None,
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

    def _register(self, job: Job, args: dict[str, Any]) -> None:
        """Put the job on record: committed with its first part, before any chunk is offered (``_schedule``),
        or with its end if it fails first. Nothing may be awaited from here to there."""
        self.jobs[job.job_id] = job
        if self.records is not None and not job.queued:   # a queued job is on record already
            self.records.create_job(job.job_id, job.kind, args, self.name, self.fingerprint, defer=True)

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
        cancelled = job.cancel.is_set() and "cancelled" in str(exc)
        reason = (str(exc) if isinstance(exc, VestaError)
                  else "daemon stopped" if isinstance(exc, asyncio.CancelledError)
                  else f"internal error: {type(exc).__name__}")
        self._finish(job, "cancelled" if cancelled else "failed", reason=reason)

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

    async def run_cpu(self, iterations: int, *, on: str | None, split: bool, emit: Emit) -> dict[str, Any]:
        units = executor.units_for(iterations)
        nodes = self._pick(on)
        if on is not None:
            choices = [Choice(n, max(1, autopilot.slots(n, self.debits))) for n in nodes]
        else:
            choices = autopilot.choose(nodes, spill_cpu_pct=self.spill_cpu_pct, units=units, split=split,
                                       debits=self.debits)
        total = sum(c.slots for c in choices)
        splittable = on is None and split and units >= autopilot.SPLIT_MIN_UNITS
        chunks = autopilot.cut(units, autopilot.cut_size_slots(nodes, total) if splittable else total)
        job = Job(new_job_id(), "cpu")
        t0 = time.perf_counter()

        def offer(i: int, start: int, count: int) -> Callable[[int], proto.Offer]:
            return lambda rid: proto.Offer(rid=rid, job_id=job.job_id, kind="cpu", chunk=i, iterations=iterations,
                                           start=start, count=count, submitter=self.name)

        def refresh() -> list[Choice]:  # peers that became free after the job started may join it
            return autopilot.choose(self.views(), spill_cpu_pct=self.spill_cpu_pct, units=units, split=True,
                                    debits=self.debits, fallback=False)
        self._register(job, {"iterations": iterations, "on": on, "split": split})
        try:
            start = {"type": "start", "job_id": job.job_id, "iterations": iterations, "units": units,
                     "chunks": len(chunks), "nodes": [c.node.name for c in choices]}
            outcomes = await self._schedule(job, choices, chunks, offer, emit, start, allow_local_fallback=on is None,
                                            refresh=refresh if splittable else None)
        except BaseException as exc:
            self._failed(job, exc)
            raise
        elapsed = time.perf_counter() - t0
        digests: list[bytes] = []
        for o in sorted(outcomes, key=lambda o: o.start):
            assert o.result is not None
            digests.extend(o.result.digests)
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
            p["share_pct"] = 100.0 * p["iterations"] / iterations
        digest = executor.job_digest(digests)
        summary = {"digest": digest, "elapsed_s": elapsed,
                   "nodes": {p["node"]: p["iterations"] for p in parts.values()}}
        self._finish(job, "succeeded", result=summary)
        return {"job_id": job.job_id, "kind": "cpu", "iterations": iterations, "units": units,
                "chunks": len(outcomes), "digest": digest, "elapsed_s": elapsed,
                "rate": iterations / elapsed if elapsed else 0.0,
                "parts": sorted(parts.values(), key=lambda p: -p["iterations"]), "replaced": job.replaced,
                "chunk_list": [{"chunk": o.chunk, "node": o.node.name, "start": o.start, "count": o.count,
                                "elapsed_s": o.result.elapsed_s if o.result else 0.0}
                               for o in sorted(outcomes, key=lambda o: o.chunk)]}

    async def run_mem(self, mib: int, ms: int, *, on: str | None, emit: Emit) -> dict[str, Any]:
        nodes = self._pick(on)
        fits = autopilot.fits_memory(nodes, mib)
        if not fits:
            offers = ", ".join(f"{n.name} offers {n.offered_mem_mb} MiB" for n in nodes)
            raise JobFailed(f"no node can hold {mib} MiB ({offers}); try less, or raise mem_offer_mb")
        job = Job(new_job_id(), "mem")
        self._register(job, {"mib": mib, "ms": ms, "on": on})
        choices = [Choice(n, 1) for n in fits]
        t0 = time.perf_counter()
        try:
            outcomes = await self._schedule(
                job, choices[:1] + choices[1:], [(0, 1)],
                lambda i, s, c: (lambda rid: proto.Offer(rid=rid, job_id=job.job_id, kind="mem", mib=mib, ms=ms,
                                                          submitter=self.name)),
                emit, {"type": "start", "job_id": job.job_id, "mib": mib, "ms": ms, "nodes": [n.name for n in fits]},
                allow_local_fallback=False, one_at_a_time=True)
        except BaseException as exc:
            self._failed(job, exc)
            raise
        o = outcomes[0]
        assert o.result is not None
        self._finish(job, "succeeded", result={"node": o.node.name})
        return {"job_id": job.job_id, "kind": "mem", "mib": mib, "ms": ms, "node": o.node.name,
                "hostname": o.result.hostname, "elapsed_s": time.perf_counter() - t0, "replaced": job.replaced}

    async def run_exec(self, argv: list[str], *, on: str | None, timeout: float, emit: Emit,
                       job_id: str | None = None, mem_mib: int = 0, inputs: tuple[artifacts.FileInfo, ...] = (),
                       inputs_dir: Path | None = None, retries: int = 0, queued: bool = False,
                       cancel: StopFlag | None = None) -> dict[str, Any]:
        """Run a command on one node. ``queued``: the job is on record as queued, and when no node can
        take it now for reasons that pass, NotNow leaves it so (the daemon tries again later). ``cancel``:
        the job's cancel switch, when the caller made it before the job got here (the exec queue)."""
        job = Job(job_id or new_job_id(), "exec", cancel=cancel or StopFlag(), queued=queued, inputs=inputs,
                  inputs_dir=inputs_dir)
        self._register(job, {"argv": argv, "on": on, "timeout": timeout, "mem_mib": mem_mib, "retries": retries,
                             "inputs": [[i.path, i.size, i.sha256, i.executable] for i in inputs]})  # first
        try:
            try:
                nodes = self._pick(on)
                allowed = [n for n in nodes if n.exec_allowed]
                if on is None and not allowed:
                    states = ", ".join(f"{n.name}: exec off" for n in nodes)
                    raise JobFailed(f"no node allows exec ({states}): start a node with -allow-exec")
            except JobFailed as exc:   # a node may yet come, or allow exec after a restart
                raise NotNow(str(exc)) if queued else exc from None
        except BaseException as exc:
            self._failed(job, exc)
            raise
        candidates = nodes if on is not None else [
            c.node for c in autopilot.choose(allowed, spill_cpu_pct=self.spill_cpu_pct, split=False,
                                             debits=self.debits, exec_job=True)]
        candidates += [n for n in allowed if n not in candidates]
        if self.artifacts_dir is not None and self.artifact_cap > 0:
            job.sink = artifacts.Sink(self.artifacts_dir / job.job_id, cap=self.artifact_cap)
        manifest = tuple((i.path, i.size, i.sha256, i.executable) for i in inputs)
        t0 = time.perf_counter()

        async def output(stream: str, data: bytes) -> None:
            if self.records is not None:
                self.records.append_log(job.job_id, stream, data)
            await emit({"type": "output", "stream": stream, "data": data})

        try:
            outcomes = await self._schedule(
                job, [Choice(n, 1) for n in candidates], [(0, 1)],
                lambda i, s, c: (lambda rid: proto.Offer(rid=rid, job_id=job.job_id, kind="exec", argv=tuple(argv),
                                                          timeout_s=timeout, mem_mib=mem_mib, submitter=self.name,
                                                          inputs=manifest,
                                                          output_cap=job.sink.cap if job.sink else 0)),
                emit, {"type": "start", "job_id": job.job_id, "argv": argv, "nodes": [n.name for n in candidates]},
                allow_local_fallback=False, one_at_a_time=True, max_attempts=1 + retries, on_output=output)
        except BaseException as exc:
            self._store_artifacts(job)
            self._failed(job, exc)
            raise
        r = outcomes[0].result
        assert r is not None
        stored_in = job.sink.dest if job.sink is not None else None
        files = self._store_artifacts(job, outcomes[0].node.name)
        self._finish(job, "succeeded" if r.exit_code == 0 else "failed", reason=r.error, exit_code=r.exit_code,
                     result={"node": outcomes[0].node.name, "signal": r.signal, "cpu_s": r.cpu_s,
                             "artifacts": sum(1 for f in files if f["state"] == artifacts.STORED)})
        return {"job_id": job.job_id, "kind": "exec", "argv": argv, "node": outcomes[0].node.name,
                "hostname": r.hostname, "exit_code": r.exit_code, "signal": r.signal, "reason": r.error,
                "elapsed_s": time.perf_counter() - t0, "run_s": r.elapsed_s, "cpu_s": r.cpu_s,
                "replaced": job.replaced, "artifacts": files,
                "artifacts_dir": str(stored_in) if stored_in is not None and files else None}

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

    async def _schedule(self, job: Job, choices: list[Choice], chunks: list[tuple[int, int]],
                        offer: Callable[[int, int, int], Callable[[int], proto.Offer]], emit: Emit,
                        start_event: dict[str, Any] | None, *, allow_local_fallback: bool,
                        one_at_a_time: bool = False, max_attempts: int | None = None,
                        on_output: OnOutput | None = None,
                        refresh: Callable[[], list[Choice]] | None = None) -> list[ChunkOutcome]:
        queue = deque((i, start, count) for i, (start, count) in enumerate(chunks))
        free = {c.node.fingerprint: c.slots for c in choices}
        order = [c.node for c in choices]
        failures: dict[str, str] = {}
        running: dict[asyncio.Task[ChunkOutcome], ChunkOutcome] = {}
        done: list[ChunkOutcome] = []
        progress = [0]
        last_emit = last_refresh = time.monotonic()
        cancel_wait = job.cancel.future()
        attempts: dict[int, int] = {}
        lost: Counter[int] = Counter()     # runs of each chunk that started and did not finish
        passing: set[str] = set()          # nodes whose "no" may not last (busy, closed hours, unreachable)
        max_attempts = max_attempts or self.max_attempts

        def add_progress(n: int) -> None:
            progress[0] += n

        try:
            while queue or running:
                if job.cancel.is_set():
                    raise JobFailed(f"job {job.job_id} cancelled")
                if refresh is not None and queue and time.monotonic() - last_refresh >= REFRESH_EVERY:
                    last_refresh = time.monotonic()
                    for c in refresh():
                        if c.node.fingerprint not in free and c.node.name not in failures:
                            order.append(c.node)
                            free[c.node.fingerprint] = c.slots
                            await emit({"type": "joined", "node": c.node.name})
                for node in order:
                    while queue and free.get(node.fingerprint, 0) > 0:
                        i, start, count = queue.popleft()
                        free[node.fingerprint] -= 1
                        o = ChunkOutcome(node, i, start, count)
                        if not node.local:
                            self.debits.place(node.fingerprint)
                        job.running_by_node[node.name] += 1
                        job.first_by_node.setdefault(node.name, time.monotonic())
                        attempts[i] = attempts.get(i, 0) + 1
                        o.attempt, o.placed = attempts[i], time.time()
                        if not job.queued:   # a queued job's tries are on record only once one is accepted
                            self._add_part(job, o)

                        def node_progress(n: int, name: str = node.name) -> None:
                            add_progress(n)
                            job.done_by_node[name] += n

                        task = asyncio.ensure_future(self._run_chunk(job, o, offer(i, start, count), node_progress,
                                                                     on_output))
                        running[task] = o
                    if one_at_a_time and running:
                        break
                if not running:
                    local = next((v for v in self.views() if v.local), None)
                    if (allow_local_fallback and local is not None and local.fingerprint not in free
                            and local.fingerprint not in {n.fingerprint for n in order}):
                        order.append(local)
                        free[local.fingerprint] = 1
                        continue
                    why = "; ".join(f"{name}: {reason}" for name, reason in failures.items()) or "no node available"
                    if job.queued and (passing or not failures):
                        raise NotNow(f"waiting: {why}")
                    raise JobFailed(f"no node could run job {job.job_id} ({why})")
                if self.records is not None:
                    self.records.flush()   # the job and its parts are on disk before the loop runs anything else
                if start_event is not None:   # after the records are on disk, so it never names a job they lack
                    await emit(start_event)
                    start_event = None
                waiting: list[asyncio.Future[Any]] = [*running, cancel_wait]
                await asyncio.wait(waiting, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
                now = time.monotonic()
                if now - last_emit >= 0.25:
                    last_emit = now
                    await emit({"type": "progress", "done": progress[0], "running": len(running),
                                "finished": len(done)})
                for task in [t for t in running if t.done()]:
                    o = task.result()
                    del running[task]
                    job.running_by_node[o.node.name] -= 1
                    # The job's last part ends in the same commit as the job (_finish follows, nothing awaited).
                    self._record_part(o, defer=o.ok and not queue and not running)
                    fp = o.node.fingerprint
                    if o.ok:
                        done.append(o)
                        free[fp] = free.get(fp, 0) + 1
                        continue
                    if not o.node.local:
                        self.debits.release(fp)
                    failures[o.node.name] = o.refused and f"refused ({o.refused}: {o.error})" or o.error
                    if o.refused in PASSING or not (o.started or o.refused):
                        passing.add(o.node.name)
                    if o.started:   # a run that began counts as an attempt; a refusal does not
                        lost[o.chunk] += 1
                        if lost[o.chunk] >= max_attempts:
                            if job.kind == "exec" and max_attempts == 1:   # it may have had effects: not twice
                                raise JobFailed(f"job {job.job_id} on {o.node.name}: {o.error} (not re-run: it may "
                                                "have had effects; vesta exec --retries N allows re-runs)")
                            raise JobFailed(f"job {job.job_id}: chunk {o.chunk} failed {lost[o.chunk]} times "
                                            f"(max_attempts {max_attempts}); last on {o.node.name}: {o.error}")
                    free[fp] = -len(chunks)          # this node is out of this job
                    queue.appendleft((o.chunk, o.start, o.count))
                    self.counters["chunks_replaced"] += 1
                    moved = {"node": o.node.name, "chunk": o.chunk, "why": failures[o.node.name]}
                    job.replaced.append(moved)
                    await emit({"type": "replaced", **moved})
                    self.on_event("moved", f"{job.job_id} chunk {o.chunk} moved off {o.node.name}: {moved['why']}")
                    log.info("job %s chunk %d re-placed: %s %s", job.job_id, o.chunk, o.node.name,
                             failures[o.node.name])
        finally:
            cancel_wait.cancel()
            if running:
                job.cancel.set()
                await asyncio.gather(*running, return_exceptions=True)
                for o in running.values():
                    o.error = o.error or "cancelled"
                    self._record_part(o, cancelled=True)
        return done

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

    @staticmethod
    async def _stop_remote(o: ChunkOutcome, stream: Stream) -> None:
        """Tell the node to stop a chunk this node gave up on (best effort: it may be gone already)."""
        if o.started and o.result is None and not stream.link.closed:
            with contextlib.suppress(PeerUnavailable, TimeoutError):
                async with asyncio.timeout(CANCEL_SEND_S):
                    await stream.send(proto.Cancel(rid=stream.rid))

    async def _run_chunk(self, job: Job, o: ChunkOutcome, make: Callable[[int], proto.Offer],
                         add_progress: Callable[[int], None], on_output: OnOutput | None) -> ChunkOutcome:
        async def output(stream: str, data: bytes) -> None:
            if on_output is None:
                return
            try:
                await on_output(stream, data)
            except (PeerUnavailable, OSError):
                job.cancel.set()   # the submitter's client went away: stop the work everywhere

        if o.node.local:
            cancel = StopFlag()
            watcher = job.cancel.future()
            files = ExecFiles(job.inputs, job.inputs_dir, job.sink) if job.kind == "exec" else None
            run = asyncio.ensure_future(self.run_local(make(0), LocalRun(cancel, add_progress, output,
                                                                          lambda: self._mark_running(job, o), files)))
            both: list[asyncio.Future[Any]] = [run, watcher]
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
            if not run.done():
                cancel.set()
            watcher.cancel()
            try:
                result = await run
            except Refused as exc:
                o.refused, o.error = exc.reason, str(exc)
                return o
            o.result, o.ok = result, result.ok
            o.error = result.error
            return o
        peer = self.table.get(o.node.fingerprint)
        if peer is None:
            o.error = "left the federation"
            return o
        offer_sent = make(0)
        try:
            stream = await self.pool.open(peer.fingerprint, peer.addr, make, peer.name)
        except PeerUnavailable as exc:
            o.error = f"unreachable: {exc}"
            return o
        done = 0
        cancel_deadline: float | None = None
        try:
            reply = await stream.next(ACCEPT_TIMEOUT)
            if isinstance(reply, proto.Refuse):
                o.refused, o.error = reply.reason, reply.message
                return o
            if not isinstance(reply, proto.Accept):
                o.error = f"answered {type(reply).__name__} to an offer"
                return o
            o.started = True
            accepted = time.monotonic()
            self._mark_running(job, o)
            if job.inputs and job.inputs_dir is not None:
                try:
                    for piece in artifacts.input_pieces(stream.rid, job.inputs_dir, job.inputs):
                        if job.cancel.is_set():
                            break   # the loop below sends the Cancel
                        await stream.send(piece)
                except OSError as exc:
                    with contextlib.suppress(PeerUnavailable):
                        await stream.send(proto.Cancel(rid=stream.rid))
                    o.error = f"cannot read the job's staged inputs: {exc.strerror or exc}"
                    return o
            while True:
                if job.cancel.is_set() and cancel_deadline is None:
                    await stream.send(proto.Cancel(rid=stream.rid))
                    cancel_deadline = time.monotonic() + CANCEL_WAIT
                if cancel_deadline is not None:
                    left = cancel_deadline - time.monotonic()
                    if left <= 0:
                        o.error = "cancelled (the node did not confirm in time)"
                        return o
                    wait = left   # not a heartbeat: a Progress a little late must not look like a dead link
                else:
                    wait = SILENCE_TIMEOUT   # job.cancel is not set here: a Cancel would have set the deadline
                try:
                    msg = await stream.next(wait)
                except PeerUnavailable:
                    if cancel_deadline is not None and not stream.link.closed and stream.rid in stream.link.pending:
                        continue   # still waiting for the cancelled chunk's last word, up to the deadline
                    raise          # the request itself is gone (the link dropped it): nothing more can come
                if isinstance(msg, proto.Output):
                    await output(msg.stream, msg.data)
                elif isinstance(msg, proto.FileChunk):
                    if job.sink is not None:
                        job.sink.feed(msg)
                elif isinstance(msg, proto.Progress):
                    if msg.done > done:
                        add_progress(msg.done - done)
                        done = msg.done
                elif isinstance(msg, proto.Result):
                    if msg.ok and offer_sent.kind == "cpu" and len(msg.digests) != o.count:
                        o.error = f"returned {len(msg.digests)} digests for {o.count} units"
                        return o
                    # What the peer lent us counts toward its cap here: never more than we saw it take, all
                    # its cores busy for as long as the run took.
                    wall = time.monotonic() - accepted
                    self.on_borrowed(peer.fingerprint, peer.name, offer_sent,
                                     dataclasses.replace(msg, cpu_s=min(msg.cpu_s, wall * peer.status.cores),
                                                         elapsed_s=min(msg.elapsed_s, wall)))
                    o.result, o.ok, o.error = msg, msg.ok, msg.error
                    return o
        except PeerUnavailable as exc:
            o.error = f"lost: {exc}" if o.started else f"unreachable: {exc}"
            await self._stop_remote(o, stream)
            return o
        except BaseException:   # failed here (the records, this task cancelled): the chunk must not run on
            await self._stop_remote(o, stream)
            raise
        finally:
            stream.close()
