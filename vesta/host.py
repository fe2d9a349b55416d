"""The host's side of jobs: admit or refuse an offer, run it, report progress and the result.

An Offer is checked in order (exec policy, the peer's borrow cap, lending hours, memory, capacity),
then run (cpu and mem in a worker thread, exec through ``execrun`` with limits and the sandbox) with
a Progress heartbeat every ``HEARTBEAT`` seconds and one Result; a Cancel, a dropped link or the end
of the lending hours stops it. Every run is recorded and charged to the peer in the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vesta import artifacts, confine, execrun, executor, proctree, proto
from vesta.errors import PeerUnavailable, Refused, VestaError
from vesta.hours import LendingHours
from vesta.ledger import Ledger
from vesta.records import Records
from vesta.tasks import StopFlag
from vesta.wire import Channel

log = logging.getLogger(__name__)

HEARTBEAT = 0.5          # seconds between Progress messages from a host
MEM_EXTRA_SLOTS = 2      # mem chunks mostly sleep: a node may hold this many beyond its cpu slots
HOSTNAME = socket.gethostname()
INLINE_ITERATIONS = 4096  # a cpu chunk this small (256 KiB, ~0.2 ms) is hashed on the event loop, not in a thread
INPUT_WAIT_S = 30.0       # an exec job's inputs must start arriving within this of the Accept ...
INPUT_MIN_RATE = 1 << 20  # ... and keep coming at this many bytes/s at least

OnOutput = Callable[[str, bytes], Awaitable[None]]


class ExecFiles:
    """How an exec run gets its inputs and gives back its artifacts. This base is the run on the
    submitting node itself: inputs are copied from the submitter's staged copy (checked like any
    other), artifacts go straight into the job's ``Sink``."""

    def __init__(self, inputs: tuple[artifacts.FileInfo, ...] = (), source: Path | None = None,
                 sink: artifacts.Sink | None = None) -> None:
        self.inputs = inputs
        self.source = source
        self.sink = sink

    async def fill(self, offer: proto.Offer, workdir: Path) -> str:
        """Put the inputs in the working directory; "" or why they are not there."""
        if not self.inputs:
            return ""
        if self.source is None:
            return "inputs were announced but are nowhere to be read"
        return await asyncio.to_thread(self._copy, workdir)

    def _copy(self, workdir: Path) -> str:
        sink = artifacts.Sink(workdir, cap=sum(i.size for i in self.inputs), expect=self.inputs)
        assert self.source is not None
        try:
            for piece in artifacts.input_pieces(0, self.source, self.inputs):
                sink.feed(piece)
        except OSError as exc:
            return f"cannot read the staged inputs: {exc.strerror or exc}"
        finally:
            sink.finish()
        return input_problem(sink)

    async def ship(self, offer: proto.Offer, workdir: Path) -> None:
        """Send what the job left in $VESTA_OUTPUT back to the submitter."""
        sink = self.sink
        if sink is None:
            return

        def copy() -> None:
            for piece in artifacts.output_pieces(0, workdir, max(0, sink.cap - sink.stored)):
                sink.feed(piece)

        await asyncio.to_thread(copy)


def input_problem(sink: artifacts.Sink) -> str:
    bad = sink.problems
    if bad:
        return f"input {bad[0].path}: {bad[0].reason}"
    missing = [p for p in sink.expect or {} if p not in sink.files]
    return f"input {missing[0]} never arrived" if missing else ""


class _RemoteFiles(ExecFiles):
    """A peer's exec run: inputs arrive as FileChunks on the link (``Host.receive``), artifacts go back
    the same way before the Result."""

    def __init__(self, hosted: Hosted, channel: Channel) -> None:
        super().__init__()
        self.hosted = hosted
        self.channel = channel

    async def fill(self, offer: proto.Offer, workdir: Path) -> str:
        sink = self.hosted.sink
        if sink is None:
            return ""
        total = sum(size for _, size, _, _ in offer.inputs)
        deadline = time.monotonic() + INPUT_WAIT_S + total / INPUT_MIN_RATE
        try:
            while not (sink.complete or sink.problems):
                if self.hosted.cancel.is_set():
                    return "cancelled while its inputs were arriving"
                left = deadline - time.monotonic()
                if left <= 0:
                    return f"the inputs did not arrive in time ({len(sink.files)} of {len(offer.inputs)} files)"
                self.hosted.inputs_changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self.hosted.inputs_changed.wait()
            return input_problem(sink)
        finally:
            sink.finish()
            self.hosted.sink = None

    async def ship(self, offer: proto.Offer, workdir: Path) -> None:
        if offer.output_cap <= 0 or self.hosted.cancel.is_set():
            return
        pieces = artifacts.output_pieces(offer.rid, workdir, offer.output_cap)
        try:   # read in a thread: a job may leave a huge tree, and the loop must not stall on it
            while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                await self.channel.send(piece)
        finally:
            pieces.close()


