"""Warm runners: an exec run's confinement paid for before its job arrives.

A *runner* is what a cold exec run would start, already started: ``prlimit`` with the node's limits,
bubblewrap with its namespaces and mounts (when exec is sandboxed), ``setpriv`` down to the job user,
a fresh empty working directory and HOME, and at the end of that chain a POSIX shell reading its
standard input, a pipe only the daemon writes to. When a job is admitted its inputs are written into
that working directory and one compound shell command goes down the pipe (``job_script``): lower the
CPU and address-space limits to the job's own, set its environment, point its standard input at
``/dev/null`` (or its ``--stdin`` file), and ``exec`` the program. No process is started between the
job's arrival and its program: the shell becomes it. A runner serves one job and is never reused.

Each runner is an ``execrun.Running`` from the moment it starts, so its processes are watched like any
run's (its exit, its output, its members in ``proctree``); a job handed to it is then ``supervise``d
exactly as a cold run is: the same CPU count over every process, the same kill.

``WarmPool`` keeps ``base`` runners idle (``warm_runners``; ``auto`` is one per exec slot) and builds a
replacement as soon as one is taken, several at once when jobs come faster than one build (a build is
mostly waiting for the kernel to tear down the old mount tree, 10-15 ms, not CPU): each take that finds
the pool empty raises the number kept by one, up to ``MAX_SPARE`` more than ``base``, and a minute
without such a miss lowers it by one again. Runners are built at low priority (nice ``BUILD_NICE``,
put back to 0 once built, when vestad runs as root). A runner is dropped and rebuilt when what shaped it
changes (``shape``: sandbox, job user, limits, allowlist), when it has waited longer than ``IDLE_S``,
when it dies, or when it prints anything before its job.

What an idle runner costs: three small processes in a sandbox (bubblewrap, bubblewrap's namespace
init, the shell), about 5 MiB of RSS in all (most of it shared pages: their PSS is under 1 MiB), no
CPU while it waits, and one wake-up of the pool's keeper every ``KEEP_S``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vesta import execrun, proctree, rundir
from vesta.errors import Refused
from vesta.tasks import spawn

log = logging.getLogger(__name__)

IDLE_S = 600.0          # a runner waiting longer is rebuilt (its view of the system is as old as it is)
KEEP_S = 5.0            # how often the keeper looks at an idle pool (age, shape); takes and deaths wake it at once
MAX_SPARE = 16          # runners kept beyond ``base`` at most, when jobs come faster than one build
MAX_BUILDING = 8        # runners being built at once
SHRINK_S = 60.0         # a minute without a take that found the pool empty: one spare fewer
BUILD_NICE = 10         # the priority runners are built at (as root, put back to 0 once built)
READY = b"R"            # what a runner prints once it waits for its job
HAND_OVER_S = 10.0      # a job's command must be in its runner's pipe within this
# What the shell reads first, as soon as it starts: say it is ready, then wait for the job's command.
READY_COMMAND = b"printf R\n"
# Variables a POSIX shell sets and exports of its own (dash: PWD; bash: also SHLVL and OLDPWD): unset
# before the job's own are set, so its environment is exactly the one it was given.
SHELL_OWN = ("PWD", "OLDPWD", "SHLVL")
# What a runner's own environment holds (``runner_env``), unset for its job as well.
RUNNER_VARS = ("VESTA_NODE_ID", "VESTA_JOB_ID")


def runner_env(node_id: str) -> dict[str, str]:
    """A waiting runner's whole environment: only what marks it as this node's, so that a vestad of this node
    that comes back after a crash kills it with the rest of its runs (``proctree.kill_leftovers``)."""
    return {"VESTA_NODE_ID": node_id, "VESTA_JOB_ID": "warm-runner"} if node_id else {}


def nproc_flag(shell: str) -> str:
    """The ``ulimit`` option of ``shell`` for the process limit (RLIMIT_NPROC): -p in dash, -u in bash; "" if
    it has neither."""
    for flag in ("-p", "-u"):   # bash's -p is the pipe size: what each sets is read back from the kernel
        try:
            out = subprocess.run([shell, "-c", f"ulimit {flag} 4099 && exec cat /proc/self/limits"],
                                 capture_output=True, timeout=10, env={"PATH": "/usr/bin:/bin"})
        except (OSError, subprocess.SubprocessError):
            return ""
        lines = [line.split() for line in out.stdout.decode(errors="replace").splitlines()]
        if any(words[:2] == ["Max", "processes"] and words[2:4] == ["4099", "4099"] for words in lines):
            return flag
    return ""


def job_script(program: str, argv: Sequence[str], env: Mapping[str, str], *, stdin: Path | None = None,
               cpu_s: int | None = None, mem_kib: int | None = None, nproc: int | None = None,
               nproc_flag: str = "-p") -> bytes:
    """The one compound command a runner's shell reads: parsed whole before any of it runs, so redirecting
    the shell's own standard input (its script) in it is safe. ``Refused`` (reason ``policy``) for a NUL byte,
    which no argument or variable can hold."""
    for word in (program, *argv, *env, *env.values(), str(stdin or "")):
        if "\0" in word:
            raise Refused(f"cannot start {argv[0]!r}: embedded null byte", reason="policy")
    parts = ["{ unset " + " ".join((*SHELL_OWN, *RUNNER_VARS))]
    if cpu_s is not None:
        parts.append(f"ulimit -t {int(cpu_s)}")
    if mem_kib is not None:
        parts.append(f"ulimit -v {int(mem_kib)}")
    if nproc is not None:   # soft and hard: the job cannot raise it again
        parts.append(f"ulimit {nproc_flag} {int(nproc)}")
    parts += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    parts.append("exec <" + (shlex.quote(str(stdin)) if stdin is not None else "/dev/null"))
    parts.append("exec " + " ".join(shlex.quote(w) for w in (program, *argv[1:])))
    return ("; ".join(parts) + "; }\n").encode()


@dataclass(eq=False)
class WarmRunner:
    """One runner: its processes (an ``execrun.Running`` whose program is the confinement chain ending in
    the shell), its working directory, and what shaped it."""

    job: execrun.Running
    workdir: Path
    shape: Hashable
    born: float = field(default_factory=time.monotonic)
    ready: bool = False     # its shell printed READY: it waits on its pipe
    taken: bool = False     # taken for a job (or given up): not in the pool
    used: bool = False      # handed its job, or killed: of no more use
    idle_output: execrun.OutputCallback | None = None   # what hears it before its job (the pool)

    def __post_init__(self) -> None:
        self.job.procs.waiting = True   # no job in it yet (proctree.reap_strays)

    @property
    def alive(self) -> bool:
        return not self.job.watch.exited.done()

    def pids(self) -> list[int]:
        """Its processes now: the leader, and the sandbox's init with its children (the shell)."""
        pids = [self.job.pid]
        sandbox = self.job.sandbox
        if sandbox is not None and sandbox.init is not None:
            init = sandbox.init[0]
            pids.append(init)
            with contextlib.suppress(OSError, ValueError):
                pids += [int(p) for p in Path(f"/proc/{init}/task/{init}/children").read_text().split()]
        return pids

    async def hand_over(self, script: bytes, on_output: execrun.OutputCallback) -> None:
        """Give the runner its job: output goes to ``on_output`` from now on, the command down its pipe, and the
        pipe closed. Usually a few hundred bytes that the empty pipe takes at once; a long command line (up to
        megabytes once quoted) is written as the shell reads it, never blocking the event loop: within
        ``HAND_OVER_S``, or ``TimeoutError`` (a shell that stopped reading). ``OSError`` if it died meanwhile."""
        self.taken = self.used = True
        self.job.procs.waiting = False
        self.job.procs.leader_start = proctree.now_ticks()   # its run starts now (proctree.reap_strays)
        self.job.on_output = on_output
        stdin = self.job.proc.stdin
        assert stdin is not None
        try:
            fd = stdin.fileno()
            os.set_blocking(fd, False)
            view = memoryview(script)
            async with asyncio.timeout(HAND_OVER_S):
                while view:
                    try:
                        view = view[os.write(fd, view):]
                    except BlockingIOError:
                        await execrun.wait_fd(fd, write=True)
        finally:
            stdin.close()

    def kill(self) -> None:
        """Kill its processes (reaped in the background, as a cancelled run's); its directory stays."""
        self.taken = self.used = True
        self.job.procs.waiting = False
        self.job.on_output = None
        self.job.abandon()

    def discard(self) -> None:
        """Kill it and remove its directory."""
        self.kill()
        spawn(_remove_when_dead(self), f"warm-discard-{self.job.pid}", _DISCARDS)


