"""vestad's control operations: one ``_op_NAME(args, emit)`` per request of the ``vesta`` CLI.

``ControlOps`` is given the parts it uses when the daemon starts, and ``dispatch`` serves one request
from the control socket (``controlserver``). A job request is a ``spec.JobRequest``, checked by its own
``from_wire``; other arguments are checked here. Every error is a class of ``errors``, whose name travels
back with its one-line message so the client raises the same class (and the CLI exits with its code).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from vesta import __version__, outcome, proto
from vesta.capacity import Capacity
from vesta.config import Config
from vesta.crypto import FederationKeys
from vesta.errors import ConfigError, JobFailed, NotFound, PeerUnavailable, StateFull, VestaError
from vesta.host import Host
from vesta.identity import Identity
from vesta.jobqueue import ExecQueue, stage_inputs
from vesta.ledger import Ledger
from vesta.link import LinkPool
from vesta.peertable import Peer, PeerTable
from vesta.records import Records
from vesta.retention import Pruner
from vesta.spec import JobRequest
from vesta.submitter import Emit, Submitter, new_job_id
from vesta.sweep import Sweeps, is_sweep_id
from vesta.sweepspec import SweepSpec
from vesta.tasks import spawn

log = logging.getLogger(__name__)

PING_TIMEOUT = 5.0
RECORDS_TIMEOUT = 5.0         # a member that does not answer `vesta jobs --all` in time is listed unreachable


@dataclass(frozen=True, slots=True)
class Event:
    ts: float
    kind: str
    text: str


class ControlOps:
    """The control operations of one daemon, over the parts it was given."""

    def __init__(self, *, cfg: Config, identity: Identity, keys: FederationKeys, counters: Counter[str],
                 events: deque[Event], table: PeerTable, pool: LinkPool, capacity: Capacity, host: Host,
                 ledger: Ledger, records: Records, submitter: Submitter, queue: ExecQueue, sweeps: Sweeps,
                 isolation: Callable[[], str], started_wall: float, metrics: Callable[[], str] = lambda: "",
                 pruner: Pruner | None = None) -> None:
        self.cfg = cfg
        self.identity = identity
        self.keys = keys
        self.counters = counters
        self.events = events
        self.table = table
        self.pool = pool
        self.capacity = capacity
        self.host = host
        self.ledger = ledger
        self.records = records
        self.submitter = submitter
        self.queue = queue
        self.sweeps = sweeps
        self.isolation = isolation
        self.started_wall = started_wall
        self.metrics = metrics   # () -> the address the metrics endpoint serves on, "" when off
        self.pruner = pruner     # retention: vesta gc
        self.tasks: set[asyncio.Task[Any]] = set()   # detached jobs: cancelled when the daemon stops
        self._ops = self.ops()

    def event(self, kind: str, text: str) -> None:
        self.events.append(Event(time.time(), kind, text))

    async def dispatch(self, request: Any, emit: Emit) -> dict[str, Any]:
        """Serve one control request: ``{"op", "args"}`` -> ``{"ok", "result"}`` or ``{"ok": false, "error",
        "type"}`` (the error's class in ``errors``)."""
        try:
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise ConfigError("request must be a map with an 'op'")
            op = self._ops.get(request["op"])
            if op is None:
                raise ConfigError(f"unknown op {request['op']!r} (daemon version {__version__})")
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise ConfigError("args must be a map")
            return {"ok": True, "result": await op(args, emit)}
        except VestaError as exc:
            return {"ok": False, "error": str(exc), "type": type(exc).__name__}
        except Exception as exc:   # a bug of ours: the client still gets an answer, the log the traceback
            log.exception("control request %r failed inside vestad", request.get("op") if isinstance(request, dict)
                          else request)
            return {"ok": False, "error": f"internal error in vestad: {type(exc).__name__}: {exc}"[:500],
                    "type": "VestaError"}

    def room(self) -> None:
        """A job needs room in the state directory for its records (and files): refused at once without."""
        if self.records.read_only:
            raise StateFull(f"no room for this job's records: {self.records.room_hint()}")

    def shown(self, peer: Peer) -> str:
        """The peer's name as this node shows it: ``NAME``, or ``NAME~fp8`` when the name is bound to another
        identity (names.py)."""
        return self.capacity.shown(peer.name, peer.fingerprint)

    def find_peer(self, node: str) -> Peer:
        """A peer by its shown name (``NAME`` or ``NAME~fp8``) or fingerprint (prefix of 8 or more hex
        characters). A name alone never picks an identity it is not bound to."""
        matches = [p for p in self.table.all() if self.shown(p) == node]
        if not matches and len(node) >= 8:
            matches = [p for p in self.table.all() if p.fingerprint.startswith(node.lower())]
        if len(matches) != 1:
            known = ", ".join(sorted(self.shown(p) for p in self.table.all())) or "none yet"
            raise NotFound(f"no peer named {node!r} (known: {known}); see `vesta peers`")
        return matches[0]

    def ops(self) -> dict[str, Callable[[dict[str, Any], Emit], Awaitable[Any]]]:
        """Request name -> operation."""
        return {
            "status": self._op_status, "peers": self._op_peers, "ping": self._op_ping, "events": self._op_events,
            "cpu": self._op_cpu, "mem": self._op_mem, "exec": self._op_exec, "stress": self._op_stress,
            "stop-stress": self._op_stop_stress, "cancel": self._op_cancel, "snapshot": self._op_snapshot,
            "ledger": self._op_ledger, "jobs": self._op_jobs, "show": self._op_show, "logs": self._op_logs,
            "artifacts": self._op_artifacts, "link-rerun": self._op_link_rerun, "map": self._op_map,
            "sweep": self._op_sweep, "gc": self._op_gc,
        }

    async def _op_status(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        cfg = self.cfg
        status = self.capacity.node_status()
        mode, info = self.capacity.power()
        alive = len(self.table.alive())
        accounts = self.ledger.rows()
        return {
            "name": cfg.name,
            "fingerprint": self.identity.fingerprint,
            "key_id": self.keys.key_id,
            "version": __version__,
            "pid": os.getpid(),
            "bind": cfg.bind,
            "port": self.capacity.port,
            "dport": cfg.dport,
            "advertise": status.host,
            "seeds": list(cfg.seeds),
            "socket": str(cfg.control_socket),
            "metrics": self.metrics(),
            "state_dir": str(cfg.state_dir),
            "identity_file": str(self.identity.path),
            "started": self.started_wall,
            "uptime_s": time.monotonic() - self.capacity.started,
            "beacon_interval_ms": cfg.advertise_spare_ms,
            "node": status.to_wire(),
            "power": {"mode": mode.mode, "willingness": mode.willingness, "forced": mode.forced,
                      "setting": cfg.power, "ac_online": info.ac_online, "battery_pct": info.battery_pct,
                      "battery_status": info.battery_status, "battery_min_pct": cfg.battery_min_pct},
            "budget": {"cores": self.capacity.cores, "offered_cores": status.offered_cores,
                       "spare_cores": status.spare_cores, "offered_mem_mb": status.offered_mem_mb,
                       "cpu_offer_pct": cfg.cpu_offer_pct, "reserve_pct": cfg.reserve_pct,
                       "mem_offer_mb": cfg.mem_offer_mb, "spill_cpu_pct": cfg.spill_cpu_pct,
                       "max_borrow_ratio": cfg.max_borrow_ratio},
            "allow_exec": cfg.allow_exec,
            "isolation": self.isolation(),
            "warm_runners": self.host.runner.warm_status() if self.host.runner is not None else {},
            "exec_allowlist": list(cfg.exec_allowlist),
            "exec_code_runners": (self.host.runner.allowlist.code_runners()
                                  if self.host.runner is not None and self.host.runner.allowlist is not None
                                  and cfg.allow_exec and cfg.exec_allowlist else []),
            "peers": {"alive": alive, "suspect": len(self.table) - alive},
            "jobs": [{"job_id": j.job_id, "kind": j.kind, "started": j.started} for j in self.submitter.jobs.values()],
            "hosting": [{"peer": h.peer, "job_id": h.offer.job_id, "kind": h.offer.kind, "chunk": h.offer.chunk,
                         "started": h.started} for h in self.host.running.values()],
            "stress": self._stress(),
            "counters": dict(sorted(self.counters.items())),
            "lending": {"open": self.capacity.lending(),
                        "hours": list(cfg.lend_hours), "grace_s": cfg.lend_grace_s,
                        "describe": self.host.hours.describe() if self.host.hours else "always (no lend_hours set)"},
            "ledger": {"peers": len(self.ledger.accounts),
                       "lent": round(sum(r["lent"] for r in accounts), 3),
                       "borrowed": round(sum(r["borrowed"] for r in accounts), 3),
                       "goodwill_core_s": cfg.goodwill_core_s, "half_life_days": cfg.ledger_half_life_days,
                       "file": str(self.ledger.path)},
        }

    async def _op_peers(self, args: dict[str, Any], emit: Emit) -> list[dict[str, Any]]:
        now = time.monotonic()
        own = self.capacity.node_status()
        rows = [_peer_row(own, (own.host or "*", self.capacity.port), 0.0, "self")]
        for p in sorted(self.table.all(), key=self.shown):
            rows.append(_peer_row(p.status, p.addr, now - p.last_seen, "suspect" if p.suspect else "alive")
                        | {"name": self.shown(p), "claimed_name": p.name, "restarts": p.restarts, "beacons": p.beacons,
                           "balance": round(self.ledger.balance(p.fingerprint), 3),
                           "ledger_state": self.ledger.state(p.fingerprint)})
        return rows

    async def _op_ping(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        node = args.get("node")
        if not isinstance(node, str) or not node:
            raise ConfigError("ping needs a node name")
        peer = self.find_peer(node)
        t0 = time.perf_counter()
        reply = await self.pool.request(peer.fingerprint, peer.addr,
                                        lambda rid: proto.Ping(rid=rid, ts=time.time()), PING_TIMEOUT)
        rtt = (time.perf_counter() - t0) * 1000
        if not isinstance(reply, proto.Pong):
            raise PeerUnavailable(f"{self.shown(peer)} answered {type(reply).__name__} to a ping")
        return {"node": self.shown(peer), "fingerprint": peer.fingerprint, "address": f"{peer.addr[0]}:{peer.addr[1]}",
                "rtt_ms": round(rtt, 3)}

    async def _op_events(self, args: dict[str, Any], emit: Emit) -> list[dict[str, Any]]:
        limit = args.get("limit", 50)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError("limit must be a positive whole number")
        return [{"ts": e.ts, "kind": e.kind, "text": e.text} for e in list(self.events)[-limit:]]


    async def _op_jobs(self, args: dict[str, Any], emit: Emit) -> list[dict[str, Any]]:
        limit = args.get("limit", 50)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise ConfigError("--limit must be from 1 to 10000")
        hosted = bool(args.get("hosted"))
        state = _opt_str(args, "state")
        if state is not None and state not in ("queued", "running", "succeeded", "failed", "cancelled"):
            raise ConfigError(f"unknown state {state!r}: use queued, running, succeeded, failed or cancelled")
        own = self.records.hosted(limit=limit) if hosted else self.records.jobs(state=state, limit=limit)
        if not hosted:   # a sweep is one line, with its jobs counted
            own = sorted(own + [s for s in map(_sweep_row, self.records.sweeps(limit=limit))
                                if state is None or s["state"] == state],
                         key=lambda r: -(r.get("created") or 0.0))[:limit]
        if not args.get("all"):
            return own
        # Every reachable member's records, each row labelled with the node that keeps it.
        rows = [r | {"node": self.cfg.name, "node_id": self.identity.fingerprint} for r in own]
        peers = self.table.alive()

        async def ask(peer: Peer) -> list[dict[str, Any]]:
            reply = await self.pool.request(peer.fingerprint, peer.addr, lambda rid: proto.RecordsRequest(
                rid=rid, limit=min(limit, proto.MAX_RECORDS), hosted=hosted), RECORDS_TIMEOUT)
            if not isinstance(reply, proto.Records):
                raise PeerUnavailable(f"{self.shown(peer)} answered {type(reply).__name__}")
            # marked with the identity the link authenticated, never the name the answer claims
            return [dict(r) | {"node": self.shown(peer), "node_id": peer.fingerprint} for r in reply.rows]

        answers = await asyncio.gather(*(ask(p) for p in peers), return_exceptions=True)
        for peer, answer in zip(peers, answers, strict=True):
            if isinstance(answer, BaseException):
                rows.append({"node": self.shown(peer), "node_id": peer.fingerprint, "id": "-", "kind": "-",
                             "state": "unreachable", "reason": str(answer)[:200], "created": 0.0, "args": {}})
            else:
                rows.extend(r for r in answer if state is None or r.get("state") == state)
        key = "started" if hosted else "created"
        rows.sort(key=lambda r: -(r.get(key) or 0.0))
        return rows[:limit] + [r for r in rows[limit:] if r.get("state") == "unreachable"]

    def _record(self, args: dict[str, Any]) -> dict[str, Any]:
        job_id = _opt_str(args, "job_id")
        record = self.records.job(job_id) if job_id else None
        if record is None:
            raise NotFound(f"no job {job_id!r} in this node's records (see `vesta jobs`)")
        return record

    async def _op_link_rerun(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """`vesta rerun`: note that job ``job_id`` runs ``rerun_of`` again, so each record names the other."""
        new, old = self._record(args), self._record({"job_id": args.get("rerun_of")})
        self.records.link_rerun(new["id"], old["id"])
        return {"job_id": new["id"], "rerun_of": old["id"]}

    async def _op_show(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        if is_sweep_id(args.get("job_id")):
            return self.sweeps.show(args["job_id"]) | {"kind": "sweep"}
        return self._record(args)

    async def _op_map(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """`vesta map`: start a sweep; follow it to its end unless ``detach``."""
        run = await self.sweeps.start(SweepSpec.from_wire(args.get("spec")))
        if args.get("detach"):
            return run.summary() | {"detached": True}
        return await run.follow(emit)

    async def _op_sweep(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """`vesta wait SWEEP`: follow a sweep to its end (at once, for one that has ended)."""
        sweep_id = _opt_str(args, "sweep_id")
        run = self.sweeps.runs.get(sweep_id or "")
        if run is not None:
            return await run.follow(emit)
        row = self.sweeps.show(sweep_id or "")
        counts = row["counts"]
        failed = counts.get("failed", 0) + counts.get("cancelled", 0)
        total = len(SweepSpec.from_wire(row["args"]).to_run())
        done = sum(counts.values()) - counts.get("queued", 0) - counts.get("running", 0)
        return {"sweep_id": row["id"], "state": row["state"], "total": total, "done": done,
                "succeeded": counts.get("succeeded", 0), "failed": failed, "running": 0, "waiting": total - done,
                "per_node": {}, "reason": row["reason"], "created": row["created"],
                "exit_code": min(101, failed + (total - done))}

    async def _op_logs(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        record = self._record(args)
        after = args.get("after", 0)
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise ConfigError("after must be a whole number >= 0")
        data, nxt = self.records.log(record["id"], None, after)
        return {"job_id": record["id"], "data": data, "next": nxt, "state": record["state"]}

    async def _op_ledger(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return {"peers": self.ledger.rows(), "goodwill_core_s": self.cfg.goodwill_core_s,
                "max_borrow_ratio": self.cfg.max_borrow_ratio, "half_life_days": self.cfg.ledger_half_life_days,
                "file": str(self.ledger.path)}

    async def _op_snapshot(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """Everything a monitor shows, in one call: nodes, live flows, recent events."""
        rows = await self._op_peers(args, emit)
        flows = self.host.flows(self.cfg.name)
        for job in self.submitter.jobs.values():
            flows.extend(f for f in job.flows(self.cfg.name) if f["from"] != self.cfg.name)
        local = [f for job in self.submitter.jobs.values() for f in job.flows(self.cfg.name)
                 if f["from"] == self.cfg.name]
        return {
            "time": time.time(),
            "self": self.cfg.name,
            "fingerprint": self.identity.fingerprint,
            "beacon_interval_ms": self.cfg.advertise_spare_ms,
            "expire_after": self.cfg.expire_after,
            "suspect_after": self.cfg.suspect_after,
            "nodes": rows,
            "flows": flows,
            "local_work": local,
            "jobs": [{"job_id": j.job_id, "kind": j.kind, "started": j.started} for j in self.submitter.jobs.values()],
            "hosting": len(self.host.running),
            "stress": self._stress(),
            "events": [{"ts": e.ts, "kind": e.kind, "text": e.text} for e in list(self.events)[-20:]],
            "counters": {k: v for k, v in self.counters.items() if k.startswith("dropped_")},
        }

    async def _op_cpu(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        self.room()
        request = JobRequest.from_wire("cpu", args)
        return await self._job(request, self.submitter.submit(request, emit))

    async def _op_mem(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        self.room()
        request = JobRequest.from_wire("mem", args)
        return await self._job(request, self.submitter.submit(request, emit))

    async def _job(self, request: JobRequest, run: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        """Run a submitted job, with its start and end in the event feed."""
        what = f"{request.kind} {request.spec.describe()}"
        try:
            result = await run
        except JobFailed as exc:
            self.event("job_failed", f"{what}: {exc}")
            raise
        nodes = ", ".join(p["node"] for p in result.get("parts", [])) or str(result.get("node", ""))
        ended = outcome.of_result(result)
        self.event(outcome.event_kind(ended), f"{result['job_id']} {what} on {nodes} in {result['elapsed_s']:.2f}s: "
                   f"{ended}")
        return result

    async def _op_exec(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        request = JobRequest.from_wire("exec", args)
        self.room()
        if request.queue:   # a name no node ever had is refused at once (unqueued, the job fails at once)
            self.submitter.check_on(request.on)
        job_id = new_job_id()
        inputs_dir = self.queue.inputs_root / job_id
        if request.puts:
            request = request.with_inputs(await asyncio.to_thread(stage_inputs, request.puts, inputs_dir))
        if request.queue:
            self.queue.add(job_id, request, submitter=self.cfg.name, fingerprint=self.identity.fingerprint)
            if args.get("detach"):
                return {"job_id": job_id, "detached": True, "queued": True}
            return await self.queue.follow(job_id, emit)

        async def run(emit: Emit) -> dict[str, Any]:
            try:
                return await self._job(request, self.submitter.submit(request, emit, job_id=job_id,
                                                                      inputs_dir=inputs_dir))
            finally:
                if request.spec.inputs:   # type: ignore[union-attr]
                    await asyncio.to_thread(shutil.rmtree, inputs_dir, True)

        if args.get("detach"):
            # Nobody listens: the output goes to the records only, and the job outlives this request.
            async def nowhere(event: dict[str, Any]) -> None:
                return None

            async def detached() -> None:
                with contextlib.suppress(VestaError):
                    await run(nowhere)

            spawn(detached(), f"detached-{job_id}", self.tasks)
            await asyncio.sleep(0)   # registered before we answer, so `vesta wait` finds it at once
            return {"job_id": job_id, "detached": True}
        return await run(emit)

    async def _op_artifacts(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        record = self._record(args)
        return {"job_id": record["id"], "state": record["state"],
                "dir": str(self.cfg.state_dir.expanduser().resolve() / "artifacts" / record["id"]),
                "files": self.records.artifacts(record["id"])}

    async def _op_gc(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """`vesta gc`: apply keep_days and keep_artifacts_mb now (``dry_run``: say what would go)."""
        dry_run = args.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise ConfigError("dry_run must be true or false")
        if self.pruner is None:
            raise ConfigError("this vestad has no retention set up")
        return (await self.pruner.run(dry_run=dry_run)).to_json()

    async def _op_stress(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        cores, secs = args.get("cores", 0), args.get("secs")
        if isinstance(cores, bool) or not isinstance(cores, int) or not 0 <= cores <= 4096:
            raise ConfigError("stress needs a number of cores (0 = all)")
        if isinstance(secs, bool) or not isinstance(secs, (int, float)) or not 0 < secs <= 86400:
            raise ConfigError("stress needs a duration in seconds from 1 to 86400")
        n = cores or self.capacity.cores
        self.capacity.stress.start(n, float(secs))
        self.event("stress", f"stressing {n} cores for {secs:g}s")
        return {"cores": n, "secs": secs}

    def _stress(self) -> dict[str, Any]:
        stress = self.capacity.stress
        return {"active": stress.active, "cores": stress.cores if stress.active else 0}

    async def _op_stop_stress(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return {"stopped": await asyncio.to_thread(self.capacity.stress.stop)}

    async def _op_cancel(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        job_id = _opt_str(args, "job_id")
        if is_sweep_id(job_id):
            if not self.sweeps.cancel(str(job_id)):
                raise NotFound(f"no running sweep {job_id!r} here (see `vesta jobs`)")
            return {"cancelled": job_id}
        if not job_id or not (self.submitter.cancel(job_id) or self.queue.cancel(job_id)):
            running = ", ".join(self.submitter.jobs) or "none"
            raise NotFound(f"no running job {job_id!r} submitted here (running: {running})")
        return {"cancelled": job_id}


def _sweep_row(s: dict[str, Any]) -> dict[str, Any]:
    """A sweep as one line of `vesta jobs`: its command and how many jobs it has, not every input."""
    args = s.get("args") or {}
    sources = args.get("sources") or []
    total = len(args.get("seqs") or []) or (1 if sources else 0)
    if not args.get("seqs"):
        for source in sources:
            total *= len(source)
    return {"id": s["id"], "kind": "sweep", "state": s["state"], "created": s["created"], "started": s["created"],
            "finished": s["finished"], "reason": s["reason"], "exit_code": None, "result": None,
            "args": {"template": args.get("template") or [], "total": total, "counts": s["counts"]},
            "counts": s["counts"],
            "ran_on": [], "outcome": s["state"]}


def _opt_str(args: dict[str, Any], key: str) -> str | None:
    value = args.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a non-empty string")
    return value


def _peer_row(s: proto.NodeStatus, addr: tuple[str, int], age: float, state: str) -> dict[str, Any]:
    return {
        "name": s.name, "fingerprint": s.fingerprint, "address": f"{addr[0]}:{addr[1]}", "state": state,
        "cores": s.cores, "cpu_pct": s.cpu_pct, "cpu_per_core": list(s.cpu_per_core), "load1": s.load1,
        "mem_total_mb": s.mem_total_mb, "mem_avail_mb": s.mem_avail_mb, "offered_cores": s.offered_cores,
        "offered_mem_mb": s.offered_mem_mb, "spare_cores": s.spare_cores, "power": s.power,
        "willingness": s.willingness, "battery_pct": s.battery_pct, "temp_c": s.temp_c,
        "gpus": [{"name": g.name, "mem_total_mb": g.mem_total_mb, "mem_used_mb": g.mem_used_mb,
                  "util_pct": g.util_pct} for g in s.gpus],
        "labels": list(s.labels), "version": s.version, "uptime_s": s.uptime_s, "last_seen_s": round(age, 2),
        "lending": "open" if s.lending else "closed", "running": s.running,
    }