@dataclass
class LocalRun:
    """What a chunk run on the submitting node itself gets instead of a link."""

    cancel: StopFlag
    progress: Callable[[int], None]
    output: OnOutput
    started: Callable[[], None] = lambda: None   # called once the run is admitted
    files: ExecFiles | None = None


@dataclass
class Hosted:
    """A chunk this node runs for a peer."""

    peer: str
    offer: proto.Offer
    cancel: StopFlag
    started: float
    done: list[int]
    stop_reason: str = ""
    sink: artifacts.Sink | None = None    # exec: where its inputs are being received
    inputs_changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def stop(self, reason: str = "") -> None:
        """Stop the run, wherever it is: waiting for its inputs (woken at once), running, or in a thread."""
        if reason:
            self.stop_reason = reason
        self.cancel.set()
        self.inputs_changed.set()


class Host:
    """Admits and runs chunks offered by peers (and by this node's own Submitter, in-process)."""

    def __init__(self, *, name: str, counters: Counter[str], capacity: Callable[[], tuple[int, int]],
                 events: Callable[[str, str], None], allow_exec: bool = False,
                 allowlist: execrun.Allowlist | None = None, exec_timeout: float = 3600.0,
                 ledger: Ledger | None = None, hours: LendingHours | None = None,
                 on_ledger: Callable[[], None] = lambda: None, records: Records | None = None,
                 exec_mem_mib: int = 1024, exec_file_mib: int = 1024, bwrap: str | None = None,
                 allow_network: bool = False, hide: tuple[Path, ...] = (), input_cap_mib: int = 256,
                 keep_runs: bool = False, job_user: tuple[int, int] | None = None, setpriv: str | None = None,
                 max_procs: int = 0) -> None:
        self.name = name
        self.node_id = ""               # our fingerprint, in every exec job's environment (VESTA_NODE_ID)
        self.runs: Path | None = None   # where run directories are made (None: the system temp dir)
        self.job_user = job_user   # (uid, gid) exec jobs run as (vestad is root), or None: the daemon's user
        self.setpriv = setpriv     # drops to job_user (inside the sandbox, where bwrap itself stays root)
        self.prlimit: str | None = None   # sets a run's limits as a command prefix (else a preexec function)
        self.max_procs = max_procs
        self.input_cap = input_cap_mib << 20
        self.keep_runs = keep_runs
        self.bwrap = bwrap                  # path of bubblewrap when exec runs sandboxed
        self.allow_network = allow_network
        self.hide = hide
        self.exec_mem_mib = exec_mem_mib
        self.exec_file_mib = exec_file_mib
        self.records = records
        self.ledger = ledger
        self.hours = hours
        self.on_ledger = on_ledger
        self.allow_exec = allow_exec
        self.allowlist = allowlist or execrun.Allowlist([])
        self.exec_timeout = exec_timeout
        self.counters = counters
        self.capacity = capacity          # () -> (cpu slots for peers now, offered MiB)
        self.events = events
        self.running: dict[tuple[str, int], Hosted] = {}
        self._peak = 0   # most chunks running at once since take_peak(): they are in the CPU sample too

    @property
    def lent_running(self) -> int:
        return len(self.running)

    def take_peak(self) -> int:
        """Most chunks lent at once since the last call (one call per CPU sample window)."""
        peak, self._peak = max(self._peak, len(self.running)), len(self.running)
        return peak

    def admit(self, offer: proto.Offer, peer: str | None = None) -> proto.Refuse | None:
        """Exec policy, the peer's borrow cap, lending hours, memory, capacity: the first that says no.
        ``peer`` is the submitter's fingerprint; None for this node's own work (no cap, no hours)."""
        slots, mem_mb = self.capacity()
        if offer.kind == "exec" and not self.allow_exec:
            return proto.Refuse(rid=offer.rid, reason="exec_disabled",
                                message=f"{self.name} does not allow exec (start it with -allow-exec)")
        if offer.kind == "exec" and sum(size for _, size, _, _ in offer.inputs) > self.input_cap:
            total = sum(size for _, size, _, _ in offer.inputs)
            return proto.Refuse(rid=offer.rid, reason="policy",
                                message=f"{self.name} takes at most {self.input_cap >> 20} MiB of input files per "
                                        f"job ({total / (1 << 20):.1f} MiB sent; exec_max_input_mb)")
        if offer.kind == "exec" and offer.mem_mib > self.exec_mem_mib:
            return proto.Refuse(rid=offer.rid, reason="memory",
                                message=f"{self.name} gives exec jobs at most {self.exec_mem_mib} MiB "
                                        f"({offer.mem_mib} MiB asked)")
        if peer is not None and self.ledger is not None:
            ok, why = self.ledger.admits(peer)
            if not ok:
                return proto.Refuse(rid=offer.rid, reason="ledger", message=why[: proto.MAX_REASON])
        if peer is not None and self.hours is not None and not self.hours.is_open():
            return proto.Refuse(rid=offer.rid, reason="hours",
                                message=f"{self.name} lends only in its agreed hours: {self.hours.describe()}")
        if peer is None:
            return None  # the owner's own work: what this node lends (and when) does not bind it
        if offer.kind == "mem":
            held = sum(h.offer.mib for h in self.running.values() if h.offer.kind == "mem")
            if held + offer.mib > mem_mb:
                return proto.Refuse(rid=offer.rid, reason="memory",
                                    message=f"{self.name} offers {mem_mb} MiB ({held} MiB already lent), "
                                            f"{offer.mib} MiB asked")
            if self.lent_running >= max(slots, 1) + MEM_EXTRA_SLOTS:
                return proto.Refuse(rid=offer.rid, reason="capacity", message=f"{self.name} is busy")
            return None
        if self.lent_running >= slots:
            return proto.Refuse(rid=offer.rid, reason="capacity",
                                message=f"{self.name} is busy ({self.lent_running} chunks running, "
                                        f"{slots} slots offered now)")
        return None

    def screen(self, offer: proto.Offer, peer: str | None = None) -> tuple[Path, str] | proto.Refuse | None:
        """Policy first (exec off, program not allowed), then memory and capacity: a program that is
        not allowed is refused as such however busy the node is. An admitted exec gets its
        (working directory, program); other admitted offers get None."""
        if offer.kind == "exec" and self.allow_exec:
            prepared = self.prepare_exec(offer)
            if isinstance(prepared, proto.Refuse):
                return prepared
            refusal = self.admit(offer, peer)
            if refusal is not None:
                execrun.remove_workdir(prepared[0])
                return refusal
            return prepared
        return self.admit(offer, peer)

    async def serve_offer(self, offer: proto.Offer, channel: Channel) -> None:
        key = (channel.peer_fingerprint, offer.rid)
        if key in self.running:  # a peer reusing a live rid must not hide work from the capacity count
            self.counters["offers_refused"] += 1
            await channel.send(proto.Refuse(rid=offer.rid, reason="invalid", message="request id already in use"))
            return
        prepared = self.screen(offer, channel.peer_fingerprint)
        if isinstance(prepared, proto.Refuse):
            self.counters["offers_refused"] += 1
            self.events("refused", f"refused {offer.kind} from {offer.submitter or channel.peer_fingerprint[:8]}: "
                                   f"{prepared.reason} ({prepared.message})")
            await channel.send(prepared)
            return
        hosted = Hosted(offer.submitter or channel.peer_fingerprint[:8], offer, StopFlag(), time.time(), [0])
        if prepared is not None and offer.inputs:   # ready before the Accept: the inputs follow it at once
            hosted.sink = artifacts.Sink(prepared[0], cap=sum(size for _, size, _, _ in offer.inputs),
                                         expect=tuple(artifacts.FileInfo(*e) for e in offer.inputs))
        self.running[key] = hosted
        self._peak = max(self._peak, len(self.running))

        async def output(stream: str, data: bytes) -> None:
            await channel.send(proto.Output(rid=offer.rid, stream=stream, data=data))

        run_id = None
        ended: tuple[str, str, int | None, float] = ("failed", "link to the submitter dropped", None, 0.0)
        inline = prepared is None and is_inline(offer)
        started = time.time()

        def record_start(defer: bool = False) -> None:
            nonlocal run_id
            if self.records is None:
                return
            args: dict[str, Any] = ({"argv": list(offer.argv), "timeout_s": offer.timeout_s,
                                     "inputs": [e[0] for e in offer.inputs]} if offer.kind == "exec"
                                    else {"mib": offer.mib, "ms": offer.ms} if offer.kind == "mem"
                                    else {"start": offer.start, "count": offer.count, "iterations": offer.iterations})
            if prepared is not None and self.keep_runs:
                args["workdir"] = str(prepared[0])
            run_id = self.records.start_hosted(job_id=offer.job_id, chunk=offer.chunk, peer=hosted.peer,
                                               peer_fp=channel.peer_fingerprint, kind=offer.kind, args=args,
                                               started=started, defer=defer)

        if not inline:   # an inline run is written once, start and end together, just after its answer goes out
            try:
                record_start()
            except VestaError as exc:   # the run still goes ahead: the records are not worth a peer's work
                log.warning("could not record hosted run of job %s: %s", offer.job_id, exc)

        def record_end() -> None:
            nonlocal run_id
            if self.records is None or run_id is None:
                return
            (state, reason, code, cpu_s), done_id, run_id = ended, run_id, None
            try:
                self.records.finish_hosted(done_id, state=state, finished=time.time(), cpu_s=cpu_s, exit_code=code,
                                           reason=reason[:500])
            except VestaError as exc:
                log.warning("could not record hosted run %s: %s", done_id, exc)

        def charge(r: proto.Result) -> None:
            if self.ledger is not None:
                self.ledger.record_lent(channel.peer_fingerprint, offer.submitter, r.cpu_s,
                                        offer.mib * r.elapsed_s if offer.kind == "mem" else 0.0)
                self.on_ledger()

        def progress(n: int) -> None:
            hosted.done[0] += n

        def ended_late(w: asyncio.Future[proto.Result]) -> None:
            """The run outlived its link (or the daemon is stopping): what it used is still lent, and recorded."""
            nonlocal ended
            if not w.cancelled() and w.exception() is None:
                r = w.result()
                charge(r)
                ended = (ended[0], ended[1], r.exit_code, r.cpu_s)
            record_end()
            if prepared is not None and not self.keep_runs:
                _remove_soon(prepared[0])

        work: asyncio.Future[proto.Result] | None = None
        try:
            self.counters["offers_accepted"] += 1
            if inline:   # done in microseconds: Accept and Result leave together, one wake-up for the submitter
                result = run_inline(offer, hosted.cancel, self.name, progress)
                assert result is not None
                charge(result)
                ended = self._ending(offer, hosted, result)[1]
                try:
                    await channel.send(proto.Accept(rid=offer.rid, node=self.name), result)
                finally:
                    try:   # after the answer: the records are off the submitter's wait
                        record_start(defer=True)
                    except VestaError as exc:
                        log.warning("could not record hosted run of job %s: %s", offer.job_id, exc)
                    record_end()
                return
            await channel.send(proto.Accept(rid=offer.rid, node=self.name))
            if prepared is not None:
                work = asyncio.ensure_future(self.run_exec(offer, prepared, hosted.cancel, output,
                                                           _RemoteFiles(hosted, channel), remove=False))
            else:
                work = asyncio.ensure_future(run_builtin(offer, hosted.cancel, self.name, progress))
            try:
                while not work.done():
                    await asyncio.wait([work], timeout=HEARTBEAT)
                    if not work.done():
                        await channel.send(proto.Progress(rid=offer.rid, done=hosted.done[0]))
                result = await work
            except BaseException:
                hosted.stop()   # link dropped or daemon stopping
                raise
            finally:
                if work.done() and not work.cancelled() and work.exception() is None:
                    charge(work.result())
            result, ended = self._ending(offer, hosted, result)
            await channel.send(result)
        except PeerUnavailable:
            hosted.stop()
        finally:
            if self.running.get(key) is hosted:
                del self.running[key]
            if hosted.sink is not None:
                hosted.sink.finish()
            if work is not None and not work.done():   # stopped mid-run: it ends on hosted.cancel, then goes
                work.add_done_callback(ended_late)
            else:
                record_end()
                if prepared is not None and not self.keep_runs:   # after the Result is sent: off the submitter's wait
                    await asyncio.to_thread(execrun.remove_workdir, prepared[0])

    @staticmethod
    def _ending(offer: proto.Offer, hosted: Hosted,
                result: proto.Result) -> tuple[proto.Result, tuple[str, str, int | None, float]]:
        """The result to send (naming why the host stopped it, if it did) and how the run ended, for the records."""
        if hosted.stop_reason and not result.ok:
            result = dataclasses.replace(result, error=hosted.stop_reason)
        ok = result.ok and (offer.kind != "exec" or result.exit_code == 0)
        return result, ("succeeded" if ok else "cancelled" if "cancel" in result.error else "failed",
                        result.error, result.exit_code, result.cpu_s)

    def receive(self, peer: str, piece: proto.FileChunk) -> None:
        """A piece of an input file for a run this node hosts (ignored when no run waits for it)."""
        hosted = self.running.get((peer, piece.rid))
        if hosted is None or hosted.sink is None:
            self.counters["file_chunks_unexpected"] += 1
            return
        hosted.sink.feed(piece)
        hosted.inputs_changed.set()

    def prepare_exec(self, offer: proto.Offer) -> tuple[Path, str] | proto.Refuse:
        """A fresh working directory and the allowlisted program to run in it, or why not.

        A program shipped with the job (``--put run.sh -- ./run.sh``) is in no allowlist: it may run
        only where ``exec_allowlist`` is empty (the owner allows any program); it is resolved once
        it has arrived."""
        shipped = {path for path, _, _, _ in offer.inputs}
        argv0 = offer.argv[0]
        deferred = "/" in argv0 and os.path.normpath(argv0) in shipped
        if deferred and not self.allowlist.any:
            return proto.Refuse(rid=offer.rid, reason="not_allowed",
                                message=f"{argv0!r} was shipped with the job; {self.name} runs only its "
                                        f"exec_allowlist ({', '.join(self.allowlist.names()) or 'nothing'})")
        try:
            workdir = execrun.make_workdir(self.runs, offer.job_id)
        except (OSError, Refused) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            return proto.Refuse(rid=offer.rid, reason="policy",
                                message=f"{self.name} cannot make a working directory: {why}"[: proto.MAX_REASON])
        if deferred:
            return workdir, ""   # "": resolved once the inputs are in
        try:
            return workdir, self.allowlist.resolve(argv0, workdir)
        except Refused as exc:
            execrun.remove_workdir(workdir)
            reason = exc.reason if exc.reason in proto.REFUSE_REASONS else "policy"
            return proto.Refuse(rid=offer.rid, reason=reason, message=str(exc)[: proto.MAX_REASON])

    async def run_exec(self, offer: proto.Offer, prepared: tuple[Path, str], cancel: StopFlag,
                       output: OnOutput, files: ExecFiles | None = None, *, remove: bool = True) -> proto.Result:
        """Run an admitted exec offer in its working directory: its inputs first, its artifacts back
        afterwards; the directory is removed at the end (by the caller when ``remove`` is False), unless
        ``keep_runs``."""
        workdir, program = prepared
        files = files or ExecFiles()
        stop = asyncio.Event()
        watcher = cancel.future()   # the flag may be set from any thread; the run sees it at once
        watcher.add_done_callback(lambda w: None if w.cancelled() else stop.set())
        timeout = offer.timeout_s or self.exec_timeout
        limits = confine.Limits(mem_mib=offer.mem_mib or self.exec_mem_mib, cpu_s=int(timeout) + 5,
                                file_mib=self.exec_file_mib, procs=self.max_procs, run_as=self.job_user)
        tail = bytearray()
        sandbox: execrun.SandboxInfo | None = None

        async def keep_tail(stream: str, data: bytes) -> None:  # enough to tell which limit a program hit
            tail.extend(data)
            del tail[:-4096]
            await output(stream, data)

        def failed(why: str) -> proto.Result:
            return proto.Result(rid=offer.rid, ok=False, node=self.name, hostname=HOSTNAME, error=why[:200])

        try:
            env = execrun.scrubbed_env(job_id=offer.job_id, node=self.name, workdir=workdir, node_id=self.node_id)
            (workdir / artifacts.OUTPUT_DIR).mkdir(mode=0o700, exist_ok=True)
            env["VESTA_OUTPUT"] = str(workdir / artifacts.OUTPUT_DIR)
            problem = await files.fill(offer, workdir)
            if problem:
                return failed(problem)
            if not program:   # shipped with the job: only now is there a file to resolve
                program = self.allowlist.resolve(offer.argv[0], workdir)
            confine.give_workdir(workdir, self.job_user)
            if self.job_user is not None:   # what we put there (inputs, $VESTA_OUTPUT) is the job's too
                for top, dirs, names in os.walk(workdir):
                    for entry in (*dirs, *names):
                        os.chown(os.path.join(top, entry), *self.job_user, follow_symlinks=False)
            runner, argv = program, list(offer.argv)
            if self.bwrap is not None:
                sandbox = execrun.SandboxInfo()
                runner, argv = confine.bwrap_command(
                    self.bwrap, program=program, argv=argv, workdir=workdir, allow_network=self.allow_network,
                    hide=self.hide, expose=(*python_dirs(), Path(program).parent), run_as=self.job_user,
                    setpriv=self.setpriv, info_fd=sandbox.write_fd, die_with_parent=not proctree.is_subreaper())
            elif not confine.usable_by(program, self.job_user):
                return failed(f"{program} cannot be run by the job user (uid {self.job_user and self.job_user[0]}) "
                              "on this node: see exec_user")
            preexec = None
            if self.prlimit is not None:   # limits by a command prefix: no preexec_fn, so a cheap spawn
                runner, argv = limits.command(self.prlimit, runner, argv, setpriv=self.setpriv,
                                              switch_user=self.bwrap is None)
            else:
                preexec = limits.preexec(switch_user=self.bwrap is None)
            if cancel.is_set():   # while its inputs came in or its directory was readied
                return failed("cancelled before it started")
            handed, sandbox = sandbox, None   # run() owns it from here, even if it is cancelled
            r = await execrun.run(argv, program=runner, cwd=workdir, env=env, timeout=timeout, on_output=keep_tail,
                                  cancel=stop, preexec=preexec, sandbox=handed, mem_limit_mib=limits.mem_mib)
            if not cancel.is_set():
                try:
                    await files.ship(offer, workdir)
                except (OSError, ValueError) as exc:   # the Result must still go out; the files are lost
                    log.warning("could not send the artifacts of job %s: %s", offer.job_id, exc)
        except Refused as exc:
            return failed(str(exc))
        except PeerUnavailable:
            raise   # the submitter is gone: nobody to answer
        except (OSError, VestaError) as exc:   # readying its directory failed (disk full, a name in the way...)
            why = f"{exc.strerror} ({exc.filename})" if isinstance(exc, OSError) and exc.strerror else str(exc)
            return failed(f"{self.name} could not run it: {why}")
        finally:
            watcher.cancel()
            if sandbox is not None:   # never handed to run()
                sandbox.close()
            if self.keep_runs:
                log.info("kept the working directory of job %s: %s (keep_runs)", offer.job_id, workdir)
            elif remove:
                await asyncio.to_thread(execrun.remove_workdir, workdir)   # may be a big tree
        reason = limits.explain(r, bytes(tail)) or r.reason
        return proto.Result(rid=offer.rid, ok=True, node=self.name, hostname=HOSTNAME, elapsed_s=r.elapsed_s,
                            cpu_s=r.cpu_s, exit_code=r.exit_code, signal=r.signal, error=reason[:200])

    def flows(self, me: str) -> list[dict[str, Any]]:
        """Chunks this node runs for peers, grouped by peer: the flows where we lend."""
        now = time.time()
        grouped: dict[tuple[str, str, str], dict[str, Any]] = {}
        for h in self.running.values():
            key = (h.peer, h.offer.job_id, h.offer.kind)
            f = grouped.setdefault(key, {"from": me, "to": h.peer, "job_id": h.offer.job_id, "kind": h.offer.kind,
                                         "chunks": 0, "done": 0, "rate": 0.0})
            f["chunks"] += 1
            f["done"] += h.done[0]
            f["rate"] += h.done[0] / max(now - h.started, 1e-3)
        return list(grouped.values())

    def stop_all(self, reason: str) -> int:
        """Stop every chunk run for peers (their submitters re-place them); returns how many."""
        for hosted in self.running.values():
            hosted.stop(reason)
        return len(self.running)

    def cancel(self, peer: str, rid: int) -> bool:
        hosted = self.running.get((peer, rid))
        if hosted is None:
            return False
        hosted.stop()
        return True


