"""The host's exec machinery: how an admitted exec chunk becomes a confined process.

``ExecRunner`` is built once, complete, when the daemon starts (allowlist, sandbox, job user, limits,
where run directories go). ``prepare()`` checks the program against the allowlist and makes the run's
fresh working directory; ``run()`` puts the inputs in it (``ExecFiles``: copied on the submitting node,
received over the link on a peer), starts the program through ``execrun`` with the limits, the job
user and bubblewrap, streams its output, and ships its artifacts back. Refusals are ``Refused``
exceptions; the host turns them into a wire Refuse in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vesta import allowlist, artifacts, cgroup, confine, execrun, proctree, proto, rundir, runfiles, warm
from vesta.errors import PeerUnavailable, Refused, VestaError
from vesta.spec import ExecSpec, FileInfo
from vesta.tasks import StopFlag
from vesta.wire import Channel
from vesta.workloads import HOSTNAME

log = logging.getLogger(__name__)

INPUT_WAIT_S = 30.0       # an exec job's inputs must start arriving within this of the Accept ...
INPUT_MIN_RATE = 1 << 20  # ... and keep coming at this many bytes/s at least

OnOutput = Callable[[str, bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Prepared:
    """An admitted exec chunk, ready to run: its fresh working directory and the resolved program ("" for a
    program shipped with the job, resolved once its inputs are in), and the warm runner it was given, if any
    (whose directory ``workdir`` is)."""

    workdir: Path
    program: str
    runner: warm.WarmRunner | None = None


class ExecFiles:
    """How an exec run gets its inputs and gives back its artifacts. This base is the run on the
    submitting node itself: inputs are copied from the submitter's staged copy (checked like any
    other), artifacts go straight into the job's ``Sink``."""

    def __init__(self, inputs: tuple[FileInfo, ...] = (), source: Path | None = None,
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
        if sink is None or artifacts.no_output(workdir):
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


class Receiving(Protocol):
    """A hosted run whose inputs arrive over its link (``host.HostedRun``)."""

    sink: artifacts.Sink | None
    cancel: StopFlag
    inputs_changed: asyncio.Event


class RemoteFiles(ExecFiles):
    """A peer's exec run: inputs arrive as FileChunks on the link (``Host.receive``), artifacts go back
    the same way before the Result."""

    def __init__(self, hosted: Receiving, channel: Channel) -> None:
        super().__init__()
        self.hosted = hosted
        self.channel = channel

    async def fill(self, offer: proto.Offer, workdir: Path) -> str:
        sink = self.hosted.sink
        if sink is None:
            return ""
        spec = offer.spec
        assert isinstance(spec, ExecSpec)
        total = sum(i.size for i in spec.inputs)
        deadline = time.monotonic() + INPUT_WAIT_S + total / INPUT_MIN_RATE
        try:
            while not (sink.complete or sink.problems):
                if self.hosted.cancel.is_set():
                    return "cancelled while its inputs were arriving"
                left = deadline - time.monotonic()
                if left <= 0:
                    return f"the inputs did not arrive in time ({len(sink.files)} of {len(spec.inputs)} files)"
                self.hosted.inputs_changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self.hosted.inputs_changed.wait()
            return input_problem(sink)
        finally:
            sink.finish()
            self.hosted.sink = None

    async def ship(self, offer: proto.Offer, workdir: Path) -> None:
        if offer.output_cap <= 0 or self.hosted.cancel.is_set() or artifacts.no_output(workdir):
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
class ExecRunner:
    """Everything that shapes an exec run on this node, fixed at start."""

    name: str                                   # this node's name (results, messages)
    node_id: str = ""                           # its fingerprint, in every job's environment (VESTA_NODE_ID)
    allowlist: allowlist.Allowlist | None = None
    timeout_s: float = 3600.0                   # exec_timeout_s: a run's default and longest time
    mem_mib: int = 1024                         # mem_offer_mb: a run's default and largest address space
    file_mib: int = 1024                        # exec_max_file_mb
    disk_mib: int = 2048                        # exec_max_disk_mb: a run's files in all (runfiles)
    max_files: int = 20000                      # exec_max_files
    max_procs: int = 0
    runs: Path | None = None                    # where run directories are made (None: the system temp dir)
    bwrap: str | None = None                    # bubblewrap, when exec runs sandboxed
    allow_network: bool = False
    hide: tuple[Path, ...] = ()                 # what the sandbox empties (the daemon's state, its socket)
    job_user: tuple[int, int] | None = None     # (uid, gid) jobs run as (vestad is root), or None: ours
    setpriv: str | None = None                  # drops to job_user (inside the sandbox, where bwrap stays root)
    prlimit: str | None = None                  # sets a run's limits as a command prefix (else a preexec function)
    keep_runs: bool = False
    cgroups: cgroup.MemoryCgroups | None = None   # runs' memory limits in cgroup v2, where usable
    cgroups_why: str = ""                        # where they are, or why there are none
    shell: str | None = None                     # the POSIX shell of warm runners (dash where there is one)
    shell_nproc_flag: str = ""                   # its ulimit option for the process limit (-p in dash, -u in bash)
    pool: warm.WarmPool | None = None            # warm runners (start_warm), or None: every run starts cold

    def __post_init__(self) -> None:
        self.allowlist = self.allowlist or allowlist.Allowlist([])

    # ---------------------------------------------------------------------------------------- warm runners

    def start_warm(self, count: int) -> None:
        """Keep ``count`` warm runners ready (``warm``), more while jobs come faster than they are built."""
        self.shell = self.shell or _find_shell()
        if count <= 0:
            return
        if self.shell is None:
            log.warning("no POSIX shell in %s: exec jobs start cold (no warm runners)", allowlist.SAFE_PATH)
            return
        self.shell_nproc_flag = warm.nproc_flag(self.shell)
        if self.max_procs and not self.shell_nproc_flag:
            log.warning("%s cannot set the process limit (ulimit): exec jobs start cold (no warm runners)",
                        self.shell)
            return
        self.pool = warm.WarmPool(self._spawn_warm, self.warm_shape, count)
        self.pool.start()

    def warm_status(self) -> dict[str, int]:
        """The warm runners now (for vesta status): how many are kept, ready and being built, and what
        happened to them since the start; empty without them."""
        pool = self.pool
        if pool is None:
            return {}
        return {"base": pool.base, "kept": pool.want, "ready": len(pool.idle), "building": len(pool.building),
                **pool.counters}

    async def stop_warm(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    def warm_shape(self) -> Hashable:
        """Everything that shapes a runner: when it changes, the runners built before are dropped."""
        assert self.allowlist is not None
        return (self.bwrap, self.allow_network, self.job_user, self.setpriv, self.prlimit, self.shell,
                self.timeout_s, self.mem_mib, self.file_mib, self.disk_mib, self.max_procs, self.runs, self.hide,
                self.allowlist.entries, tuple(sorted(self.allowlist.allowed)), self.cgroups is not None)

    def _warm_expose(self) -> tuple[Path, ...]:
        """What a runner's sandbox shows of the hidden places: vesta's Python and the allowlisted programs'
        directories (a cold run shows its own program's)."""
        assert self.allowlist is not None
        return _warm_expose(python_dirs(), tuple(self.allowlist.allowed))

    def _warm_can_run(self, program: str) -> bool:
        """Whether a runner's sandbox shows ``program`` as a cold run's would: not under a path it hides, or
        under one it shows again."""
        if self.bwrap is None:
            return True
        hidden = [Path("/tmp"), Path("/home"), Path("/root"), *self.hide]
        path = Path(program)
        if any(path.is_relative_to(h) for h in self.hide):
            return False
        return not any(path.is_relative_to(h) for h in hidden) or any(
            path.is_relative_to(e) for e in self._warm_expose())

    def _spawn_warm(self, shape: Hashable) -> warm.Spawned:
        """Start one runner (in a worker thread): its directory, then the confinement chain with the shell at its
        end, reading its standard input."""
        assert self.shell is not None
        workdir = rundir.make_workdir(self.runs, "warm")
        try:
            # Still the daemon's (0700) until its job comes (_ready): a job user's process that finds it (its
            # shell's cwd) cannot reach in meanwhile.
            confine.prepare_workdir(workdir, self.job_user)
            (workdir / artifacts.OUTPUT_DIR).mkdir(mode=0o700)
            limits = confine.Limits(mem_mib=self.mem_mib, cpu_s=int(self.timeout_s) + 5, file_mib=self.file_mib,
                                    run_as=self.job_user)   # the process limit: set by its job's command
            command = self._command_for(self.shell, [self.shell, "-s"], workdir, limits, self._warm_expose())
            if isinstance(command, str):
                raise Refused(command, reason="policy")
            proc = execrun.start(command.argv, program=command.runner, cwd=workdir, env=warm.runner_env(self.node_id),
                                 preexec=command.preexec,
                                 sandbox=command.sandbox, stdin=subprocess.PIPE)
        except BaseException:
            rundir.remove_workdir(workdir)
            raise
        return warm.Spawned(proc, workdir, command.sandbox)

    def release(self, prepared: Prepared) -> None:
        """A prepared run that will not run after all (refused at admission): its runner back to the pool,
        or its directory removed."""
        if prepared.runner is not None and self.pool is not None:
            self.pool.put_back(prepared.runner)
        else:
            rundir.remove_workdir(prepared.workdir)

    @staticmethod
    def forget(prepared: Prepared) -> None:
        """A prepared run that never ran (its link went first): the runner it was given, if any, is killed;
        its directory is removed by the caller, as a cold run's."""
        if prepared.runner is not None and not prepared.runner.used:
            prepared.runner.kill()

    def prepare(self, offer: proto.Offer) -> Prepared:
        """A fresh working directory and the allowlisted program to run in it, or Refused.

        A program shipped with the job (``--put run.sh -- ./run.sh``) is in no allowlist: it may run
        only where ``exec_allowlist`` is empty (the owner allows any program); it is resolved once
        it has arrived."""
        spec = offer.spec
        assert isinstance(spec, ExecSpec) and self.allowlist is not None
        argv0 = spec.argv[0]
        deferred = "/" in argv0 and os.path.normpath(argv0) in {i.path for i in spec.inputs}
        if deferred and not self.allowlist.any:
            raise Refused(f"{argv0!r} was shipped with the job; {self.name} runs only its exec_allowlist "
                          f"({', '.join(self.allowlist.names()) or 'nothing'})", reason="not_allowed")
        relative = "/" in argv0 and not os.path.isabs(argv0)   # ./x, bin/x: found from its working directory
        try:
            program = "" if deferred or relative else self.allowlist.resolve(argv0, Path("/"))
        except Refused as exc:   # before a runner is taken: a refused program never reaches one
            reason = exc.reason if exc.reason in proto.REFUSE_REASONS else "policy"
            raise Refused(str(exc)[: proto.MAX_REASON], reason=reason) from None
        runner = self.pool.take() if self.pool is not None and (deferred or not program or
                                                                 self._warm_can_run(program)) else None
        workdir = runner.workdir if runner is not None else self._fresh_workdir(offer)
        if deferred:
            return Prepared(workdir, "", runner)
        if not program:
            try:
                program = self.allowlist.resolve(argv0, workdir)
            except Refused as exc:
                self.release(Prepared(workdir, "", runner))
                reason = exc.reason if exc.reason in proto.REFUSE_REASONS else "policy"
                raise Refused(str(exc)[: proto.MAX_REASON], reason=reason) from None
            if runner is not None and not self._warm_can_run(program):   # known only now: it runs cold
                self.release(Prepared(workdir, program, runner))   # back to the pool, untouched
                runner, workdir = None, self._fresh_workdir(offer)
        return Prepared(workdir, program, runner)

    def _fresh_workdir(self, offer: proto.Offer) -> Path:
        try:
            return rundir.make_workdir(self.runs, offer.job_id)
        except (OSError, Refused) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise Refused(f"{self.name} cannot make a working directory: {why}"[: proto.MAX_REASON],
                          reason="policy") from None

    def limits(self, spec: ExecSpec) -> confine.Limits:
        timeout = spec.timeout_s or self.timeout_s
        return confine.Limits(mem_mib=spec.mem_mib or self.mem_mib, cpu_s=int(timeout) + 5,
                              file_mib=self.file_mib, procs=self.max_procs, run_as=self.job_user)

    def _failed(self, offer: proto.Offer, why: str) -> proto.Result:
        return proto.Result(rid=offer.rid, ok=False, node=self.name, hostname=HOSTNAME, error=why[:200])

    async def run(self, offer: proto.Offer, prepared: Prepared, cancel: StopFlag, output: OnOutput,
                  files: ExecFiles | None = None, *, remove: bool = True) -> proto.Result:
        """Run an admitted exec offer in its working directory: its inputs first, its artifacts back
        afterwards; the directory is removed at the end (by the caller when ``remove`` is False), unless
        ``keep_runs``. A prepared warm runner gets the job (``warm``); otherwise it starts cold."""
        spec = offer.spec
        assert isinstance(spec, ExecSpec)
        workdir = prepared.workdir
        files = files or ExecFiles()
        stop = asyncio.Event()
        watcher = cancel.future()   # the flag may be set from any thread; the run sees it at once
        watcher.add_done_callback(lambda w: None if w.cancelled() else stop.set())
        limits = self.limits(spec)
        tail = bytearray()
        warm_runner = prepared.runner

        async def keep_tail(stream: str, data: bytes) -> None:  # enough to tell which limit a program hit
            tail.extend(data)
            del tail[:-4096]
            await output(stream, data)

        try:
            problem = await self._ready(offer, workdir, files)
            if problem:
                return self._failed(offer, problem)
            program = prepared.program or self.allowlist.resolve(spec.argv[0], workdir)  # type: ignore[union-attr]
            env = rundir.scrubbed_env(job_id=offer.job_id, node=self.name, workdir=workdir, node_id=self.node_id)
            env["VESTA_OUTPUT"] = str(workdir / artifacts.OUTPUT_DIR)
            if warm_runner is not None and not self._warm_can_run(program):   # shipped, then found elsewhere
                warm_runner.kill()
            if cancel.is_set():   # while its inputs came in or its directory was readied
                return self._failed(offer, "cancelled before it started")
            cg = self.cgroups.make(limits.mem_mib) if self.cgroups is not None else None
            disk = runfiles.DiskLimit(self.disk_mib << 20, self.max_files, (workdir, rundir.home_of(workdir)))
            try:
                r = None
                if warm_runner is not None and not warm_runner.used:
                    r = await self._run_warm(warm_runner, spec, program, env, limits, keep_tail, stop, disk, cg)
                if r is None:
                    command = self._command(spec, program, workdir, limits)
                    if isinstance(command, str):
                        return self._failed(offer, command)
                    r = await execrun.run(command.argv, program=command.runner, cwd=workdir, env=env,
                                          timeout=spec.timeout_s or self.timeout_s, on_output=keep_tail, cancel=stop,
                                          preexec=command.preexec, sandbox=command.sandbox,
                                          mem_limit_mib=limits.mem_mib,
                                          stdin=workdir / spec.stdin if spec.stdin else None, disk=disk, cgroup=cg)
                if cg is not None and cg.oom_kills() and not r.over_memory:   # the kernel held the limit
                    r = dataclasses.replace(r, over_memory=True, reason=cg.reason())
            finally:
                if cg is not None:
                    await asyncio.to_thread(cg.remove)
            if not cancel.is_set():
                try:
                    await files.ship(offer, workdir)
                except (OSError, ValueError) as exc:   # the Result must still go out; the files are lost
                    log.warning("could not send the artifacts of job %s: %s", offer.job_id, exc)
        except Refused as exc:
            return self._failed(offer, str(exc))
        except PeerUnavailable:
            raise   # the submitter is gone: nobody to answer
        except (OSError, VestaError) as exc:   # readying its directory failed (disk full, a name in the way...)
            why = f"{exc.strerror} ({exc.filename})" if isinstance(exc, OSError) and exc.strerror else str(exc)
            return self._failed(offer, f"{self.name} could not run it: {why}")
        finally:
            watcher.cancel()
            if warm_runner is not None and not warm_runner.used:   # it never got the job
                warm_runner.kill()
            if self.keep_runs:
                log.info("kept the working directory of job %s: %s (keep_runs)", offer.job_id, workdir)
            elif remove:
                await asyncio.to_thread(rundir.remove_workdir, workdir)   # may be a big tree
        reason = limits.explain(r, bytes(tail)) or r.reason
        return proto.Result(rid=offer.rid, ok=True, node=self.name, hostname=HOSTNAME, elapsed_s=r.elapsed_s,
                            cpu_s=r.cpu_s, exit_code=r.exit_code, signal=r.signal, error=reason[:200])

    async def _run_warm(self, runner: warm.WarmRunner, spec: ExecSpec, program: str, env: dict[str, str],
                        limits: confine.Limits, output: OnOutput, stop: asyncio.Event, disk: runfiles.DiskLimit,
                        cg: cgroup.RunCgroup | None) -> execrun.ExecResult | None:
        """Hand the job to its warm runner and supervise it as any run; None when the runner died meanwhile
        (the job then starts cold, in the same directory)."""
        workdir = runner.workdir
        # The process limit counts the job user's tasks now, not when the runner was built (it may have waited
        # for minutes): the shell sets it (lowering a limit needs no privilege; raising one would).
        nproc = [value for which, _, value in limits.values() if which == resource.RLIMIT_NPROC]
        script = warm.job_script(
            program, spec.argv, env, stdin=workdir / spec.stdin if spec.stdin else None,
            cpu_s=limits.cpu_s if limits.cpu_s < int(self.timeout_s) + 5 else None,
            mem_kib=limits.mem_mib << 10 if limits.mem_mib < self.mem_mib else None,
            nproc=nproc[0] if nproc else None, nproc_flag=self.shell_nproc_flag)
        if not runner.alive:   # it died between its take and now
            runner.kill()
            return None
        pids = runner.pids()
        if cg is not None:   # before it runs anything: what it starts is in the cgroup from the first fork
            for pid in pids:
                cg.add(pid)
        started = time.monotonic()
        try:
            await runner.hand_over(script, output)
        except (OSError, TimeoutError):   # it died, or its shell stopped reading
            runner.kill()
            return None
        r = await execrun.supervise(runner.job, started, timeout=spec.timeout_s or self.timeout_s, cancel=stop,
                                    mem_limit_mib=limits.mem_mib, disk=disk)
        if cg is not None:   # its sandbox's init leaves the cgroup only once reaped
            await runner.job.settled()
        return r

    async def _ready(self, offer: proto.Offer, workdir: Path, files: ExecFiles) -> str:
        """The inputs in, $VESTA_OUTPUT made, then everything the job user's (``confine.give_workdir``); "" or why
        the run cannot start."""
        (workdir / artifacts.OUTPUT_DIR).mkdir(mode=0o700, exist_ok=True)
        problem = await files.fill(offer, workdir)
        if problem:
            return problem
        confine.give_workdir(workdir, self.job_user)
        return ""

    def _command(self, spec: ExecSpec, program: str, workdir: Path, limits: confine.Limits) -> _Command | str:
        """How to start the program cold: inside bubblewrap or not, behind the limits; or why it cannot run here."""
        return self._command_for(program, list(spec.argv), workdir, limits, (*python_dirs(), Path(program).parent))

    def _command_for(self, program: str, argv: list[str], workdir: Path, limits: confine.Limits,
                     expose: tuple[Path, ...]) -> _Command | str:
        """``program`` with ``argv`` inside bubblewrap (showing ``expose``) or not, behind the limits and the
        job user: a cold run's program, or a warm runner's shell."""
        runner = program
        if self.bwrap is None and not confine.usable_by(program, self.job_user):
            return (f"{program} cannot be run by the job user (uid {self.job_user and self.job_user[0]}) "
                    "on this node: see exec_user")
        sandbox = execrun.SandboxInfo() if self.bwrap is not None else None
        try:
            if self.bwrap is not None and sandbox is not None:
                runner, argv = confine.bwrap_command(
                    self.bwrap, program=program, argv=argv, workdir=workdir, allow_network=self.allow_network,
                    hide=self.hide, expose=expose, run_as=self.job_user,
                    setpriv=self.setpriv, info_fd=sandbox.write_fd, die_with_parent=not proctree.is_subreaper(),
                    tmp_bytes=self.disk_mib << 20)
            if self.prlimit is not None:   # limits by a command prefix: no preexec_fn, so a cheap spawn
                runner, argv = limits.command(self.prlimit, runner, argv, setpriv=self.setpriv,
                                              switch_user=self.bwrap is None)
                return _Command(runner, argv, None, sandbox)
            return _Command(runner, argv, limits.preexec(switch_user=self.bwrap is None), sandbox)
        except BaseException:
            if sandbox is not None:   # its pipe is ours until run() has it
                sandbox.close()
            raise


@dataclass(frozen=True, slots=True)
class _Command:
    runner: str
    argv: list[str]
    preexec: Callable[[], None] | None
    sandbox: execrun.SandboxInfo | None   # run() owns it once handed over, even if it is cancelled


@functools.lru_cache(maxsize=4)
def _warm_expose(python: tuple[Path, ...], allowed: tuple[str, ...]) -> tuple[Path, ...]:
    return (*python, *sorted({Path(p).parent for p in allowed}))


def _find_shell() -> str | None:
    """The shell warm runners end in: dash where there is one (small, and it exports nothing of its own but
    PWD), else ``sh``."""
    for name in ("dash", "sh"):
        found = shutil.which(name, path=allowlist.SAFE_PATH)
        if found is not None:
            return os.path.realpath(found)
    return None


@functools.cache
def python_dirs() -> tuple[Path, ...]:
    """Where this vesta's Python lives (its venv and the interpreter it was made from), so programs
    installed with vesta, like piwork, still run when home directories are hidden by the sandbox."""
    dirs = {Path(sys.prefix), Path(sys.base_prefix), Path(os.path.realpath(sys.executable)).parent.parent,
            Path(__file__).resolve().parent}   # the vesta package itself (an editable install lives in a checkout)
    return tuple(sorted(dirs))


def describe(runner: ExecRunner, exec_user: str, sandbox: str) -> str:
    """What exec jobs run inside, in words (for vesta status)."""
    base = "own process group, scrubbed environment, rlimits"
    if runner.max_procs:
        base += f" (at most {runner.max_procs} processes)"
    if runner.job_user is not None:
        base += f"; runs as {exec_user} (uid {runner.job_user[0]})"
    elif os.geteuid() == 0:
        base += "; runs as root (exec_user is empty)"
    if runner.cgroups_why:
        base += f"; memory: {'memory.max in ' if runner.cgroups else 'watched from /proc: '}{runner.cgroups_why}"
    if runner.pool is not None:
        base += f"; {runner.pool.base} warm runner{'s' if runner.pool.base != 1 else ''} kept ready"
    if runner.bwrap is None:
        return f"{base}; no sandbox (" + ("sandbox none" if sandbox == "none" else "bubblewrap not installed") + ")"
    net = "network allowed" if runner.allow_network else "no network"
    return f"{base}; bubblewrap: system read-only, private /tmp and home, {net}"