_DISCARDS: set[asyncio.Task[None]] = set()


def _undo_spawn(spawning: asyncio.Future[Spawned]) -> None:
    """A runner started for a build that was given up (vestad stopping): killed, its directory removed."""
    if spawning.cancelled() or spawning.exception() is not None:
        return
    started = spawning.result()
    execrun.kill_started(started.proc, started.sandbox)
    rundir.remove_workdir(started.workdir)


async def _remove_when_dead(runner: WarmRunner) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(execrun.SANDBOX_REAP_S):
            await asyncio.shield(runner.job.watch.exited)
    await asyncio.to_thread(rundir.remove_workdir, runner.workdir)


@dataclass(frozen=True, slots=True)
class Spawned:
    """A runner's processes just started (``execrun.start``, in a worker thread), not watched yet."""

    proc: subprocess.Popen[bytes]
    workdir: Path
    sandbox: execrun.SandboxInfo | None


class WarmPool:
    """Runners kept ready for exec jobs (see the module doc). ``spawn(shape)`` starts one, in a worker thread
    so the event loop (and the job that just took a runner) does not wait for it; it raises ``OSError`` or
    ``Refused`` when it cannot. ``shape()`` says what runners must look like now."""

    def __init__(self, spawn: Callable[[Hashable], Spawned], shape: Callable[[], Hashable], base: int, *,
                 renice: bool | None = None, idle_s: float = IDLE_S) -> None:
        self.spawn = spawn
        self.shape = shape
        self.base = base
        self.idle_s = idle_s
        self.renice = os.geteuid() == 0 if renice is None else renice
        self.idle: list[WarmRunner] = []
        self.building: set[WarmRunner] = set()
        self.spawning = 0              # spawns under way in worker threads
        # Runners start in threads of their own at low priority (nice is per thread on Linux, and a child
        # inherits its thread's): the job that just took one is not slowed by its replacement.
        self._builder = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="warm-build", initializer=self._low_priority)
        self._builds: set[asyncio.Task[None]] = set()
        self.spare = 0                 # kept beyond base, for jobs coming faster than a build
        self.counters = {"built": 0, "taken": 0, "missed": 0, "discarded": 0, "died": 0, "build_failed": 0}
        self._last_miss = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._warned = ""
        self._paused_until = 0.0

    def _low_priority(self) -> None:
        if self.renice:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, 0, BUILD_NICE)   # this thread only

    def start(self) -> None:
        self._task = spawn(self._keep(), "warm-runners")

    async def close(self) -> None:
        """Stop building and kill every runner not handed to a job."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*self._builds, return_exceptions=True)   # a spawn in a thread ends soon
        self._builder.shutdown(wait=False)
        runners = [*self.idle, *self.building]
        self.idle.clear()
        self.building.clear()
        for runner in runners:
            runner.kill()
        # Their directories go before this returns: a clean stop leaves the runs directory empty.
        await asyncio.gather(*(_remove_when_dead(r) for r in runners), *_DISCARDS, return_exceptions=True)

    def take(self) -> WarmRunner | None:
        """A ready runner of the current shape, or None (the job starts cold, and the pool grows)."""
        shape = self.shape()
        while self.idle:
            runner = self.idle.pop()   # the newest: the oldest age out
            if runner.shape == shape and runner.alive:
                runner.taken = True
                self.counters["taken"] += 1
                self._wake.set()
                return runner
            self._drop(runner)
        self.counters["missed"] += 1
        self._last_miss = time.monotonic()
        self.spare = min(MAX_SPARE, self.spare + 1)
        self._wake.set()
        return None

    def put_back(self, runner: WarmRunner) -> None:
        """A runner taken for a job that was refused after all, nothing written to it: ready again."""
        if self._closed or not runner.alive or not runner.ready or runner.job.on_output is not runner.idle_output:
            runner.discard()
            return
        runner.taken = False
        self.counters["taken"] -= 1   # it was not used after all
        self.idle.append(runner)

    @property
    def want(self) -> int:
        return self.base + self.spare if self.base > 0 else 0

    async def _keep(self) -> None:
        while True:
            self._tend()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KEEP_S):
                    await self._wake.wait()

    def _tend(self) -> None:
        """One look at the pool: drop what is stale, start what is missing."""
        now = time.monotonic()
        shape = self.shape()
        for runner in list(self.idle):
            if runner.shape != shape or not runner.alive:
                self._drop(runner)
        old = [r for r in self.idle if now - r.born > self.idle_s]
        if old:   # one at a time: the pool never empties for its own upkeep
            self._drop(old[0])
        if self.spare and now - self._last_miss > SHRINK_S:
            self.spare -= 1
            self._last_miss = now
            extra = len(self.idle) + len(self.building) - self.want
            if extra > 0 and self.idle:
                self._drop(self.idle[0])
        while (len(self.idle) + len(self.building) + self.spawning < self.want
               and len(self.building) + self.spawning < MAX_BUILDING and not self._closed
               and now >= self._paused_until):
            self.spawning += 1
            spawn(self._build(shape), "warm-runner-build", self._builds)

    async def _build(self, shape: Hashable) -> None:
        spawning = asyncio.get_running_loop().run_in_executor(self._builder, self.spawn, shape)
        try:
            started = await asyncio.shield(spawning)
        except asyncio.CancelledError:   # the spawn goes on in its thread: what it starts is undone when it ends
            spawning.add_done_callback(_undo_spawn)
            raise
        except (OSError, Refused) as exc:
            self.counters["build_failed"] += 1
            why = str(exc)
            if why != self._warned:   # warn once per reason; the keeper tries again after KEEP_S
                log.warning("cannot prepare a warm exec runner (jobs start cold meanwhile): %s", why)
            self._warned = why
            self._paused_until = time.monotonic() + KEEP_S   # the keeper tries again on a later round
            return
        finally:
            self.spawning -= 1
        self._warned = ""
        try:
            job = execrun.watch(started.proc, None, started.sandbox)   # kills the process if it cannot
        except BaseException:
            rundir.remove_workdir(started.workdir)
            raise
        runner = WarmRunner(job, started.workdir, shape)
        self.counters["built"] += 1
        self.building.add(runner)
        self._listen(runner)
        runner.job.watch.exited.add_done_callback(lambda _: self._died(runner))
        stdin = runner.job.proc.stdin
        assert stdin is not None
        try:
            stdin.write(READY_COMMAND)
            stdin.flush()
        except OSError:
            self._drop(runner)
        if self._closed:
            self._drop(runner)

    def _listen(self, runner: WarmRunner) -> None:
        """Hear the runner until its job: READY once, and nothing else."""
        def idle_output(stream: str, data: bytes) -> None:
            if stream == "stdout" and data == READY and not runner.ready and runner in self.building:
                self._ready(runner)
            else:   # a runner says nothing before its job: something is wrong with it
                log.warning("a warm exec runner said %r before its job; rebuilding it", data[:200])
                self._drop(runner)

        runner.idle_output = runner.job.on_output = idle_output

    def _ready(self, runner: WarmRunner) -> None:
        runner.ready = True
        self.building.discard(runner)
        self._wake.set()   # room to build the next one
        if self.renice:   # built; from now on it waits, and the job it gets runs at the usual priority
            for pid in runner.pids():
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, pid, 0)
        if self._closed or runner.shape != self.shape():
            self._drop(runner)
            return
        self.idle.append(runner)

    def _died(self, runner: WarmRunner) -> None:
        if runner.taken:
            return   # its job's supervisor (or discard) deals with it
        self.counters["died"] += 1
        log.info("a warm exec runner died while waiting (pid %d); preparing another", runner.job.pid)
        self._drop(runner)

    def _drop(self, runner: WarmRunner) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(runner)
        self.building.discard(runner)
        if not runner.taken:
            self.counters["discarded"] += 1
            runner.discard()
        self._wake.set()