def _remove_soon(workdir: Path) -> None:
    """Remove a working directory in a worker thread, or here if the loop can no longer start one."""
    try:
        asyncio.get_running_loop().run_in_executor(None, execrun.remove_workdir, workdir)
    except RuntimeError:
        execrun.remove_workdir(workdir)


def python_dirs() -> tuple[Path, ...]:
    """Where this vesta's Python lives (its venv and the interpreter it was made from), so programs
    installed with vesta, like piwork, still run when home directories are hidden by the sandbox."""
    dirs = {Path(sys.prefix), Path(sys.base_prefix), Path(os.path.realpath(sys.executable)).parent.parent,
            Path(__file__).resolve().parent}   # the vesta package itself (an editable install lives in a checkout)
    return tuple(sorted(dirs))


def is_inline(offer: proto.Offer) -> bool:
    """A cpu chunk of one small unit: it hashes in microseconds, so it runs on the event loop."""
    return (offer.kind == "cpu" and offer.count == 1
            and executor.unit_size(offer.iterations, offer.start) <= INLINE_ITERATIONS)


def run_inline(offer: proto.Offer, cancel: threading.Event, node: str,
               progress: Callable[[int], None]) -> proto.Result | None:
    """Run a tiny cpu chunk right here (None if it is not one, see ``is_inline``).

    On the loop it skips two thread hand-offs (to_thread, then hash_units' own worker), which cost
    ~0.5 ms of a 1-iteration job (benchmarks/bench_dispatch.py)."""
    if not is_inline(offer):
        return None
    t0 = time.perf_counter()
    c0 = time.thread_time()
    size = executor.unit_size(offer.iterations, offer.start)
    try:
        digest = executor.unit_digest(offer.job_id, offer.start, size, cancel=cancel, progress=progress)
    except executor.Cancelled:
        return proto.Result(rid=offer.rid, ok=False, node=node, hostname=HOSTNAME,
                            elapsed_s=time.perf_counter() - t0, error="cancelled")
    return proto.Result(rid=offer.rid, ok=True, node=node, hostname=HOSTNAME, digests=(digest,),
                        iterations=size, elapsed_s=time.perf_counter() - t0, cpu_s=time.thread_time() - c0)


