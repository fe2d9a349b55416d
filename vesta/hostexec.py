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
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vesta import allowlist, artifacts, cgroup, confine, execrun, proctree, proto, rundir, runfiles
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
    program shipped with the job, resolved once its inputs are in)."""

    workdir: Path
    program: str


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

    def __post_init__(self) -> None:
        self.allowlist = self.allowlist or allowlist.Allowlist([])

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
        try:
            workdir = rundir.make_workdir(self.runs, offer.job_id)
        except (OSError, Refused) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise Refused(f"{self.name} cannot make a working directory: {why}"[: proto.MAX_REASON],
                          reason="policy") from None
        if deferred:
            return Prepared(workdir, "")
        try:
            return Prepared(workdir, self.allowlist.resolve(argv0, workdir))
        except Refused as exc:
            rundir.remove_workdir(workdir)
            reason = exc.reason if exc.reason in proto.REFUSE_REASONS else "policy"
            raise Refused(str(exc)[: proto.MAX_REASON], reason=reason) from None

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
        ``keep_runs``."""
        spec = offer.spec
        assert isinstance(spec, ExecSpec)
        workdir = prepared.workdir
        files = files or ExecFiles()
        stop = asyncio.Event()
        watcher = cancel.future()   # the flag may be set from any thread; the run sees it at once
        watcher.add_done_callback(lambda w: None if w.cancelled() else stop.set())
        limits = self.limits(spec)
        tail = bytearray()

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
            command = self._command(spec, program, workdir, limits)
            if isinstance(command, str):
                return self._failed(offer, command)
            if cancel.is_set():   # while its inputs came in or its directory was readied
                if command.sandbox is not None:
                    command.sandbox.close()
                return self._failed(offer, "cancelled before it started")
            cg = self.cgroups.make(limits.mem_mib) if self.cgroups is not None else None
            try:
                r = await execrun.run(command.argv, program=command.runner, cwd=workdir, env=env,
                                      timeout=spec.timeout_s or self.timeout_s, on_output=keep_tail, cancel=stop,
                                      preexec=command.preexec, sandbox=command.sandbox, mem_limit_mib=limits.mem_mib,
                                      stdin=workdir / spec.stdin if spec.stdin else None, disk=runfiles.DiskLimit(
                                          self.disk_mib << 20, self.max_files, (workdir, rundir.home_of(workdir))),
                                      cgroup=cg)
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
            if self.keep_runs:
                log.info("kept the working directory of job %s: %s (keep_runs)", offer.job_id, workdir)
            elif remove:
                await asyncio.to_thread(rundir.remove_workdir, workdir)   # may be a big tree
        reason = limits.explain(r, bytes(tail)) or r.reason
        return proto.Result(rid=offer.rid, ok=True, node=self.name, hostname=HOSTNAME, elapsed_s=r.elapsed_s,
                            cpu_s=r.cpu_s, exit_code=r.exit_code, signal=r.signal, error=reason[:200])

    async def _ready(self, offer: proto.Offer, workdir: Path, files: ExecFiles) -> str:
        """The inputs in, $VESTA_OUTPUT made, everything the job user's; "" or why the run cannot start."""
        (workdir / artifacts.OUTPUT_DIR).mkdir(mode=0o700, exist_ok=True)
        problem = await files.fill(offer, workdir)
        if problem:
            return problem
        confine.give_workdir(workdir, self.job_user)
        if self.job_user is not None:   # what we put there (inputs, $VESTA_OUTPUT) is the job's too
            for top, dirs, names in os.walk(workdir):
                for entry in (*dirs, *names):
                    os.chown(os.path.join(top, entry), *self.job_user, follow_symlinks=False)
        return ""

    def _command(self, spec: ExecSpec, program: str, workdir: Path, limits: confine.Limits) -> _Command | str:
        """How to start the program: inside bubblewrap or not, behind the limits; or why it cannot run here."""
        runner, argv = program, list(spec.argv)
        sandbox: execrun.SandboxInfo | None = None
        if self.bwrap is None and not confine.usable_by(program, self.job_user):
            return (f"{program} cannot be run by the job user (uid {self.job_user and self.job_user[0]}) "
                    "on this node: see exec_user")
        sandbox = execrun.SandboxInfo() if self.bwrap is not None else None
        try:
            if self.bwrap is not None and sandbox is not None:
                runner, argv = confine.bwrap_command(
                    self.bwrap, program=program, argv=argv, workdir=workdir, allow_network=self.allow_network,
                    hide=self.hide, expose=(*python_dirs(), Path(program).parent), run_as=self.job_user,
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
    if runner.bwrap is None:
        return f"{base}; no sandbox (" + ("sandbox none" if sandbox == "none" else "bubblewrap not installed") + ")"
    net = "network allowed" if runner.allow_network else "no network"
    return f"{base}; bubblewrap: system read-only, private /tmp and home, {net}"
