"""One chunk of a submitted job, from its offer to its end: on this node (no link) or on a peer.

``ChunkRun`` offers the chunk, sends an exec job's inputs after the Accept, follows Progress,
Output, artifacts (FileChunk) and the Result, and fills in the chunk's ``ChunkOutcome``: what the
submitter (``submitter.Submitter``) needs to record it and to re-place it. A job whose cancel switch is
set sends a Cancel and waits ``CANCEL_WAIT`` for the host's last word; a chunk given up on for any
other reason (records failing, this task cancelled) gets a Cancel too, so it never runs on unseen.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vesta import artifacts, proto, workloads
from vesta.autopilot import NodeView
from vesta.errors import PeerUnavailable, Refused
from vesta.hostexec import ExecFiles, LocalRun, OnOutput
from vesta.link import LinkPool, Stream
from vesta.peertable import PeerTable
from vesta.spec import CpuSpec, ExecSpec, JobRequest
from vesta.tasks import StopFlag

ACCEPT_TIMEOUT = 10.0    # an offer must be answered within this
SILENCE_TIMEOUT = 15.0   # a running chunk whose host says nothing this long is lost
CANCEL_WAIT = 3.0        # after Cancel, how long to wait for the host's last Result
CANCEL_SEND_S = 1.0      # a Cancel to a node this side gave up on: at most this long to send it
CHECKED_UNITS = 1        # units of each cpu chunk from a peer recomputed here before its result is accepted
TIMEOUT_GRACE_S = 30.0   # an exec run still going this long past its --timeout is stopped by the submitter ...
ARTIFACT_RATE = 1 << 20  # ... plus a second per MiB of artifacts it may send back

RunLocal = Callable[[proto.Offer, LocalRun], Awaitable[proto.Result]]
RunNow = Callable[[proto.Offer, LocalRun], "proto.Result | None"]   # a chunk done on the spot, or None (see Host)
OnBorrowed = Callable[[str, str, proto.Offer, proto.Result], None]


def new_job_id() -> str:
    return "j" + secrets.token_hex(5)


@dataclass
class Job:
    """A job this node submitted, while it runs."""

    job_id: str
    request: JobRequest
    cancel: StopFlag = field(default_factory=lambda: StopFlag())
    replaced: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    running_by_node: Counter[str] = field(default_factory=Counter)    # chunks running now, per node name
    done_by_node: Counter[str] = field(default_factory=Counter)       # iterations done so far, per node name
    first_by_node: dict[str, float] = field(default_factory=dict)     # monotonic time of its first chunk
    queued: bool = False                  # on record as queued until a node accepts it
    inputs_dir: Path | None = None        # exec: where its --put files are staged on this node
    sink: artifacts.Sink | None = None    # exec: where its $VESTA_OUTPUT files are stored

    @property
    def kind(self) -> str:
        return self.request.kind

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


@dataclass
class ChunkOutcome:
    """One attempt at one chunk on one node, as it ended."""

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
    spot: bool = False       # it ran on the spot (``ChunkRun.now``): on record once, with its end


@dataclass
class ChunkRun:
    """What running one chunk needs from the submitter; ``run()`` fills in and returns the outcome."""

    job: Job
    outcome: ChunkOutcome
    make: Callable[[int], proto.Offer]    # the offer, given its request id
    progress: Callable[[int], None]       # iterations done since the last call
    on_output: OnOutput | None            # an exec job's stdout/stderr
    mark_running: Callable[[], None]      # the node accepted it

    async def output(self, stream: str, data: bytes) -> None:
        if self.on_output is None:
            return
        try:
            await self.on_output(stream, data)
        except (PeerUnavailable, OSError):
            self.job.cancel.set()   # the submitter's client went away: stop the work everywhere

    def now(self, run_now: RunNow) -> ChunkOutcome | None:
        """On this node, on the spot, when the chunk is small enough (a tiny cpu chunk): its outcome, or None.
        No task, no thread: a batch of one-iteration jobs is mostly this."""
        result = run_now(self.make(0), LocalRun(self.job.cancel, self.progress, self.output, self.mark_running))
        if result is None:
            return None
        o = self.outcome
        o.result, o.ok, o.error, o.spot = result, result.ok, result.error, True
        return o

    async def here(self, run_local: RunLocal) -> ChunkOutcome:
        """On this node itself, through its own Host, without a link."""
        job, o = self.job, self.outcome
        cancel = StopFlag()
        watcher = job.cancel.future()
        spec = job.request.spec
        files = ExecFiles(spec.inputs, job.inputs_dir, job.sink) if isinstance(spec, ExecSpec) else None
        run = asyncio.ensure_future(run_local(self.make(0), LocalRun(cancel, self.progress, self.output,
                                                                     self.mark_running, files)))
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
        o.result, o.ok, o.error = result, result.ok, result.error
        return o

    async def there(self, pool: LinkPool, table: PeerTable, on_borrowed: OnBorrowed) -> ChunkOutcome:
        """On a peer, over the link to it."""
        o = self.outcome
        peer = table.get(o.node.fingerprint)
        if peer is None:
            o.error = "left the federation"
            return o
        try:
            stream = await pool.open(peer.fingerprint, peer.addr, self.make, peer.name)
        except PeerUnavailable as exc:
            o.error = f"unreachable: {exc}"
            return o
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
            self.mark_running()
            if not await self._send_inputs(stream, frozenset(reply.have)):
                return o
            result = await self._follow(stream)
            if result is not None and not await self._checked(result):
                return o   # a made-up result: no credit, and the chunk goes elsewhere
            if result is not None:
                # What the peer lent us counts toward its cap, and goes on record, bounded by what we saw: a
                # cpu or mem chunk runs on one thread, so one core for as long as the run took; an exec run
                # may use every core the peer has (what it advertises).
                wall = time.monotonic() - accepted
                cores = peer.status.cores if self.job.kind == "exec" else 1
                o.result = dataclasses.replace(result, cpu_s=min(result.cpu_s, wall * cores),
                                               elapsed_s=min(result.elapsed_s, wall))
                on_borrowed(peer.fingerprint, peer.name, self.make(0), o.result)
            return o
        except PeerUnavailable as exc:
            o.error = f"lost: {exc}" if o.started else f"unreachable: {exc}"
            await self._stop_remote(stream)
            return o
        except BaseException:   # failed here (the records, this task cancelled): the chunk must not run on
            await self._stop_remote(stream)
            raise
        finally:
            stream.close()

    async def _send_inputs(self, stream: Stream, have: frozenset[str] = frozenset()) -> bool:
        """Ship an exec job's --put files after the Accept, but those the node said it ``have`` (a sweep's shared
        file it kept); False if they cannot be read (the run is cancelled)."""
        job = self.job
        spec = job.request.spec
        inputs = tuple(i for i in spec.inputs if i.sha256 not in have) if isinstance(spec, ExecSpec) else ()
        if not inputs or job.inputs_dir is None:
            return True
        try:
            for piece in artifacts.input_pieces(stream.rid, job.inputs_dir, inputs):
                if job.cancel.is_set():
                    break   # _follow sends the Cancel
                await stream.send(piece)
        except OSError as exc:
            with contextlib.suppress(PeerUnavailable):
                await stream.send(proto.Cancel(rid=stream.rid))
            self.outcome.error = f"cannot read the job's staged inputs: {exc.strerror or exc}"
            return False
        return True

    async def _follow(self, stream: Stream) -> proto.Result | None:
        """Progress, output and artifacts until the Result (None: the chunk ended without one, see outcome)."""
        job, o = self.job, self.outcome
        done = 0
        cancel_deadline: float | None = None
        overdue = self._overdue_at()
        timed_out = False   # this side stopped the run: past its --timeout, the node still had it going
        late_why = f"timed out: still running {TIMEOUT_GRACE_S:g}s past its --timeout on {o.node.name}"
        while True:
            if (job.cancel.is_set() or self._late(overdue)) and cancel_deadline is None:
                timed_out = not job.cancel.is_set()
                await stream.send(proto.Cancel(rid=stream.rid))
                cancel_deadline = time.monotonic() + CANCEL_WAIT
            if cancel_deadline is not None:
                wait = cancel_deadline - time.monotonic()
                if wait <= 0:
                    o.error = late_why if timed_out else "cancelled (the node did not confirm in time)"
                    return None
                # not a heartbeat: a Progress a little late must not look like a dead link
            else:   # a live node sends Progress every HEARTBEAT: the next message shows whether the run is late
                wait = SILENCE_TIMEOUT
            try:
                msg = await stream.next(wait)
            except PeerUnavailable:
                if cancel_deadline is not None and not stream.link.closed and stream.rid in stream.link.pending:
                    continue   # still waiting for the cancelled chunk's last word, up to the deadline
                raise          # the request itself is gone (the link dropped it): nothing more can come
            if isinstance(msg, proto.Output):
                await self.output(msg.stream, msg.data)
            elif isinstance(msg, proto.FileChunk):
                if job.sink is not None:
                    job.sink.feed(msg)
            elif isinstance(msg, proto.Progress):
                if msg.done > done:
                    self.progress(msg.done - done)
                    done = msg.done
            elif isinstance(msg, proto.Result):
                if timed_out:
                    msg = dataclasses.replace(msg, error=late_why)
                if msg.ok and job.kind == "cpu" and len(msg.digests) != o.count:
                    o.error = f"returned {len(msg.digests)} digests for {o.count} units"
                    return None
                o.result, o.ok, o.error = msg, msg.ok, msg.error
                return msg

    async def _checked(self, result: proto.Result) -> bool:
        """Recompute a random sample of a cpu chunk's units here (at least one; every unit's digest depends only
        on the job id, its index and size) and compare: False, and the outcome says so, if the peer lied."""
        spec, o = self.job.request.spec, self.outcome
        if not isinstance(spec, CpuSpec) or not result.ok or not result.digests:
            return True
        picks = random.sample(range(o.count), min(o.count, CHECKED_UNITS))
        for i in picks:
            index = o.start + i
            size = workloads.unit_size(spec.iterations, index)
            if size <= workloads.INLINE_ITERATIONS:   # microseconds: a thread hop would cost more than the hash
                ours = workloads.unit_digest(self.job.job_id, index, size)
            else:
                ours = await asyncio.to_thread(workloads.unit_digest, self.job.job_id, index, size)
            if ours != result.digests[i]:
                o.ok, o.result = False, None
                o.error = f"returned a wrong digest for unit {index} (recomputed here): result rejected"
                return False
        return True

    @staticmethod
    def _late(overdue: float | None) -> bool:
        return overdue is not None and time.monotonic() >= overdue

    def _overdue_at(self) -> float | None:
        """When an exec run that asked for a time limit is overdue on its node (the node enforces the limit; this
        side does too, so a node that keeps sending progress cannot hold the job for ever)."""
        spec = self.job.request.spec
        if not isinstance(spec, ExecSpec) or not spec.timeout_s:
            return None
        cap = self.job.sink.cap if self.job.sink is not None else 0
        return time.monotonic() + spec.timeout_s + TIMEOUT_GRACE_S + cap / ARTIFACT_RATE

    async def _stop_remote(self, stream: Stream) -> None:
        """Tell the node to stop a chunk this node gave up on (best effort: it may be gone already)."""
        o = self.outcome
        if o.started and o.result is None and not stream.link.closed:
            with contextlib.suppress(PeerUnavailable, TimeoutError):
                async with asyncio.timeout(CANCEL_SEND_S):
                    await stream.send(proto.Cancel(rid=stream.rid))