async def run_builtin(offer: proto.Offer, cancel: threading.Event, node: str,
                      progress: Callable[[int], None]) -> proto.Result:
    """Run a cpu or mem chunk in a worker thread and describe how it ended."""
    quick = run_inline(offer, cancel, node, progress)
    if quick is not None:
        return quick
    t0 = time.perf_counter()
    try:
        if offer.kind == "cpu":
            r = await asyncio.to_thread(executor.hash_units, offer.job_id, offer.iterations, offer.start,
                                        offer.count, threads=1, cancel=cancel, progress=progress)
            return proto.Result(rid=offer.rid, ok=True, node=node, hostname=HOSTNAME, digests=tuple(r.digests),
                                iterations=r.iterations, elapsed_s=r.elapsed_s, cpu_s=r.cpu_s)
        if offer.kind == "mem":
            m = await asyncio.to_thread(executor.hold_memory, offer.mib, offer.ms, cancel)
            return proto.Result(rid=offer.rid, ok=True, node=node, hostname=HOSTNAME,
                                elapsed_s=m.held_s + m.touch_s, cpu_s=m.touch_s)
    except executor.Cancelled:
        return proto.Result(rid=offer.rid, ok=False, node=node, hostname=HOSTNAME,
                            elapsed_s=time.perf_counter() - t0, error="cancelled")
    except MemoryError:
        return proto.Result(rid=offer.rid, ok=False, node=node, hostname=HOSTNAME,
                            elapsed_s=time.perf_counter() - t0, error="out of memory")
    raise Refused(f"{node} cannot run {offer.kind} jobs here", reason="policy")
