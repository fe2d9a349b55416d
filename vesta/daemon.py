"""vestad's core: starts the parts, accepts connections, dispatches requests.

Parts: identity and keys; the sysstat sampler feeding our ``NodeStatus``;
discovery (UDP beacons) feeding the peer table; the TCP peer-link server and
an outbound ``LinkPool``; the Unix control socket for ``vesta``/``vestatop``.
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
import struct
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import msgpack

from vesta import __version__, autopilot, confine, execrun, executor, outcome, proctree, proto, sysstat
from vesta.autopilot import NodeView
from vesta.budget import PowerMode, compute_offer, power_mode
from vesta.config import Config, link_tmp_socket, unlink_tmp_socket
from vesta.crypto import derive_keys
from vesta.discovery import Discovery
from vesta.errors import ConfigError, PeerUnavailable, ProtocolError, Refused, VestaError
from vesta.host import Host, LocalRun, run_builtin
from vesta.hours import LendingHours, parse_hours
from vesta.identity import load_or_create
from vesta.jobqueue import ExecQueue
from vesta.jobs import Emit, JobFailed, Submitter
from vesta.ledger import Ledger
from vesta.link import LinkPool, serve
from vesta.ops import ControlError, ControlOps, Event
from vesta.peertable import Change, Peer, PeerTable
from vesta.records import Records
from vesta.tasks import cancel_all, spawn
from vesta.wire import Channel, pack_frame, read_frame, write_frame

log = logging.getLogger(__name__)

MAX_INBOUND = 64              # concurrent peer connections; more are closed at once
MAX_HANDSHAKING = 16          # of those, not yet authenticated: a keyless stranger cannot take every slot
MAX_HANDSHAKING_PER_IP = 4    # ... and one host cannot take the handshake slots of all the others
MAX_CONTROL_FRAME = 1 << 20   # control requests are small
GPU_POLL_S = 30.0             # GPU detection may shell out to nvidia-smi: not every beacon
MAX_EVENTS = 200
MAX_SOCKET_PATH = 107         # sun_path is 108 bytes with its terminating NUL
EVENT_HOLD_S = 0.02           # seconds a job's events wait for company: a job done sooner sends them with its answer
EVENT_HOLD_BYTES = 64 * 1024  # ... unless this much is waiting already
RECORDS_CHECKPOINT_S = 1.0    # seconds between records commits, each followed by a WAL checkpoint (in a thread)
REAP_INTERVAL_S = 0.2         # seconds between looks for dead orphans of jobs (a few /proc reads) ...
REAP_IDLE_S = 1.0             # ... and while no job runs
LEDGER_FLUSH_S = 0.5          # at most one ledger save (two fsyncs) per this: a burst of jobs is one write


class Daemon(ControlOps):
    """One vestad. ``await Daemon.start(cfg)``, then ``await daemon.stop()``."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.counters: Counter[str] = Counter()
        self.events: deque[Event] = deque(maxlen=MAX_EVENTS)
        self.table = PeerTable(cfg.suspect_after, cfg.expire_after, cfg.max_peers)
        self.started_wall = time.time()
        self.started = time.monotonic()
        # A daemon pinned with taskset lends, and measures the load of, only the cores it may use.
        total = sysstat.cpu_count(cfg.proc_root)
        self.allowed = sorted(c for c in os.sched_getaffinity(0) if c < total) or list(range(total))
        self.cores = len(self.allowed)
        self.sampler = sysstat.CpuSampler(cfg.proc_root)
        self.cpu = self.sampler.sample()
        self.hash_rate = 0.0
        self.stress = executor.Stress()
        # Programs are found where the system keeps them and beside vesta itself (so `piwork` works).
        self.allowlist = execrun.Allowlist(cfg.exec_allowlist, exec_search_path())
        self.hours = LendingHours(parse_hours(cfg.lend_hours)) if cfg.lend_hours else None
        self._closed_since: float | None = None       # when the current lending window ended
        self._ledger_dirty = asyncio.Event()
        self.ledger = Ledger(None, goodwill=cfg.goodwill_core_s, ratio=cfg.max_borrow_ratio,
                             half_life_days=cfg.ledger_half_life_days)
        self.host = Host(name=cfg.name, counters=self.counters, capacity=self._capacity, events=self._event,
                         allow_exec=cfg.allow_exec, allowlist=self.allowlist, exec_timeout=cfg.exec_timeout_s,
                         ledger=self.ledger, hours=self.hours, on_ledger=self._ledger_dirty.set,
                         exec_mem_mib=cfg.mem_offer_mb, exec_file_mib=cfg.exec_max_file_mb,
                         bwrap=shutil.which("bwrap") if cfg.sandbox != "none" else None,
                         allow_network=cfg.allow_network, input_cap_mib=cfg.exec_max_input_mb,
                         keep_runs=cfg.keep_runs,
                         hide=(cfg.state_dir.expanduser().resolve(), cfg.control_socket.parent.resolve()))
        self.gpus: tuple[sysstat.Gpu, ...] = ()
        self.port = cfg.port
        self._status: proto.NodeStatus | None = None   # refreshed every beacon round
        self._lent_in_sample = 0                        # chunks lent during the last CPU sample window
        self._tasks: set[asyncio.Task[Any]] = set()
        self._inbound: set[asyncio.Task[Any]] = set()   # peer connections (bounded by MAX_INBOUND)
        self._handshaking = 0                           # of those, not authenticated yet
        self._handshaking_from: Counter[str] = Counter()  # ... by source address
        self._control: set[asyncio.Task[Any]] = set()   # control-socket clients (same user only)
        self._stopped = asyncio.Event()
        self._stopping = False
        self._servers: list[asyncio.Server] = []
        self._socket_inode: int | None = None
        self._lock_fd = -1
        self._ops = self.ops()

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
        if cfg.sandbox == "bwrap" and self.host.bwrap is None:
            raise ConfigError("sandbox is 'bwrap' but bubblewrap is not installed: install it "
                              "(apt install bubblewrap) or set sandbox to auto")
        # Before anything below clears what a dead daemon of this node left: it must be dead.
        await self._refuse_if_running()
        self.identity = load_or_create(cfg.state_dir, cfg.name)
        self._lock_state()
        self.host.node_id = self.identity.fingerprint
        self.host.job_user = confine.job_identity(cfg.exec_user)
        killed = await asyncio.to_thread(proctree.kill_leftovers, self.identity.fingerprint,
                                         {os.geteuid(), *([self.host.job_user[0]] if self.host.job_user else [])})
        if killed:
            log.warning("killed %d processes of jobs left running when this node's vestad died", killed)
        runs = self.host.runs = execrun.runs_dir(cfg.name, self.identity.fingerprint)
        if runs.is_dir() and not runs.is_symlink() and runs.stat().st_uid == os.geteuid() and not cfg.keep_runs:
            await asyncio.to_thread(execrun.remove_workdir, runs)   # runs of a daemon that died: none runs now
        for stale in (cfg.state_dir / "artifacts").glob(".vesta-incoming-*"):   # a transfer cut by a crash
            await asyncio.to_thread(shutil.rmtree, stale, True)
        self.host.max_procs = cfg.exec_max_procs
        self.host.prlimit = shutil.which("prlimit", path=execrun.SAFE_PATH)
        if self.host.job_user is not None and (self.host.bwrap is not None or self.host.prlimit is not None):
            self.host.setpriv = confine.find_setpriv()
        loaded = Ledger.load(cfg.state_dir / f"vestad-ledger-{cfg.name}.json", goodwill=cfg.goodwill_core_s,
                             ratio=cfg.max_borrow_ratio, half_life_days=cfg.ledger_half_life_days)
        self.ledger.path, self.ledger.accounts = loaded.path, loaded.accounts
        self.keys = await asyncio.to_thread(derive_keys, cfg.key)
        self.pool = LinkPool(self.keys, self.identity, self.counters, cfg.handshake_timeout_s)
        self.discovery = Discovery(cfg, self.keys, self.identity, self.table, self.counters,
                                   lambda: self._status or self.node_status(), self._on_change)
        try:
            self.records = Records(cfg.state_dir / f"vestad-records-{cfg.name}.db", log_cap_bytes=cfg.log_cap_bytes,
                                   background_checkpoint=True)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the records database in {cfg.state_dir}: {exc}") from exc
        self.host.records = self.records
        self.submitter = Submitter(name=cfg.name, fingerprint=self.identity.fingerprint, pool=self.pool,
                                   table=self.table, views=self.views, spill_cpu_pct=cfg.spill_cpu_pct,
                                   counters=self.counters, run_local=self._run_local, on_borrowed=self._borrowed,
                                   on_event=self._event, records=self.records,
                                   artifacts_dir=cfg.state_dir / "artifacts", artifact_cap=cfg.artifact_max_mb << 20,
                                   max_attempts=cfg.max_attempts)
        self.queue = ExecQueue(self.submitter, self.records, cfg.state_dir / "inputs" / cfg.name,
                               self._can_place, self._queued_done)
        self.queue.forget_stale_inputs()
        try:
            server = await asyncio.start_server(self._accept_peer, cfg.bind, cfg.port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"TCP port {cfg.port} is already in use (another vestad?): "
                                  "choose another with -port") from exc
            raise ConfigError(f"cannot listen on {cfg.bind}:{cfg.port}: {exc.strerror}: "
                              "check -bind and -port") from exc
        self._servers.append(server)
        self.port = server.sockets[0].getsockname()[1]
        self.gpus = await asyncio.to_thread(sysstat.detect_gpus)
        self.hash_rate = await asyncio.to_thread(executor.measure_hash_rate, 0.1)
        try:
            await self.discovery.open()
        except OSError as exc:
            raise ConfigError(f"cannot open UDP discovery port {cfg.dport}: {exc.strerror}: "
                              "choose another with -dport (every node must use the same)") from exc
        await self._open_control()   # last: a daemon that answers there already hears beacons
        spawn(self._beacon_loop(), "beacons", self._tasks)
        spawn(self._gpu_loop(), "gpu-poll", self._tasks)
        spawn(self._ledger_loop(), "ledger-flush", self._tasks)
        spawn(self.queue.run(self.cfg.beacon_interval), "exec-queue", self._tasks)
        spawn(self._checkpoint_loop(), "records-checkpoint", self._tasks)
        if proctree.is_subreaper():   # uvloop keeps SIGCHLD for itself: look for dead orphans instead
            spawn(self._reap_loop(), "reap-strays", self._tasks)
        log.info("vestad %s up: name=%s fingerprint=%s key_id=%s tcp=%s:%d udp=%d socket=%s",
                 __version__, cfg.name, self.identity.fingerprint, self.keys.key_id, cfg.bind, self.port,
                 cfg.dport, cfg.control_socket)
        if cfg.allow_exec:
            log.warning("exec is ON: peers holding the federation key may run %s",
                        ", ".join(self.allowlist.describe()) if cfg.exec_allowlist else "ANY command")
            for entry in self.allowlist.missing:
                log.warning("exec_allowlist entry %r matches no executable file: it allows nothing", entry)
        self._event("start", f"{cfg.name} started")

    async def stop(self) -> None:
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        if hasattr(self, "discovery"):
            self.discovery.close()
        self.stress.stop()
        for server in self._servers:
            server.close()
        await cancel_all(self._tasks)
        if hasattr(self, "queue"):
            await self.queue.close()
        await cancel_all(self._inbound)
        await cancel_all(self._control)
        if hasattr(self, "pool"):
            await self.pool.close()
        if self.ledger.path is not None and self.ledger.dirty:
            try:
                self.ledger.save()
            except OSError as exc:
                log.error("could not save the ledger: %s", exc)
        if getattr(self, "records", None) is not None:
            self.records.close()
        self._remove_socket()
        if self._lock_fd >= 0:   # last: nothing of ours runs any more
            os.close(self._lock_fd)
            self._lock_fd = -1
        self._stopped.set()
        if self._socket_inode is not None:   # it was up: a start that was refused did not "stop" anything
            log.info("vestad %s stopped", self.cfg.name)

    # ------------------------------------------------------------ status

    def power(self) -> tuple[PowerMode, sysstat.PowerInfo]:
        info = sysstat.read_power(self.cfg.sys_root)
        return power_mode(self.cfg.power, info, self.cfg.battery_min_pct), info

    def cpu_pct(self) -> float:
        """Busy share of the cores this daemon may use."""
        per_core = self.cpu.per_core_pct
        if len(self.allowed) == len(per_core) or not per_core:
            return min(100.0, max(0.0, self.cpu.total_pct))
        mine = [per_core[c] for c in self.allowed if c < len(per_core)]
        return min(100.0, max(0.0, sum(mine) / len(mine))) if mine else self.cpu.total_pct

    def node_status(self) -> proto.NodeStatus:
        """Our own status, as the next beacon will carry it."""
        cfg = self.cfg
        mem = sysstat.read_meminfo(cfg.proc_root)
        mode, info = self.power()
        lending = self.hours is None or self.hours.is_open()
        offer = compute_offer(cores=self.cores, cpu_pct=self.cpu_pct(), mem_total_mb=mem.total_mb,
                              mem_avail_mb=mem.available_mb, cpu_offer_pct=cfg.cpu_offer_pct,
                              reserve_pct=cfg.reserve_pct, mem_offer_mb=cfg.mem_offer_mb,
                              willingness=mode.willingness if lending else 0.0)
        temps = [t.celsius for t in sysstat.read_thermals(cfg.sys_root)]
        host = cfg.advertise or ("" if cfg.bind in ("", "0.0.0.0") else cfg.bind)
        return proto.NodeStatus(
            name=cfg.name,
            fingerprint=self.identity.fingerprint,
            host=host,
            port=self.port,
            dport=cfg.dport,
            version=__version__,
            cores=self.cores,
            cpu_pct=round(self.cpu_pct(), 1),
            cpu_per_core=tuple(int(round(min(100.0, max(0.0, self.cpu.per_core_pct[c]))))
                               for c in self.allowed if c < len(self.cpu.per_core_pct)),
            load1=round(sysstat.read_loadavg(cfg.proc_root)[0], 2),
            mem_total_mb=mem.total_mb,
            mem_avail_mb=mem.available_mb,
            offered_cores=offer.offered_cores,
            offered_mem_mb=offer.offered_mem_mb,
            spare_cores=offer.spare_cores,
            power=mode.mode,
            willingness=round(mode.willingness, 3),
            battery_pct=info.battery_pct,
            temp_c=max(temps) if temps else None,
            gpus=tuple(proto.GpuInfo(g.name[:64], g.mem_total_mb, g.mem_used_mb, g.util_pct)
                       for g in self.gpus[: proto.MAX_GPUS]),
            labels=cfg.labels,
            uptime_s=round(time.monotonic() - self.started, 1),
            hash_rate=round(self.hash_rate, 1),
            exec_allowed=cfg.allow_exec,
            running=self.host.lent_running,
            lending=lending,
        )

    def isolation(self) -> str:
        """What exec jobs run inside, in words (for vesta status)."""
        base = "own process group, scrubbed environment, rlimits"
        if self.host.max_procs:
            base += f" (at most {self.host.max_procs} processes)"
        if self.host.job_user is not None:
            base += f"; runs as {self.cfg.exec_user} (uid {self.host.job_user[0]})"
        elif os.geteuid() == 0:
            base += "; runs as root (exec_user is empty)"
        if self.host.bwrap is None:
            return f"{base}; no sandbox (" + ("sandbox none" if self.cfg.sandbox == "none"
                                               else "bubblewrap not installed") + ")"
        net = "network allowed" if self.cfg.allow_network else "no network"
        return f"{base}; bubblewrap: system read-only, private /tmp and home, {net}"

    def _capacity(self) -> tuple[int, int]:
        """(chunks this node would run for peers now, MiB it offers): the owner's load comes first."""
        status = self._status or self.node_status()
        busy = self.cores * status.cpu_pct / 100.0
        if self.stress.active:  # the owner asked for these cores: count them before the next sample shows it
            busy = max(busy, float(min(self.stress.cores, self.cores)))
        # Our own lent chunks are in the measured load too (even one that just ended): not the owner's.
        owner_busy = max(0.0, busy - max(self.host.lent_running, self._lent_in_sample))
        headroom = self.cores * (100 - self.cfg.reserve_pct) / 100.0 - owner_busy
        slots = min(int(status.offered_cores + 0.5), int(headroom + 0.5))
        return max(0, slots), status.offered_mem_mb

    def views(self) -> list[NodeView]:
        """This node and every live peer, as routing sees them."""
        own = self._status or self.node_status()
        # Routing compares every node by mem_offer_mb and MemAvailable less the reserve; power and lending
        # hours limit what peers get, not the owner's own jobs.
        own_mem = int(max(0.0, min(float(self.cfg.mem_offer_mb),
                                   own.mem_avail_mb - own.mem_total_mb * self.cfg.reserve_pct / 100.0)))
        out = [NodeView(self.identity.fingerprint, self.cfg.name, True, own.cores, own.cpu_pct, own.spare_cores,
                        own.hash_rate, own_mem, own.exec_allowed)]
        for p in self.table.alive():
            s = p.status
            out.append(NodeView(p.fingerprint, p.name, False, s.cores, s.cpu_pct, s.spare_cores, s.hash_rate,
                                s.offered_mem_mb, s.exec_allowed, p.last_seen))
        return out

    async def _run_local(self, offer: proto.Offer, run: LocalRun) -> proto.Result:
        """A chunk of this node's own job, run here without a link (same admission rules for exec)."""
        if offer.kind != "exec":
            run.started()
            return await run_builtin(offer, run.cancel, self.cfg.name, run.progress)
        prepared = self.host.screen(offer)
        if isinstance(prepared, proto.Refuse):
            raise Refused(prepared.message, reason=prepared.reason)
        assert prepared is not None   # screen() prepares every admitted exec offer
        run.started()
        return await self.host.run_exec(offer, prepared, run.cancel, run.output, run.files)

    def _can_place(self, on: str | None) -> str:
        """Why no node that allows exec may take a queued job now (by what they advertise), or ""."""
        views = [v for v in self.views()
                 if on is None or v.name == on or (len(on) >= 8 and v.fingerprint.startswith(on))]
        if not views:
            return f"waiting for node {on} to come back"
        allowed = [v for v in views if v.exec_allowed]
        if not allowed:
            return "waiting: no node allows exec (" + ", ".join(f"{v.name}: exec off" for v in views) + ")"
        for v in allowed:
            if v.local or autopilot.slots(v, self.submitter.debits) >= 1:
                return ""
        return "waiting: every node that allows exec is busy (" + ", ".join(
            f"{v.name}: no free core" for v in allowed) + ")"

    def _queued_done(self, job_id: str, result: dict[str, Any] | None, error: BaseException | None) -> None:
        if error is not None:
            self._event("job_failed", f"{job_id} exec (queued): {error}")
        elif result is not None:
            ended = outcome.of_result(result)
            self._event(outcome.event_kind(ended), f"{job_id} exec (queued) on {result['node']} in "
                        f"{result['elapsed_s']:.2f}s: {ended}")

    async def _beacon_loop(self) -> None:
        interval = self.cfg.beacon_interval
        while True:
            self.cpu = self.sampler.sample()
            self._lent_in_sample = self.host.take_peak()
            self._check_hours()
            self._status = None
            self._status = self.node_status()
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
        self.ledger.record_borrowed(fp, name, result.cpu_s, offer.mib * result.elapsed_s if offer.kind == "mem" else 0)
        self._ledger_dirty.set()

    def _check_hours(self) -> None:
        """At a lending window's end, running work gets lend_grace_s to finish; then it is stopped and
        its submitters re-place it."""
        if self.hours is None:
            return
        if self.hours.is_open():
            self._closed_since = None
            return
        now = time.monotonic()
        if self._closed_since is None:
            self._closed_since = now
            if self.host.running:
                log.info("lending window closed; %d running chunks get %gs to finish", len(self.host.running),
                         self.cfg.lend_grace_s)
                self._event("hours", f"lending window closed; {self.hours.describe()}")
        elif now - self._closed_since > self.cfg.lend_grace_s and self.host.running:
            n = self.host.stop_all("lending hours ended")
            log.info("stopped %d chunks still running %gs after the lending window closed", n, self.cfg.lend_grace_s)

    async def _gpu_loop(self) -> None:
        while True:
            await asyncio.sleep(GPU_POLL_S)
            self.gpus = await asyncio.to_thread(sysstat.detect_gpus)

    def _on_change(self, change: Change) -> None:
        p = change.peer
        tag = f"peer={p.fingerprint[:8]} addr={p.addr[0]}:{p.addr[1]}"
        detail = f" ({change.detail})" if change.detail else ""
        level = logging.INFO if change.event in ("joined", "left", "restarted", "renamed") else logging.DEBUG
        log.log(level, "peer %s %s: %s%s", p.name, change.event, tag, detail)
        self._event(f"peer_{change.event}", f"{p.name} {change.event}{detail}")
        if change.event in ("joined", "restarted") and hasattr(self, "queue"):
            self.queue.wake.set()   # a node that may take queued work

    def _event(self, kind: str, text: str) -> None:
        self.events.append(Event(time.time(), kind, text))

    # ------------------------------------------------------------ peer links

    async def _accept_peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = str((writer.get_extra_info("peername") or ("?",))[0])
        if (self._stopping or len(self._inbound) >= MAX_INBOUND or self._handshaking >= MAX_HANDSHAKING
                or self._handshaking_from[source] >= MAX_HANDSHAKING_PER_IP):
            self.counters["tcp_rejected_busy"] += 1
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._inbound.add(task)
        self._handshaking += 1
        self._handshaking_from[source] += 1
        pending = [True]

        def authenticated() -> None:
            if pending[0]:
                pending[0] = False
                self._handshaking -= 1
                self._handshaking_from[source] -= 1
                if self._handshaking_from[source] <= 0:
                    del self._handshaking_from[source]

        try:
            await serve(reader, writer, keys=self.keys, identity=self.identity, counters=self.counters,
                        handshake_timeout=self.cfg.handshake_timeout_s, handler=self._handle_peer_msg,
                        on_authenticated=authenticated)
        except asyncio.CancelledError:
            pass  # shutting down; asyncio 3.11 would log a cancelled connection task as an error
        finally:
            authenticated()
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

    def find_peer(self, node: str) -> Peer:
        """A peer by name or fingerprint (prefix of at least 8 hex characters)."""
        peer = self.table.by_name(node)
        if peer is None and len(node) >= 8:
            matches = [p for p in self.table.all() if p.fingerprint.startswith(node.lower())]
            peer = matches[0] if len(matches) == 1 else None
        if peer is None:
            known = ", ".join(sorted(p.name for p in self.table.all())) or "none yet"
            raise ControlError(f"no peer named {node!r} (known: {known}); see `vesta peers`")
        return peer

    # ------------------------------------------------------------ control socket

    def _lock_state(self) -> None:
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
        self._lock_fd = fd

    async def _refuse_if_running(self) -> None:
        path = self.cfg.control_socket
        if path.is_socket() and not path.is_symlink() and await _socket_alive(path):
            raise ConfigError(f"a vestad named {self.cfg.name!r} is already running (socket {path}): "
                              "stop it first, or use another -name")

    async def _open_control(self) -> None:
        path = self.cfg.control_socket
        if len(str(path).encode()) > MAX_SOCKET_PATH:
            raise ConfigError(f"control socket path {path} is longer than {MAX_SOCKET_PATH} bytes: "
                              "set XDG_RUNTIME_DIR to a shorter directory, or use a shorter -name")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {path.parent}: {exc.strerror}: check XDG_RUNTIME_DIR") from exc
        if path.exists() or path.is_symlink():
            if not path.is_socket() or path.is_symlink():
                raise ConfigError(f"{path} exists and is not a socket: remove it, or use another -name")
            await self._refuse_if_running()
            path.unlink()
        old = os.umask(0o177)   # the socket is created 0600: no window where others can connect
        try:
            server = await asyncio.start_unix_server(self._serve_control, path=str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._socket_inode = path.stat().st_ino
        self._servers.append(server)
        self._tmp_link = link_tmp_socket(path, self.cfg.name)   # the seed's /tmp place, for other runtime dirs

    def _remove_socket(self) -> None:
        path = self.cfg.control_socket
        unlink_tmp_socket(getattr(self, "_tmp_link", None), path)
        with contextlib.suppress(OSError):
            if self._socket_inode is not None and path.stat().st_ino == self._socket_inode:
                path.unlink()

    async def _serve_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._control.add(task)
        try:
            if not _same_user(writer):
                self.counters["control_rejected"] += 1
                log.warning("rejected a control connection from another user")
                return
            while True:
                try:
                    request = msgpack.unpackb(await read_frame(reader, MAX_CONTROL_FRAME), raw=False)
                except (PeerUnavailable, ProtocolError):
                    return
                except (ValueError, msgpack.UnpackException):
                    await write_frame(writer, msgpack.packb({"ok": False, "error": "undecodable request"}))
                    return
                replies = _Replies(writer)
                answer = await self._dispatch(request, replies.event)
                await replies.send(msgpack.packb(answer))
        except (PeerUnavailable, asyncio.CancelledError):
            pass
        finally:
            self._control.discard(task)
            writer.close()

    async def _dispatch(self, request: Any, emit: Emit) -> dict[str, Any]:
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return {"ok": False, "error": "request must be a map with an 'op'"}
        op = self._ops.get(request["op"])
        if op is None:
            return {"ok": False, "error": f"unknown op {request['op']!r} (daemon version {__version__})"}
        args = request.get("args") or {}
        if not isinstance(args, dict):
            return {"ok": False, "error": "args must be a map"}
        try:
            return {"ok": True, "result": await op(args, emit)}
        except (VestaError, JobFailed) as exc:
            return {"ok": False, "error": str(exc), "type": type(exc).__name__}

def exec_search_path() -> str:
    """SAFE_PATH plus the directory this vesta's own commands (vestad, piwork) are installed in."""
    here = str(Path(sys.executable).parent)
    parts = execrun.SAFE_PATH.split(":")
    return ":".join(parts + ([here] if here not in parts else []))


class _Replies:
    """What one control request sends back. Events are held up to EVENT_HOLD_S and leave with the next frame:
    a quick job reaches its client in one write (each write wakes the client, ~0.2 ms of both sides' time)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.timer: asyncio.TimerHandle | None = None

    def _flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.held:
            self.writer.write(b"".join(self.held))
            self.held.clear()
            self.held_bytes = 0

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise PeerUnavailable(f"connection lost: {exc}") from exc

    async def event(self, event: dict[str, Any]) -> None:
        frame = pack_frame(msgpack.packb({"event": event}))
        self.held.append(frame)
        self.held_bytes += len(frame)
        if self.held_bytes >= EVENT_HOLD_BYTES:
            self._flush()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(EVENT_HOLD_S, self._flush)
        await self._drain()   # a client that stopped reading still slows its job down (and a gone one fails it)

    async def send(self, payload: bytes) -> None:
        self.held.append(pack_frame(payload))
        self._flush()
        await self._drain()


def _same_user(writer: asyncio.StreamWriter) -> bool:
    """SO_PEERCRED: only processes of the daemon's own user may use the control socket."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                               struct.calcsize("3i")))
    except OSError:
        return False
    return bool(uid == os.getuid())


async def _socket_alive(path: Path) -> bool:
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True
