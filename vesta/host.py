"""The host's side of jobs: admit or refuse an offer, run it, report progress and the result.

An Offer is checked in order (exec policy, the peer's borrow cap, lending hours, memory, capacity),
then run (cpu and mem in a worker thread, exec through ``hostexec``: limits, the job user, the sandbox)
with a Progress heartbeat every ``HEARTBEAT`` seconds and one Result; a Cancel, a dropped link or the
end of the lending hours stops it. Every run is recorded and charged to the peer in the ledger. A
refusal is a ``Refused`` exception until ``HostedRun.serve`` turns it into the wire's Refuse.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vesta import artifacts, proto, rundir
from vesta.errors import PeerUnavailable, Refused, VestaError
from vesta.hostexec import ExecRunner, LocalRun, Prepared, RemoteFiles
from vesta.hours import LendingHours
from vesta.inputcache import NOT_KEPT, InputCache, Key
from vesta.ledger import Ledger
from vesta.records import Records
from vesta.spec import STORED, ExecSpec, FileInfo, MemSpec
from vesta.tasks import StopFlag, cancel_all, spawn
from vesta.wire import Channel
from vesta.workloads import is_inline, run_builtin, run_inline

log = logging.getLogger(__name__)

HEARTBEAT = 0.5          # seconds between Progress messages from a host
MEM_EXTRA_SLOTS = 2      # mem chunks mostly sleep: a node may hold this many beyond its cpu slots
LINK_DROPPED = "link to the submitter dropped"


class Host:
    """Admits and runs chunks offered by peers (and by this node's own Submitter, in-process)."""

    def __init__(self, *, name: str, counters: Counter[str], capacity: Callable[[], tuple[int, int]],
                 events: Callable[[str, str], None], runner: ExecRunner | None = None,
                 ledger: Ledger | None = None, hours: LendingHours | None = None,
                 on_ledger: Callable[[], None] = lambda: None, records: Records | None = None,
                 input_cap_mib: int = 256, cache: InputCache | None = None) -> None:
        self.name = name
        self.cache = cache                # inputs kept for a sweep's next jobs (a shared --put)
        self.runner = runner              # exec machinery; None: this node does not allow exec
        self.input_cap = input_cap_mib << 20
        self.records = records
        self.ledger = ledger
        self.hours = hours
        self.on_ledger = on_ledger
        self.counters = counters
        self.capacity = capacity          # () -> (cpu slots for peers now, offered MiB)
        self.events = events
        self.running: dict[tuple[str, int], HostedRun] = {}
        self._peak = 0   # most chunks running at once since take_peak(): they are in the CPU sample too
        self.own_running = 0   # chunks of this node's own jobs running here (run_local)
        self._own_peak = 0
        # (name a submitter claims, its authenticated fingerprint) -> how records and the ledger show it
        self.shown: Callable[[str, str], str] = lambda name, fp: name or fp[:8]

    @property
    def lent_running(self) -> int:
        return len(self.running)

    def take_peak(self) -> int:
        """Most chunks lent at once since the last call (one call per CPU sample window)."""
        peak, self._peak = max(self._peak, len(self.running)), len(self.running)
        return peak

    def take_own_peak(self) -> int:
        """Most chunks of this node's own jobs run here at once since the last call."""
        peak, self._own_peak = max(self._own_peak, self.own_running), self.own_running
        return peak

    def admit(self, offer: proto.Offer, peer: str | None = None) -> Refused | None:
        """Exec policy, the peer's borrow cap, lending hours, memory, capacity: the first that says no.
        ``peer`` is the submitter's fingerprint; None for this node's own work (no cap, no hours)."""
        slots, mem_mb = self.capacity()
        spec = offer.spec
        if isinstance(spec, ExecSpec):
            if self.runner is None:
                return Refused(f"{self.name} does not allow exec (start it with -allow-exec)", "exec_disabled")
            total = sum(i.size for i in spec.inputs)
            if total > self.input_cap:
                return Refused(f"{self.name} takes at most {self.input_cap >> 20} MiB of input files per job "
                               f"({total / (1 << 20):.1f} MiB sent; exec_max_input_mb)", "policy")
            if spec.mem_mib > self.runner.mem_mib:
                return Refused(f"{self.name} gives exec jobs at most {self.runner.mem_mib} MiB "
                               f"({spec.mem_mib} MiB asked)", "memory")
        if peer is not None and self.records is not None and self.records.read_only:   # a run must be on record
            return Refused(f"{self.name} has no room in its state directory", "busy")
        if peer is not None and self.ledger is not None:
            ok, why = self.ledger.admits(peer)
            if not ok:
                return Refused(why[: proto.MAX_REASON], "ledger")
        if peer is not None and self.hours is not None and not self.hours.is_open():
            return Refused(f"{self.name} lends only in its agreed hours: {self.hours.describe()}", "hours")
        if peer is None:
            return None  # the owner's own work: what this node lends (and when) does not bind it
        if isinstance(spec, MemSpec):
            held = sum(h.offer.spec.mib for h in self.running.values() if isinstance(h.offer.spec, MemSpec))
            if held + spec.mib > mem_mb:
                return Refused(f"{self.name} offers {mem_mb} MiB ({held} MiB already lent), {spec.mib} MiB asked",
                               "memory")
            if self.lent_running >= max(slots, 1) + MEM_EXTRA_SLOTS:
                return Refused(f"{self.name} is busy", "capacity")
            return None
        if self.lent_running >= slots:
            return Refused(f"{self.name} is busy ({self.lent_running} chunks running, {slots} slots offered now)",
                           "capacity")
        return None

    def screen(self, offer: proto.Offer, peer: str | None = None) -> Prepared | None:
        """Policy first (exec off, program not allowed), then memory and capacity: a program that is
        not allowed is refused as such however busy the node is. Raises Refused; an admitted exec gets
        its prepared run, other admitted offers get None."""
        if isinstance(offer.spec, ExecSpec) and self.runner is not None:
            prepared = self.runner.prepare(offer)
            refusal = self.admit(offer, peer)
            if refusal is not None:
                self.runner.release(prepared)
                raise refusal
            return prepared
        refusal = self.admit(offer, peer)
        if refusal is not None:
            raise refusal
        return None

    async def run_local(self, offer: proto.Offer, run: LocalRun) -> proto.Result:
        """A chunk of this node's own job, run here without a link (same admission rules for exec)."""
        self.own_running += 1
        self._own_peak = max(self._own_peak, self.own_running)
        try:
            return await self._run_own(offer, run)
        finally:
            self.own_running -= 1

    def run_now(self, offer: proto.Offer, run: LocalRun) -> proto.Result | None:
        """A chunk of this node's own job that is done on the spot, on the event loop (a tiny cpu chunk, see
        ``workloads.is_inline``); None for any other, which goes through ``run_local``."""
        if not is_inline(offer):
            return None
        self._own_peak = max(self._own_peak, self.own_running + 1)
        run.started()
        return run_inline(offer, run.cancel, self.name, run.progress)

    async def _run_own(self, offer: proto.Offer, run: LocalRun) -> proto.Result:
        if not isinstance(offer.spec, ExecSpec):
            run.started()
            return await run_builtin(offer, run.cancel, self.name, run.progress)
        prepared = self.screen(offer)
        assert prepared is not None and self.runner is not None   # screen() prepares every admitted exec offer
        run.started()
        return await self.runner.run(offer, prepared, run.cancel, run.output, run.files)

    async def serve_offer(self, offer: proto.Offer, channel: Channel) -> None:
        """A peer's offer, from its screening to its Result."""
        key = (channel.peer_fingerprint, offer.rid)
        try:
            if key in self.running:  # a peer reusing a live rid must not hide work from the capacity count
                raise Refused("request id already in use", "invalid")
            prepared = self.screen(offer, channel.peer_fingerprint)
        except Refused as exc:   # the one place a refusal becomes a wire message
            self.counters["offers_refused"] += 1
            if exc.reason != "invalid":
                who = self.shown(offer.submitter, channel.peer_fingerprint)
                self.events("refused", f"refused {offer.kind} from {who}: {exc.reason} ({exc})")
            await channel.send(proto.Refuse(rid=offer.rid, reason=exc.reason, message=str(exc)[: proto.MAX_REASON]))
            return
        hosted = HostedRun(self, offer, channel, prepared)
        self.running[key] = hosted
        self._peak = max(self._peak, len(self.running))
        try:
            await hosted.serve()
        finally:
            if self.running.get(key) is hosted:
                del self.running[key]
            await hosted.close()

    def receive(self, peer: str, piece: proto.FileChunk) -> None:
        """A piece of an input file for a run this node hosts (ignored when no run waits for it)."""
        hosted = self.running.get((peer, piece.rid))
        if hosted is None or hosted.sink is None:
            self.counters["file_chunks_unexpected"] += 1
            return
        self.counters["input_bytes_received"] += len(piece.data)
        hosted.sink.feed(piece)
        hosted.inputs_changed.set()
        key = hosted.receiving.get(piece.path) if piece.eof else None
        if key is not None:
            info = hosted.sink.files.get(piece.path)
            ok = False
            if info is not None and info.state == STORED and self.cache is not None:
                # Now, before the job can start and write to it (it was checked as it arrived): a copy in the
                # kernel (copy_file_range), once per node and sweep, on the event loop.
                ok = self.cache.keep(key, hosted.sink_dest / piece.path, info.size)
                if ok:
                    self.cache.kept(key, info.size)
            hosted.received(piece.path, ok)

    def flows(self, me: str) -> list[dict[str, Any]]:
        """Chunks this node runs for peers, grouped by peer: the flows where we lend."""
        now = time.time()
        grouped: dict[tuple[str, str, str], dict[str, Any]] = {}
        for h in self.running.values():
            key = (h.peer, h.offer.job_id, h.offer.kind)
            f = grouped.setdefault(key, {"from": me, "to": h.peer, "job_id": h.offer.job_id, "kind": h.offer.kind,
                                         "chunks": 0, "done": 0, "rate": 0.0})
            f["chunks"] += 1
            f["done"] += h.done
            f["rate"] += h.done / max(now - h.started, 1e-3)
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


@dataclass
class HostedRun:
    """A chunk this node runs for a peer: its state from the Accept to its record's end."""

    host: Host
    offer: proto.Offer
    channel: Channel
    prepared: Prepared | None               # exec: its working directory and program
    cancel: StopFlag = field(default_factory=StopFlag)
    started: float = field(default_factory=time.time)
    done: int = 0                           # iterations done so far (Progress)
    stop_reason: str = ""
    sink: artifacts.Sink | None = None      # exec: where its inputs are being received
    inputs_changed: asyncio.Event = field(default_factory=asyncio.Event)
    run_id: int | None = None               # its row in the records
    ended: tuple[str, str, int | None, float] = ("failed", LINK_DROPPED, None, 0.0)   # state, reason, exit, cpu
    work: asyncio.Future[proto.Result] | None = None
    receiving: dict[str, Key] = field(default_factory=dict)   # inputs this run receives for the sweep's cache
    promised: set[asyncio.Task[Any]] = field(default_factory=set)   # inputs another run of the sweep receives

    def __post_init__(self) -> None:
        spec = self.offer.spec
        if self.prepared is not None and isinstance(spec, ExecSpec) and spec.inputs:
            # ready before the Accept: the inputs follow it at once
            self.sink = artifacts.Sink(self.prepared.workdir, cap=sum(i.size for i in spec.inputs),
                                       expect=spec.inputs)

    @property
    def sink_dest(self) -> Path:
        assert self.prepared is not None
        return self.prepared.workdir

    async def cached_inputs(self) -> tuple[str, ...]:
        """The inputs of a sweep's job this node has kept (copied into the run now) or is receiving for another
        run of the sweep (copied in when they are here): their digests go in the Accept, and are not sent."""
        spec, host, sink = self.offer.spec, self.host, self.sink
        if not isinstance(spec, ExecSpec) or not spec.share or sink is None or host.cache is None:
            return ()
        cache, peer = host.cache, self.channel.peer_fingerprint
        cache.touch(peer, spec.share)
        have = []
        for info in spec.inputs[: spec.shared]:
            key: Key = (peer, spec.share, info.sha256)
            if cache.has(key, info.size):
                cache.used_now(key)
                if await asyncio.to_thread(cache.fetch, key, info, self.sink_dest):
                    sink.adopt(info)
                    host.counters["input_cache_hits"] += 1
                    host.counters["input_bytes_not_sent"] += info.size
                    have.append(info.sha256)
                    continue
            pending = cache.pending.get(key)
            if pending is not None and not pending.done():
                spawn(self._when_kept(pending, key, info), "promised-input", self.promised)
                host.counters["input_cache_hits"] += 1
                host.counters["input_bytes_not_sent"] += info.size
                have.append(info.sha256)
            elif info.path not in self.receiving:
                cache.pending[key] = asyncio.get_running_loop().create_future()
                self.receiving[info.path] = key
        return tuple(have)

    async def _when_kept(self, pending: asyncio.Future[bool], key: Key, info: FileInfo) -> None:
        ok = await asyncio.shield(pending)
        assert self.host.cache is not None
        if ok and self.sink is not None:
            ok = await asyncio.to_thread(self.host.cache.fetch, key, info, self.sink_dest)
        if self.sink is None:
            return   # the run ended meanwhile
        if ok:
            self.sink.adopt(info)
        else:
            self.sink.fail(info.path, NOT_KEPT)
        self.inputs_changed.set()

    def received(self, path: str, ok: bool) -> None:
        """An input this run received for the sweep's cache is kept there (or could not be)."""
        key = self.receiving.pop(path, None)
        cache = self.host.cache
        if key is None or cache is None:
            return
        pending = cache.pending.pop(key, None)
        if pending is not None and not pending.done():
            pending.set_result(ok)

    @property
    def peer(self) -> str:
        return self.host.shown(self.offer.submitter, self.channel.peer_fingerprint)

    def stop(self, reason: str = "") -> None:
        """Stop the run, wherever it is: waiting for its inputs (woken at once), running, or in a thread."""
        if reason:
            self.stop_reason = reason
        self.cancel.set()
        self.inputs_changed.set()

    def progress(self, n: int) -> None:
        self.done += n

    async def output(self, stream: str, data: bytes) -> None:
        await self.channel.send(proto.Output(rid=self.offer.rid, stream=stream, data=data))

    async def serve(self) -> None:
        offer, host = self.offer, self.host
        inline = self.prepared is None and is_inline(offer)
        if not inline:   # an inline run is written once, start and end together, just after its answer goes out
            self._record_start()
        host.counters["offers_accepted"] += 1
        try:
            if inline:   # done in microseconds: Accept and Result leave together, one wake-up for the submitter
                await self._serve_inline()
                return
            have = await self.cached_inputs()
            await self.channel.send(proto.Accept(rid=offer.rid, node=host.name, have=have))
            result = await self._run()
            result, self.ended = self._ending(result)
            await self.channel.send(result)
        except PeerUnavailable:
            self.stop()

    async def _serve_inline(self) -> None:
        result = run_inline(self.offer, self.cancel, self.host.name, self.progress)
        assert result is not None
        self._charge(result)
        self.ended = self._ending(result)[1]
        try:
            await self.channel.send(proto.Accept(rid=self.offer.rid, node=self.host.name), result)
        finally:
            self._record_start(defer=True)   # after the answer: the records are off the submitter's wait
            self._record_end()

    async def _run(self) -> proto.Result:
        """Run the chunk with a Progress heartbeat; charged for what it used, however it ends."""
        host, offer = self.host, self.offer
        if self.prepared is not None:
            assert host.runner is not None
            work = host.runner.run(offer, self.prepared, self.cancel, self.output,
                                   RemoteFiles(self, self.channel), remove=False)
        else:
            work = run_builtin(offer, self.cancel, host.name, self.progress)
        self.work = asyncio.ensure_future(work)
        try:
            while not self.work.done():
                await asyncio.wait([self.work], timeout=HEARTBEAT)
                if not self.work.done():
                    await self.channel.send(proto.Progress(rid=offer.rid, done=self.done))
            return await self.work
        except BaseException:
            self.stop()   # link dropped or daemon stopping
            raise
        finally:
            if self.work.done() and not self.work.cancelled() and self.work.exception() is None:
                self._charge(self.work.result())

    def _ending(self, result: proto.Result) -> tuple[proto.Result, tuple[str, str, int | None, float]]:
        """The result to send (naming why the host stopped it, if it did) and how the run ended, for the records."""
        if self.stop_reason and not result.ok:
            result = dataclasses.replace(result, error=self.stop_reason)
        ok = result.ok and (not isinstance(self.offer.spec, ExecSpec) or result.exit_code == 0)
        return result, ("succeeded" if ok else "cancelled" if "cancel" in result.error else "failed",
                        result.error, result.exit_code, result.cpu_s)

    async def close(self) -> None:
        """After the run left the table: its inputs closed, its record ended, its directory removed. A run still
        going (stopped mid-run: it ends on its cancel) does that when it ends."""
        if self.sink is not None:
            self.sink.finish()
        for path in list(self.receiving):   # promised to other runs, never here whole: they are told
            self.received(path, False)
        await cancel_all(self.promised)
        if self.work is not None and not self.work.done():
            self.work.add_done_callback(self._ended_late)
            return
        self._record_end()
        if self.prepared is not None:
            ExecRunner.forget(self.prepared)   # a warm runner it never got to use
        if self.prepared is not None and not self._keep_runs:   # after the Result is sent: off the submitter's wait
            await asyncio.to_thread(rundir.remove_workdir, self.prepared.workdir)

    @property
    def _keep_runs(self) -> bool:
        return self.host.runner is not None and self.host.runner.keep_runs

    def _ended_late(self, work: asyncio.Future[proto.Result]) -> None:
        """The run outlived its link (or the daemon is stopping): what it used is still lent, and recorded."""
        if not work.cancelled() and work.exception() is None:
            r = work.result()
            self._charge(r)
            self.ended = (self.ended[0], self.ended[1], r.exit_code, r.cpu_s)
        self._record_end()
        if self.prepared is not None and not self._keep_runs:
            _remove_soon(self.prepared.workdir)

    def _charge(self, r: proto.Result) -> None:
        host, spec = self.host, self.offer.spec
        if host.ledger is not None:
            host.ledger.record_lent(self.channel.peer_fingerprint, self.peer, r.cpu_s,
                                    spec.mib * r.elapsed_s if isinstance(spec, MemSpec) else 0.0)
            host.on_ledger()

    def _record_start(self, defer: bool = False) -> None:
        records = self.host.records
        if records is None:
            return
        args: dict[str, Any] = self.offer.spec.to_wire()
        if isinstance(self.offer.spec, ExecSpec):
            args["inputs"] = [i.path for i in self.offer.spec.inputs]
            if self.prepared is not None and self._keep_runs:
                args["workdir"] = str(self.prepared.workdir)
        else:
            args |= {"start": self.offer.start, "count": self.offer.count} if self.offer.kind == "cpu" else {}
        try:
            self.run_id = records.start_hosted(job_id=self.offer.job_id, chunk=self.offer.chunk, peer=self.peer,
                                               peer_fp=self.channel.peer_fingerprint, kind=self.offer.kind,
                                               args=args, started=self.started, defer=defer)
        except VestaError as exc:   # the run still goes ahead: the records are not worth a peer's work
            log.warning("could not record hosted run of job %s: %s", self.offer.job_id, exc)

    def _record_end(self) -> None:
        records = self.host.records
        if records is None or self.run_id is None:
            return
        (state, reason, code, cpu_s), run_id, self.run_id = self.ended, self.run_id, None
        try:
            records.finish_hosted(run_id, state=state, finished=time.time(), cpu_s=cpu_s, exit_code=code,
                                  reason=reason[:500])
        except VestaError as exc:
            log.warning("could not record hosted run %s: %s", run_id, exc)


def _remove_soon(workdir: Any) -> None:
    """Remove a working directory in a worker thread, or here if the loop can no longer start one."""
    try:
        asyncio.get_running_loop().run_in_executor(None, rundir.remove_workdir, workdir)
    except RuntimeError:
        rundir.remove_workdir(workdir)
