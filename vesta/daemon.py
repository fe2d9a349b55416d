"""vestad: wires the parts of one node together and runs them until it stops.

The parts, in the order they start (each stops in reverse): the node's identity and the lock on its
state; the exec machinery (``hostexec.ExecRunner``); the ledger and the records; the capacity model
(``capacity``); the host (``host``: runs peers' chunks and this node's own); the peer table, discovery
and the link pool; the submitter (``submitter``) and the exec queue (``jobqueue``); the TCP peer server;
the control operations (``ops``) behind the control socket (``controlserver``); and the loops: beacons,
GPU polling, ledger saves, records commits, the queue, the orphan reaper. A part that fails to start
stops those already started.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import sqlite3
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from vesta import (
    __version__,
    allowlist,
    artifacts,
    cgroup,
    confine,
    controlserver,
    outcome,
    placement,
    proctree,
    proto,
    rundir,
    schema,
    sysstat,
    workloads,
)
from vesta.capacity import Capacity
from vesta.config import Config, warm_runner_count
from vesta.controlserver import ControlServer
from vesta.crypto import FederationKeys, derive_keys
from vesta.discovery import Discovery
from vesta.errors import ConfigError, VestaError
from vesta.host import Host
from vesta.hostexec import ExecRunner, describe
from vesta.hours import LendingHours, parse_hours
from vesta.identity import Identity, load_or_create
from vesta.inputcache import InputCache
from vesta.jobqueue import ExecQueue
from vesta.ledger import Ledger
from vesta.link import InboundGate, LinkPool, accept, listen
from vesta.metrics import Metrics, Sources, age, disk_use, parse_address
from vesta.names import Names
from vesta.ops import ControlOps, Event
from vesta.peertable import Change, PeerTable
from vesta.records import Records
from vesta.retention import Pruner
from vesta.submitter import Submitter
from vesta.sweep import Sweeps
from vesta.tasks import cancel_all, spawn
from vesta.wire import Channel

log = logging.getLogger(__name__)

MAX_INBOUND = 64              # the peer port's listen backlog (link.InboundGate bounds the connections)
GPU_POLL_S = 30.0             # GPU detection may shell out to nvidia-smi: not every beacon
MAX_EVENTS = 200
RECORDS_CHECKPOINT_S = 1.0    # seconds between records commits, each followed by a WAL checkpoint (in a thread)
REAP_INTERVAL_S = 0.2         # seconds between looks for dead orphans of jobs (a few /proc reads) ...
REAP_IDLE_S = 1.0             # ... and while no job runs
INPUT_CACHE_JOBS = 2          # a node keeps sweeps' shared inputs up to this many jobs' worth (exec_max_input_mb)
LEDGER_FLUSH_S = 0.5          # at most one ledger save (two fsyncs) per this: a burst of jobs is one write
GC_FIRST_S = 60.0             # retention (vesta gc) runs this long after start, once the node has settled ...
GC_EVERY_S = 86400.0          # ... and then once a day


class Daemon:
    """One vestad. ``await Daemon.start(cfg)``, then ``await daemon.stop()``."""

    identity: Identity
    keys: FederationKeys
    runner: ExecRunner
    ledger: Ledger
    records: Records
    capacity: Capacity
    host: Host
    pool: LinkPool
    discovery: Discovery
    submitter: Submitter
    queue: ExecQueue
    sweeps: Sweeps
    pruner: Pruner
    ops: ControlOps
    control: ControlServer

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.counters: Counter[str] = Counter()
        self.events: deque[Event] = deque(maxlen=MAX_EVENTS)
        self.table = PeerTable(cfg.suspect_after, cfg.expire_after, cfg.max_peers)
        self.started_wall = time.time()
        self._closed_since: float | None = None       # when the current lending window ended
        self._ledger_dirty = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._inbound: set[asyncio.Task[Any]] = set()   # peer connections (bounded by the gate)
        self.gate = InboundGate(self.counters, on_linked=self.table.mark_linked)   # who may connect (link.py)
        self._exits = contextlib.AsyncExitStack()       # what stop() undoes, newest first
        self._stopped = asyncio.Event()
        self._stopping = False

    # ------------------------------------------------------------ lifecycle

    @classmethod
    async def start(cls, cfg: Config) -> Daemon:
        self = cls(cfg)
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def _start(self) -> None:
        cfg = self.cfg
        bwrap = shutil.which("bwrap") if cfg.sandbox != "none" else None
        if cfg.sandbox == "bwrap" and bwrap is None:
            raise ConfigError("sandbox is 'bwrap' but bubblewrap is not installed: install it "
                              "(apt install bubblewrap) or set sandbox to auto")
        # Before anything below clears what a dead daemon of this node left: it must be dead.
        await controlserver.refuse_if_running(cfg.control_socket, cfg.name)
        self.identity = load_or_create(cfg.state_dir, cfg.name)
        lock_fd = self._lock_state()
        self._exits.callback(os.close, lock_fd)   # released last: nothing of ours runs any more
        self.runner = await self._exec_runner(bwrap)
        self._exits.callback(rundir.remove_if_empty, self.runner.runs)   # every run's directory is gone by then
        for stale in (cfg.state_dir / "artifacts").glob(".vesta-incoming-*"):   # a transfer cut by a crash
            await asyncio.to_thread(shutil.rmtree, stale, True)
        self.names = Names(cfg.state_dir / f"vestad-names-{cfg.name}.json", cfg.name, self.identity.fingerprint)
        self._exits.callback(self.names.save)
        self.ledger = Ledger.load(cfg.state_dir / f"vestad-ledger-{cfg.name}.json", goodwill=cfg.goodwill_core_s,
                                  ratio=cfg.max_borrow_ratio, half_life_days=cfg.ledger_half_life_days)
        self._exits.callback(self._save_ledger)
        self.keys = await asyncio.to_thread(derive_keys, cfg.key)
        try:
            self.records = Records(cfg.state_dir / f"vestad-records-{cfg.name}.db", log_cap_bytes=cfg.log_cap_bytes,
                                   background_checkpoint=True)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the records database in {cfg.state_dir}: {exc}") from exc
        self._exits.callback(self.records.close)
        if artifacts.remove_unrecorded(cfg.state_dir / "artifacts", lambda job: bool(self.records.artifacts(job))):
            log.info("removed the artifacts of jobs cut off when this node's vestad last stopped")
        listening = self._bind()
        self._exits.callback(listening.close)
        gpus = await asyncio.to_thread(sysstat.detect_gpus)
        hash_rate = await asyncio.to_thread(workloads.measure_hash_rate, 0.1)
        self._wire_jobs(Capacity(cfg, self.identity.fingerprint, lent=lambda: self.host.lent_running,
                                 hours=lambda: self.host.hours, port=listening.getsockname()[1],
                                 hash_rate=hash_rate, gpus=gpus))
        self._exits.push_async_callback(self.pool.close)
        self._exits.push_async_callback(self.queue.close)   # before the links close: its jobs send their Cancels
        server = await listen(self.gate, self._accept_peer, sock=listening)
        self._exits.push_async_callback(cancel_all, self._inbound)
        self._exits.callback(server.close)
        try:
            await self.discovery.open()
        except OSError as exc:
            raise ConfigError(f"cannot open UDP discovery port {cfg.dport}: {exc.strerror}: "
                              "choose another with -dport (every node must use the same)") from exc
        self._exits.callback(self.discovery.close)
        self._exits.push_async_callback(self.discovery.goodbye)   # before the socket closes
        if cfg.metrics:
            await self.metrics.serve(*parse_address(cfg.metrics))
            self._exits.callback(self.metrics.close)
        self.ops = ControlOps(cfg=cfg, identity=self.identity, keys=self.keys, counters=self.counters,
                              events=self.events, table=self.table, pool=self.pool, capacity=self.capacity,
                              host=self.host, ledger=self.ledger, records=self.records, submitter=self.submitter,
                              queue=self.queue, sweeps=self.sweeps,
                              isolation=lambda: describe(self.runner, cfg.exec_user, cfg.sandbox),
                              started_wall=self.started_wall, metrics=lambda: self.metrics.address,
                              pruner=self.pruner)
        self._exits.push_async_callback(cancel_all, self.ops.tasks)
        self.control = ControlServer(cfg.control_socket, cfg.name, self.ops.dispatch, self.counters)
        await self.control.open()   # last: a daemon that answers there already hears beacons
        self._exits.push_async_callback(self.control.stop)
        self._start_loops()
        self._started_log()
        self._up = True   # a start that was refused did not "stop" anything

    async def _exec_runner(self, bwrap: str | None) -> ExecRunner:
        """The exec machinery, complete; what a dead vestad of this node left running is killed first."""
        cfg = self.cfg
        job_user = confine.job_identity(cfg.exec_user)
        killed = await asyncio.to_thread(proctree.kill_leftovers, self.identity.fingerprint,
                                         {os.geteuid(), *([job_user[0]] if job_user else [])})
        if killed:
            log.warning("killed %d processes of jobs left running when this node's vestad died", killed)
        runs = rundir.runs_dir(cfg.name, self.identity.fingerprint)
        if runs.is_dir() and not runs.is_symlink() and runs.stat().st_uid == os.geteuid() and not cfg.keep_runs:
            await asyncio.to_thread(rundir.remove_workdir, runs)   # runs of a daemon that died: none runs now
        prlimit = shutil.which("prlimit", path=allowlist.SAFE_PATH)
        setpriv = (confine.find_setpriv() if job_user is not None and (bwrap is not None or prlimit is not None)
                   else None)
        cgroups, why = confine_memory(cfg.allow_exec)
        # Programs are found where the system keeps them and beside vesta itself (so `piwork` works).
        return ExecRunner(
            cgroups=cgroups, cgroups_why=why,
            name=cfg.name, node_id=self.identity.fingerprint,
            allowlist=allowlist.Allowlist(cfg.exec_allowlist, exec_search_path()), timeout_s=cfg.exec_timeout_s,
            mem_mib=cfg.mem_offer_mb, file_mib=cfg.exec_max_file_mb, max_procs=cfg.exec_max_procs, runs=runs,
            disk_mib=cfg.exec_max_disk_mb, max_files=cfg.exec_max_files,
            bwrap=bwrap, allow_network=cfg.allow_network,
            hide=(cfg.state_dir.expanduser().resolve(), cfg.control_socket.parent.resolve()),
            job_user=job_user, setpriv=setpriv, prlimit=prlimit, keep_runs=cfg.keep_runs)

    def _wire_jobs(self, capacity: Capacity) -> None:
        """The host, discovery, the link pool, the submitter and the exec queue, over the capacity model."""
        cfg = self.cfg
        hours = LendingHours(parse_hours(cfg.lend_hours)) if cfg.lend_hours else None
        self.capacity = capacity
        capacity.shown = self.names.shown   # a name shows the identity it is bound to (names.py)
        self._exits.callback(self.capacity.stress.stop)
        self.host = Host(name=cfg.name, counters=self.counters, capacity=self.capacity.slots, events=self._event,
                         runner=self.runner if cfg.allow_exec else None, ledger=self.ledger, hours=hours,
                         on_ledger=self._ledger_dirty.set, records=self.records, input_cap_mib=cfg.exec_max_input_mb,
                         cache=InputCache(cfg.state_dir / "input-cache" / cfg.name,
                                          cap=INPUT_CACHE_JOBS * (cfg.exec_max_input_mb << 20))
                         if cfg.allow_exec else None)
        self.capacity.own = lambda: self.host.own_running   # our own chunks run here are not the owner's load
        self.host.shown = self.names.shown
        # peers we linked with keep their place in the table
        self.pool = LinkPool(self.keys, self.identity, self.counters, cfg.handshake_timeout_s,
                             on_linked=self.table.mark_linked)
        self.discovery = Discovery(cfg, self.keys, self.identity, self.table, self.counters, self.capacity.current,
                                   self._on_change, on_beacon=lambda: self.submitter.refresh())
        self.metrics = Metrics(self._metric_sources())
        self.submitter = Submitter(name=cfg.name, fingerprint=self.identity.fingerprint, pool=self.pool,
                                   table=self.table, views=lambda: self.capacity.views(self.table),
                                   spill_cpu_pct=cfg.spill_cpu_pct, counters=self.counters,
                                   run_local=self.host.run_local, run_now=self.host.run_now,
                                   on_borrowed=self._borrowed, on_event=self._event,
                                   records=self.records, artifacts_dir=cfg.state_dir / "artifacts",
                                   artifact_cap=cfg.artifact_max_mb << 20, max_attempts=cfg.max_attempts,
                                   on_chunk=self.metrics.observe_chunk)
        self.queue = ExecQueue(self.submitter, self.records, cfg.state_dir / "inputs" / cfg.name,
                               self._can_place, self._queued_done)
        self.submitter.on_free = self.queue.capacity   # a chunk ended, a beacon shows spare
        self.queue.forget_stale_inputs()
        self.sweeps = Sweeps(name=cfg.name, fingerprint=self.identity.fingerprint, records=self.records,
                             queue=self.queue, submitter=self.submitter, root=cfg.state_dir / "sweeps" / cfg.name,
                             on_event=self._event)
        self.pruner = Pruner(self.records, cfg.state_dir / "artifacts", keep_days=cfg.keep_days,
                             keep_artifacts_mb=cfg.keep_artifacts_mb, counters=self.counters,
                             active=lambda: set(self.submitter.jobs))

    def _metric_sources(self) -> Sources:
        """What the metrics endpoint reports, read from the parts when a scrape comes (see ``metrics``)."""
        def capacity() -> dict[str, float]:
            s = self.capacity.current()
            return {"offered_cores": s.offered_cores, "spare_cores": s.spare_cores,
                    "busy_cores": s.cores * s.cpu_pct / 100.0, "offered_mem_b": float(s.offered_mem_mb << 20)}

        def queue() -> tuple[int, float]:
            rows = self.records.queued()
            return len(rows), age(min((r["created"] for r in rows), default=None))

        state = self.cfg.state_dir
        return Sources(
            counters=self.counters, peers=lambda: (len(self.table.alive()), len(self.table) - len(self.table.alive())),
            capacity=capacity, jobs=lambda: schema.counts(self.records.db), exec_running=lambda: sum(
                1 for h in self.host.running.values() if h.offer.kind == "exec"),
            queue=queue, ledger=self.ledger.rows,
            disk=lambda: disk_use({"records": list(state.glob(f"vestad-records-{self.cfg.name}.db*")),
                                   "artifacts": [state / "artifacts"]}))

    def _bind(self) -> socket.socket:
        """The TCP peer port, bound and listening (served once the parts that answer peers exist)."""
        cfg = self.cfg
        try:
            return socket.create_server((cfg.bind, cfg.port), backlog=MAX_INBOUND, reuse_port=False)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"TCP port {cfg.port} is already in use (another vestad?): "
                                  "choose another with -port") from exc
            raise ConfigError(f"cannot listen on {cfg.bind}:{cfg.port}: {exc.strerror}: "
                              "check -bind and -port") from exc

    def _start_loops(self) -> None:
        self._exits.push_async_callback(cancel_all, self._tasks)
        spawn(self._beacon_loop(), "beacons", self._tasks)
        spawn(self._gpu_loop(), "gpu-poll", self._tasks)
        spawn(self._ledger_loop(), "ledger-flush", self._tasks)
        if self.sweeps.resume():   # before the queue runs: a sweep follows its queued jobs from their start
            log.info("resumed the sweeps that were running when this node's vestad last stopped")
        self._exits.push_async_callback(self.sweeps.close)   # first at stop: its jobs' ends are not theirs
        spawn(self.queue.run(self.cfg.beacon_interval), "exec-queue", self._tasks)
        spawn(self._checkpoint_loop(), "records-checkpoint", self._tasks)
        spawn(self._gc_loop(), "gc", self._tasks)
        warm = warm_runner_count(self.cfg, self.capacity.cores)
        if warm:   # after the queue: nothing waits on them, they only make exec start faster
            self.runner.start_warm(warm)
            self._exits.push_async_callback(self.runner.stop_warm)
        if proctree.is_subreaper():   # uvloop keeps SIGCHLD for itself: look for dead orphans instead
            spawn(self._reap_loop(), "reap-strays", self._tasks)

    def _started_log(self) -> None:
        cfg = self.cfg
        log.info("vestad %s up: name=%s fingerprint=%s key_id=%s tcp=%s:%d udp=%d socket=%s",
                 __version__, cfg.name, self.identity.fingerprint, self.keys.key_id, cfg.bind, self.port,
                 cfg.dport, cfg.control_socket)
        if cfg.allow_exec:
            allowlist = self.runner.allowlist
            assert allowlist is not None
            log.warning("exec is ON: peers holding the federation key may run %s",
                        ", ".join(allowlist.describe()) if cfg.exec_allowlist else "ANY command")
            for entry in allowlist.missing:
                log.warning("exec_allowlist entry %r matches no executable file: it allows nothing", entry)
            if cfg.exec_allowlist and allowlist.code_runners():
                log.warning("exec_allowlist allows %s, which run code from their arguments or input files: every "
                            "holder of the federation key may run any program here",
                            ", ".join(allowlist.code_runners()))
        self._event("start", f"{cfg.name} started")

    async def stop(self) -> None:
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        await self._exits.aclose()
        self._stopped.set()
        if getattr(self, "_up", False):
            log.info("vestad %s stopped", self.cfg.name)

    def _save_ledger(self) -> None:
        if self.ledger.path is not None and self.ledger.dirty:
            try:
                self.ledger.save()
            except OSError as exc:
                log.error("could not save the ledger: %s", exc)

    # ------------------------------------------------------------ what tests and the CLI look at

    @property
    def port(self) -> int:
        return self.capacity.port

    def node_status(self) -> proto.NodeStatus:
        return self.capacity.node_status()

    def _event(self, kind: str, text: str) -> None:
        self.events.append(Event(time.time(), kind, text))

    # ------------------------------------------------------------ loops

    async def _beacon_loop(self) -> None:
        interval = self.cfg.beacon_interval
        while True:
            self.capacity.sample(self.host.take_peak(), self.host.take_own_peak())
            self.submitter.refresh()   # this node's own slots follow its load
            self.submitter.place_waiting()   # and every beacon interval the waiting jobs look at the slots again
            self._check_hours()
            try:
                await self.discovery.send_once()
            except (OSError, VestaError) as exc:  # a bad round must not end discovery
                log.warning("beacon round failed: %s", exc)
            for change in self.table.sweep():
                self._on_change(change)
            await asyncio.sleep(interval)

    async def _reap_loop(self) -> None:
        """Reap the orphans of jobs this subreaper adopted once they die (see proctree): the processes a job
        left behind are killed when it ends, and as zombies they would count against exec_user's process
        limit."""
        reaped = 0
        while True:   # often while jobs run or orphans keep dying; an idle daemon looks once a second
            await asyncio.sleep(REAP_INTERVAL_S if reaped or proctree.supervised else REAP_IDLE_S)
            reaped = proctree.reap_strays()

    async def _checkpoint_loop(self) -> None:
        """Commit the records' logged writes (one commit a second instead of two per job on the event
        loop), then checkpoint the WAL off the loop: SQLite's own checkpoint, two fsyncs inside some
        commit, stalled one job in a hundred by milliseconds (the dispatch benchmark's p99)."""
        done = self.records.commits
        while True:
            await asyncio.sleep(RECORDS_CHECKPOINT_S)
            if self.names.dirty:   # new name bindings: one write a second at most, whatever a flood binds
                await asyncio.to_thread(self.names.write, self.names.snapshot())
            if self.records.read_only:   # a full disk at start: writable again once there is room
                self.records.reopen()
                continue
            try:
                self.records.commit()
            except sqlite3.Error as exc:   # the writes stay in the write log: retried next time, replayed at start
                log.warning("records commit failed (retried later): %s", exc)
            if self.records.commits == done:
                continue
            done = self.records.commits
            try:
                await asyncio.to_thread(self.records.checkpoint)
            except sqlite3.Error as exc:
                log.warning("records checkpoint failed (retried later): %s", exc)

    async def _gc_loop(self) -> None:
        """Retention (see ``retention``): shortly after start, then once a day; a failed run waits for the next."""
        await asyncio.sleep(GC_FIRST_S)
        while True:
            try:
                await self.pruner.run()
            except (OSError, sqlite3.Error, VestaError) as exc:
                log.warning("gc failed (tried again in a day, or now with vesta gc): %s", exc)
            await asyncio.sleep(GC_EVERY_S)

    async def _ledger_loop(self) -> None:
        """Persist the ledger soon after every change (atomic replace, off the event loop).

        The first change after a quiet spell is saved at once; changes in the next LEDGER_FLUSH_S
        go out together in one save (one save per job doubled small-job dispatch time).
        """
        while True:
            await self._ledger_dirty.wait()
            self._ledger_dirty.clear()
            if self.ledger.path is None:
                continue
            try:
                await asyncio.to_thread(self.ledger.write, self.ledger.snapshot())
            except OSError as exc:
                log.error("could not save the ledger to %s: %s", self.ledger.path, exc)
                await asyncio.sleep(1.0)
            await asyncio.sleep(LEDGER_FLUSH_S)

    def _borrowed(self, fp: str, name: str, offer: proto.Offer, result: proto.Result) -> None:
        spec = offer.spec
        self.ledger.record_borrowed(fp, self.names.shown(name, fp), result.cpu_s,
                                    spec.mib * result.elapsed_s if isinstance(spec, proto.MemSpec) else 0)
        self._ledger_dirty.set()

    def _check_hours(self) -> None:
        """At a lending window's end, running work gets lend_grace_s to finish; then it is stopped and
        its submitters re-place it."""
        hours = self.host.hours
        if hours is None:
            return
        if hours.is_open():
            self._closed_since = None
            return
        now = time.monotonic()
        if self._closed_since is None:
            self._closed_since = now
            if self.host.running:
                log.info("lending window closed; %d running chunks get %gs to finish", len(self.host.running),
                         self.cfg.lend_grace_s)
                self._event("hours", f"lending window closed; {hours.describe()}")
        elif now - self._closed_since > self.cfg.lend_grace_s and self.host.running:
            n = self.host.stop_all("lending hours ended")
            log.info("stopped %d chunks still running %gs after the lending window closed", n, self.cfg.lend_grace_s)

    async def _gpu_loop(self) -> None:
        while True:
            await asyncio.sleep(GPU_POLL_S)
            self.capacity.gpus = await asyncio.to_thread(sysstat.detect_gpus)

    def _on_change(self, change: Change) -> None:
        p = change.peer
        shown = self.names.shown(p.name, p.fingerprint)   # the first identity seen with a name is bound to it
        tag = f"peer={p.fingerprint[:8]} addr={p.addr[0]}:{p.addr[1]}"
        detail = f" ({change.detail})" if change.detail else ""
        level = logging.INFO if change.event in ("joined", "left", "restarted", "renamed") else logging.DEBUG
        log.log(level, "peer %s %s: %s%s", shown, change.event, tag, detail)
        self._event(f"peer_{change.event}", f"{shown} {change.event}{detail}")
        if change.event in ("joined", "restarted", "left"):
            self.submitter.refresh()
            self.queue.capacity()   # a node that may take queued work

    def _can_place(self, on: str | None) -> str:
        """Why no node that allows exec may take a queued job now (its slots counted with the work in
        flight), or ""."""
        placer = self.submitter.placer
        views = [v for v in placer.views.values() if on is None or placement.matches(v, on)]
        if not views:
            return f"waiting for node {on} to come back"
        allowed = [v for v in views if v.exec_allowed]
        if not allowed:
            return "waiting: no node allows exec (" + ", ".join(f"{v.name}: exec off" for v in views) + ")"
        if any(placer.free(v.fingerprint) > 0 for v in allowed):
            return ""
        return "waiting: every node that allows exec is busy (" + ", ".join(
            f"{v.name}: {placer.busy(v.fingerprint)}" for v in allowed) + ")"

    def _queued_done(self, job_id: str, result: dict[str, Any] | None, error: BaseException | None) -> None:
        if error is not None:
            self._event("job_failed", f"{job_id} exec (queued): {error}")
        elif result is not None:
            ended = outcome.of_result(result)
            self._event(outcome.event_kind(ended), f"{job_id} exec (queued) on {result['node']} in "
                        f"{result['elapsed_s']:.2f}s: {ended}")

    # ------------------------------------------------------------ peer links

    async def _accept_peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._stopping:
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._inbound.add(task)
        try:
            await accept(self.gate, reader, writer, keys=self.keys, identity=self.identity, counters=self.counters,
                         handshake_timeout=self.cfg.handshake_timeout_s, handler=self._handle_peer_msg,
                         idle_timeout=self.cfg.link_idle_s, inline=(proto.FileChunk,))
        finally:
            self._inbound.discard(task)

    async def _handle_peer_msg(self, msg: proto.Message, channel: Channel) -> proto.Message | None:
        if isinstance(msg, proto.Ping):
            return proto.Pong(rid=msg.rid, ts=msg.ts, name=self.cfg.name)
        if isinstance(msg, proto.Offer):
            await self.host.serve_offer(msg, channel)
            return None
        if isinstance(msg, proto.Cancel):
            self.host.cancel(channel.peer_fingerprint, msg.rid)
            return None
        if isinstance(msg, proto.FileChunk):
            self.host.receive(channel.peer_fingerprint, msg)
            return None
        if isinstance(msg, proto.RecordsRequest):
            rows = self.records.hosted(limit=msg.limit) if msg.hosted else self.records.jobs(limit=msg.limit)
            return proto.Records(rid=msg.rid, node=self.cfg.name, rows=tuple(rows))
        rid = getattr(msg, "rid", 0)
        return proto.Error(rid=rid, reason="unsupported", message=f"{type(msg).__name__} is not a request")

    # ------------------------------------------------------------ state

    def _lock_state(self) -> int:
        """Hold a lock on this node's state for as long as the daemon runs: a second vestad of the node (the
        same state directory and name), whatever its control socket, stops here."""
        path = self.cfg.state_dir / f"vestad-{self.cfg.name}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot open {path}: {exc.strerror}: check -state-dir") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"a vestad of node {self.cfg.name!r} is already running on {self.cfg.state_dir} "
                              f"(it holds {path.name}): stop it first, or use another -state-dir") from exc
        return fd



def exec_search_path() -> str:
    """SAFE_PATH plus the directory this vesta's own commands (vestad, piwork) are installed in."""
    here = str(Path(sys.executable).parent)
    parts = allowlist.SAFE_PATH.split(":")
    return ":".join(parts + ([here] if here not in parts else []))


def confine_memory(allow_exec: bool) -> tuple[cgroup.MemoryCgroups | None, str]:
    """Exec runs' memory limits in cgroup v2 where this daemon has a usable one (``cgroup``), said at start."""
    if not allow_exec:
        return None, ""
    found, why = cgroup.MemoryCgroups.find()
    if found is not None:
        log.info("exec runs' memory is limited by cgroup v2 memory.max under %s", found.base)
    else:
        log.info("exec runs' memory is watched from /proc: no usable cgroup v2 (%s)", why)
    return found, why
