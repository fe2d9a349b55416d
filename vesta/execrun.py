"""Run a peer's command on this node: a runner that is safe for the host.

The program to run comes resolved from ``allowlist``; its working directory and environment from
``workdir``; limits, the job user and the sandbox from ``confine``.

The runner
==========

``run()`` starts the program without a shell, stdin from ``/dev/null`` (or a file it is given), in
its own session (so its own process group, pgid == pid), with the
environment it is given (build it with ``scrubbed_env``: nothing of the
daemon's own environment, which may hold ``VESTA_KEY``). On timeout or cancel
the whole group gets SIGTERM, ``term_grace`` seconds later SIGKILL; and when
the main process ends for any reason, whatever is left of its group is
SIGKILLed while the dead leader still pins the group id (it is reaped only
afterwards, so the id cannot have been reused). The exit status and CPU time
come from ``wait4``: user+system time of the process and of the descendants
it waited for.

The rest of the run (``proctree``: the group, the session, and their
descendants, so a child that called ``setpgid`` or ``setsid`` too) is dealt
with when the main process ends or is given up on: everything is stopped,
what it used is added to the CPU time (a job cannot lend itself free CPU by
leaving busy orphans behind, or by being cancelled), and it is SIGKILLed. On
timeout or cancel SIGTERM reaches the same processes first. In a sandbox
(``SandboxInfo``) the namespace's init is part of the run wherever it ends up.
What still escapes: a process orphaned before that moment that also left the
session (a daemonizing program); a subreaper vestad kills it later
(``proctree.reap_strays``), uncounted. Only a sandbox (bubblewrap, DESIGN.md)
or a cgroup holds it.

Limits, the job user and the sandbox are in ``confine``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import resource
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from vesta import proctree, runfiles
from vesta.allowlist import NOT_FOUND_ERRNOS
from vesta.cgroup import RunCgroup
from vesta.errors import Refused
from vesta.tasks import spawn

log = logging.getLogger(__name__)

CHUNK = 64 * 1024           # bytes per on_output call at most
OUTPUT_DRAIN_S = 2.0        # after the group is dead, how long the output readers may take to reach EOF
SANDBOX_REAP_S = 5.0        # how long a sandbox's init may take to die (it reaps its namespace first)
MEM_CHECK_S = 0.25          # how often the resident memory of a run with a memory limit is summed

OutputCallback = Callable[[str, bytes], Awaitable[None] | None]


# ------------------------------------------------------------------------------------------------ runner


@dataclass(frozen=True, slots=True)
class ExecResult:
    exit_code: int | None      # None when killed by a signal
    signal: int | None
    timed_out: bool
    cancelled: bool
    elapsed_s: float
    cpu_s: float               # user+sys: wait4 of the process (and what it waited for), plus the rest of the run
    max_rss_kb: int
    reason: str                # "" on a normal exit, else a one-line why
    over_memory: bool = False  # killed for the resident memory of the whole run (``run``'s ``mem_limit_mib``)
    over_disk: bool = False    # killed for the files it wrote (``run``'s ``disk``)


class SandboxInfo:
    """The pipe bubblewrap names its namespace's init on (``--info-fd``, see ``confine.bwrap_command``).

    bubblewrap exits without waiting for that init; the run makes it a root of its processes
    (``proctree.RunProcs.add_root``), so what runs under it is counted and killed with the rest, and in a
    subreaper (``proctree.become_subreaper``) reaps it once it is this process's child. ``run`` owns the
    pipe once it is handed over, and closes it.
    """

    MAX_BYTES = 4096   # bubblewrap writes ~100 bytes, in several writes

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)   # pass_fds hands the write end to bubblewrap
        os.set_blocking(self.read_fd, False)
        self.done = False                          # the init is known, or never will be
        self.init: tuple[int, int] | None = None   # its (pid, start time)
        self.unresolved: int | None = None         # its pid, when its start time could not be read then
        self._buf = bytearray()

    def feed(self) -> bool:
        """Read what has come; True once ``done``."""
        while not self.done:
            try:
                data = os.read(self.read_fd, self.MAX_BYTES)
            except BlockingIOError:
                return False
            except OSError:
                data = b""
            self._buf += data
            self._parse(final=not data or len(self._buf) >= self.MAX_BYTES)   # EOF: bubblewrap is gone
        return True

    def _parse(self, *, final: bool) -> None:
        try:
            found, _ = json.JSONDecoder().raw_decode(self._buf.decode())
        except (ValueError, UnicodeDecodeError):   # not all of it yet
            if final:
                self.done = True
                if self._buf:
                    log.warning("bubblewrap's --info-fd said %r: the sandbox's CPU time is counted from /proc",
                                bytes(self._buf[:200]))
            return
        self.done = True
        pid = found.get("child-pid") if isinstance(found, dict) else None
        if not isinstance(pid, int) or pid <= 1:
            log.warning("bubblewrap's --info-fd named no init (%r)", bytes(self._buf[:200]))
            return
        self.unresolved = pid
        self.resolve(parents=())

    def resolve(self, parents: Sequence[int]) -> None:
        """Learn the init's start time, now (``parents`` empty: bubblewrap just named it) or later from its
        parent (bubblewrap, or us once bubblewrap is gone: a pid reused since has another parent)."""
        pid = self.unresolved
        if pid is None:
            return
        try:
            st = proctree.read_stat(pid)
        except OSError:   # out of file descriptors: try again later
            return
        self.unresolved = None
        if st is not None and (not parents or st.ppid in parents):
            self.init = (pid, st.start)

    def close_write(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def close(self) -> None:
        self.close_write()
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1


def _start(argv: Sequence[str], program: str, cwd: Path, env: Mapping[str, str],
           preexec: Callable[[], None] | None, sandbox: SandboxInfo | None,
           stdin: int | None = None) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(
            list(argv), executable=program, cwd=cwd, env=dict(env),
            stdin=subprocess.DEVNULL if stdin is None else stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            close_fds=True,
            pass_fds=() if sandbox is None else (sandbox.write_fd,), start_new_session=True, preexec_fn=preexec,
        )
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        reason = "not_found" if exc.errno in NOT_FOUND_ERRNOS else "exec_failed"
        raise Refused(f"cannot start {argv[0]!r}: {exc.strerror}{where}", reason=reason) from exc
    except ValueError as exc:   # a NUL byte in an argument or the environment
        raise Refused(f"cannot start {argv[0]!r}: {exc}", reason="policy") from exc
    except subprocess.SubprocessError as exc:   # preexec raised in the child
        raise Refused(f"cannot start {argv[0]!r}: {exc}", reason="exec_failed") from exc


class _ExitWatch:
    """Learns that the child exited *without reaping it*, so its pid (and group id) stay pinned."""

    def __init__(self, pid: int) -> None:
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = loop.create_future()
        self._loop = loop
        self._pidfd = -1
        self._thread: asyncio.Future[Any] | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):   # kernel < 5.3 or a seccomp filter: a thread blocks in waitid
            self._thread = asyncio.ensure_future(
                asyncio.to_thread(os.waitid, os.P_PID, pid, os.WEXITED | os.WNOWAIT))
            self._thread.add_done_callback(self._thread_done)
        else:
            loop.add_reader(self._pidfd, self._readable)

    def _readable(self) -> None:
        self._loop.remove_reader(self._pidfd)
        if not self.exited.done():
            self.exited.set_result(None)

    def _thread_done(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is not None:   # ECHILD: reaped elsewhere; wait4 says so
            log.debug("waitid failed: %s", fut.exception())
        if not self.exited.done():
            self.exited.set_result(None)

    def close(self) -> None:
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1


async def _pump(pipe: IO[bytes], name: str, job: Running) -> None:
    """Read one stream to EOF in chunks, to the run's ``on_output`` of the moment (a warm runner's changes
    when a job is handed to it); an async callback is awaited before the next read (backpressure).

    The pipe is read here, by its descriptor, and closed only by its file object (``close_pipes``): a pipe
    transport would not do (uvloop's ``connect_read_pipe`` closes the descriptor's number a second time
    after the file object did, which closes whatever another thread opened under that number meanwhile:
    MagicStack/uvloop#763)."""
    fd = pipe.fileno()
    os.set_blocking(fd, False)
    try:
        while True:
            try:
                data = os.read(fd, CHUNK)
            except BlockingIOError:
                await wait_fd(fd)
                continue
            if not data:
                return
            on_output = job.on_output
            if on_output is not None:
                pending = on_output(name, data)
                if inspect.isawaitable(pending):
                    await pending
    finally:
        pipe.close()   # at EOF, or when the reader is given up on; close_pipes then has nothing left to do


async def wait_fd(fd: int, *, write: bool = False) -> None:
    """Wait until ``fd`` can be read (or written), watched only meanwhile: an unread pipe must not wake the
    loop. The descriptor stays its owner's (no transport takes it: see ``_pump``)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    watch, unwatch = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    watch(fd, lambda: None if ready.done() else ready.set_result(None))
    try:
        await ready
    finally:
        unwatch(fd)


_CLEANUPS: set[asyncio.Task[Any]] = set()   # reapers of runs whose caller was cancelled


class Running:
    """One started child: its exit watch, output readers, and the rest of its run (``proctree``)."""

    def __init__(self, proc: subprocess.Popen[bytes], on_output: OutputCallback | None,
                 sandbox: SandboxInfo | None) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.proc = proc
        self.on_output = on_output
        self.pid = proc.pid          # == its process group and session id (start_new_session)
        self.watch = _ExitWatch(proc.pid)
        self.others_cpu_s = 0.0      # what the rest of the run used (see stop_and_kill)
        self.sandbox = sandbox
        self._watching_sandbox = sandbox is not None
        if sandbox is not None:   # its init is supervised as soon as it is named, so no stray sweep takes it
            asyncio.get_running_loop().add_reader(sandbox.read_fd, self._read_sandbox)
        self.readers = [
            asyncio.ensure_future(_pump(proc.stdout, "stdout", self)),
            asyncio.ensure_future(_pump(proc.stderr, "stderr", self)),
        ]
        self.status: int | None = None
        self.rusage: resource.struct_rusage | None = None
        self.reaped = False
        self.finished = False
        self._stopping: asyncio.Future[float] | None = None   # stop() in its thread
        self._init_reaping: asyncio.Task[None] | None = None   # a sandbox init reaped after the result
        self.procs = proctree.RunProcs(proc.pid)   # supervised from here (last: nothing after it can fail)

    def _read_sandbox(self) -> None:
        """Read what bubblewrap said; once it named its init, that init is the run's wherever it ends up, and
        supervised (no stray sweep reaps it)."""
        sandbox = self.sandbox
        if sandbox is None:
            return
        if self._watching_sandbox:
            if not sandbox.feed():
                return
            self._unwatch_sandbox(sandbox)
        if sandbox.unresolved is not None and sandbox.unresolved not in proctree.supervised:
            sandbox.resolve(parents=(self.pid, os.getpid()))
        if sandbox.init is not None and sandbox.init[0] not in self.procs.roots:
            self.procs.add_root(*sandbox.init)
            proctree.supervised.add(sandbox.init[0])

    def _unwatch_sandbox(self, sandbox: SandboxInfo) -> None:
        if self._watching_sandbox:   # before the pipe is closed: the loop must not watch a reused fd number
            self._watching_sandbox = False
            asyncio.get_running_loop().remove_reader(sandbox.read_fd)

    async def reap_sandbox_init(self) -> None:
        """After the run is killed and its leader reaped: reap bubblewrap's namespace init, our child by now
        (we are a subreaper), so it leaves no zombie. What ran in it was counted with the rest of the run."""
        sandbox = self.sandbox
        if sandbox is None:
            return
        self.sandbox = None
        self._read_sandbox()   # bubblewrap is gone: the rest is in the pipe, or it is at EOF
        self._unwatch_sandbox(sandbox)
        sandbox.close()
        if sandbox.init is None:
            return
        pid, start = sandbox.init
        try:
            st = proctree.read_stat(pid)
            if st is None or st.start != start or st.ppid != os.getpid():   # gone, or not ours to wait for
                return
            os.kill(pid, signal.SIGKILL)   # killed with the run already; our child, so the pid is still its own
            watch = _ExitWatch(pid)
            try:
                await asyncio.wait_for(asyncio.shield(watch.exited), SANDBOX_REAP_S)
            finally:
                watch.close()
            os.wait4(pid, 0)
        except (OSError, TimeoutError) as exc:   # ChildProcessError: reaped after all; TimeoutError: stuck in D
            log.warning("could not reap the sandbox init %d of run %d: %r", pid, self.pid, exc)
        finally:
            proctree.supervised.discard(pid)

    def signal(self, sig: int, *, leader: bool = True) -> None:
        """Signal the whole run (or all of it but the leader). Only before the leader is reaped, while its pid
        pins the group and session."""
        assert not self.reaped
        self.procs.signal(sig, leader=leader)

    async def stop_and_kill(self) -> float:
        """Stop the whole run, then SIGKILL it; what all but the leader used. The scans run in a thread
        (thousands of processes take a while), unless the leader has exited and left nothing behind."""
        assert not self.reaped
        self._read_sandbox()   # the sandbox's init, if bubblewrap named it (it did long ago, or it is gone)
        if self.watch.exited.done() and self.procs.nothing_left():
            used = self.procs.stop(scan=False)
        else:   # shielded: if we are cancelled meanwhile, _cleanup waits for it to kill what it stopped
            self._stopping = asyncio.ensure_future(asyncio.to_thread(self.procs.stop))
            used = await asyncio.shield(self._stopping)
        if self.procs.kill_scans:
            await asyncio.to_thread(self.procs.kill)
        else:
            self.procs.kill()
        return used

    async def settled(self) -> None:
        """Once the run ended: wait until its sandbox's init, if reaped after the result, is reaped too."""
        if self._init_reaping is not None:
            await asyncio.wait([self._init_reaping])

    def reap(self) -> None:
        """wait4 the leader; it has exited (the watch said so), so this does not block."""
        if self.reaped:
            return
        self.reaped = True
        self.watch.close()
        self.procs.close()
        try:
            _, self.status, self.rusage = os.wait4(self.pid, 0)
        except ChildProcessError:
            log.warning("exit status of pid %d was taken by someone else", self.pid)
            self.proc.returncode = -1
        else:
            self.proc.returncode = os.waitstatus_to_exitcode(self.status)   # Popen must not wait for it

    async def supervise(self, started: float, timeout: float | None, cancel: asyncio.Event | None,
                        term_grace: float, mem_limit_mib: int | None = None,
                        disk: runfiles.DiskLimit | None = None) -> ExecResult:
        deadline = None if timeout is None else started + timeout
        next_check = None if mem_limit_mib is None else started + MEM_CHECK_S
        over_memory = 0   # what the run had resident when it was found over its limit
        next_disk = None if disk is None else started + runfiles.DISK_CHECK_S
        over_disk = ""    # why it was found over its disk limit
        cancel_wait = None if cancel is None else asyncio.ensure_future(cancel.wait())
        watching: set[asyncio.Future[Any]] = {self.watch.exited, *self.readers}
        if cancel_wait is not None:
            watching.add(cancel_wait)
        timed_out = cancelled = False
        failure: BaseException | None = None
        try:
            while not self.watch.exited.done():
                now = time.monotonic()
                left = None if deadline is None else deadline - now
                if left is not None and left <= 0:
                    timed_out = True
                    break
                if next_check is not None and mem_limit_mib is not None and now >= next_check:
                    resident = await asyncio.to_thread(self.procs.resident_bytes)
                    if resident > mem_limit_mib << 20:
                        over_memory = resident
                        break
                    next_check = time.monotonic() + MEM_CHECK_S
                if next_disk is not None and disk is not None and now >= next_disk:
                    init = self.sandbox.init[0] if self.sandbox is not None and self.sandbox.init else None
                    over_disk = await asyncio.to_thread(runfiles.over, disk, init)
                    if over_disk:
                        break
                    next_disk = time.monotonic() + runfiles.DISK_CHECK_S
                wait = left
                for check in (next_check, next_disk):
                    if check is not None:
                        until_check = max(0.0, check - now)
                        wait = until_check if wait is None else min(wait, until_check)
                done, _ = await asyncio.wait(watching, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if self.watch.exited.done():
                    break
                if cancel_wait is not None and cancel_wait in done:
                    cancelled = True
                    break
                for reader in self.readers:
                    if reader in done:   # EOF on one stream, or the callback raised
                        watching.discard(reader)
                        failure = failure or (None if reader.cancelled() else reader.exception())
                if failure is not None:
                    break
        finally:
            if cancel_wait is not None:
                cancel_wait.cancel()
        if not self.watch.exited.done() and failure is None and not over_memory and not over_disk:
            # bubblewrap taking SIGTERM could tear its namespace down at once (--die-with-parent), reaped where
            # nothing counts it; the job's processes get it instead, and the sandbox ends when they do.
            await asyncio.to_thread(self.signal, signal.SIGTERM, leader=self.sandbox is None)
            await asyncio.wait({self.watch.exited}, timeout=term_grace)
        self.others_cpu_s = await self.stop_and_kill()   # what is left must not outlive the run, nor use CPU uncharged
        await self.watch.exited
        elapsed = time.monotonic() - started
        self.reap()
        if self.procs.roots_ending:   # its namespace's teardown takes the kernel a while: reaped after the result
            self._init_reaping = spawn(self.reap_sandbox_init(), name=f"sandbox-reap-{self.pid}", tasks=_CLEANUPS)
        else:
            await self.reap_sandbox_init()
        proctree.reap_strays()
        failure = failure or await self.drain()
        self.finished = True
        if failure is not None:
            raise failure
        result = self.result(elapsed, timeout, timed_out, cancelled)
        if over_memory and mem_limit_mib is not None:   # killed at once: no grace to grow further in
            result = dataclasses.replace(result, over_memory=True, reason=(
                f"memory limit hit ({over_memory / (1 << 20):.0f} MiB resident in all its processes, "
                f"limit {mem_limit_mib} MiB)"))
        elif over_disk:
            result = dataclasses.replace(result, over_disk=True, reason=over_disk)
        return result

    async def drain(self) -> BaseException | None:
        """Let the readers reach EOF (the group is dead, so they do) within a bound; close the pipes."""
        done, pending = await asyncio.wait(self.readers, timeout=OUTPUT_DRAIN_S)
        if pending:
            log.warning("output of pid %d still open %.0fs after its group was killed "
                        "(a process left the group?); output cut", self.pid, OUTPUT_DRAIN_S)
            for reader in pending:
                reader.cancel()
            await asyncio.wait(pending, timeout=1.0)
        self.close_pipes()
        for reader in done:
            if not reader.cancelled() and reader.exception() is not None:
                return reader.exception()
        return None

    def close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def result(self, elapsed: float, timeout: float | None, timed_out: bool, cancelled: bool) -> ExecResult:
        exit_code = sig = None
        cpu = self.others_cpu_s
        rss = 0
        if self.rusage is not None:
            cpu += self.rusage.ru_utime + self.rusage.ru_stime
            rss = int(self.rusage.ru_maxrss)   # KiB on Linux
        if self.status is None:
            reason = "exit status lost (the process was reaped by someone else)"
        elif os.WIFSIGNALED(self.status):
            sig = os.WTERMSIG(self.status)
            reason = f"killed by signal {sig} ({_signame(sig)})"
        else:
            exit_code = os.WEXITSTATUS(self.status)
            reason = ""
        if timed_out:
            reason = f"timed out after {timeout:g}s"
        elif cancelled:
            reason = "cancelled"
        return ExecResult(exit_code=exit_code, signal=sig, timed_out=timed_out, cancelled=cancelled,
                          elapsed_s=elapsed, cpu_s=cpu, max_rss_kb=rss, reason=reason)

    def abandon(self) -> None:
        """The caller was cancelled (or supervise broke): kill the group now, reap in the background."""
        if self.finished:
            return
        self.finished = True
        if not self.reaped:
            self.signal(signal.SIGKILL)
        for reader in self.readers:
            reader.cancel()
        spawn(self._cleanup(), name=f"exec-reap-{self.pid}", tasks=_CLEANUPS)

    async def _cleanup(self) -> None:
        try:
            if self._stopping is not None:   # a stop() the cancel interrupted: it ends, then what it stopped dies
                await asyncio.wait([self._stopping])
            if not self.reaped:   # what the one scan of abandon() missed (a child forked meanwhile)
                await asyncio.to_thread(self.procs.stop)
                await asyncio.to_thread(self.procs.kill)
            await self.watch.exited   # SIGKILLed: soon
            await asyncio.wait(self.readers, timeout=OUTPUT_DRAIN_S)
        finally:
            if not self.reaped:
                self.reap()           # blocks only if the loop is shutting down before the kill landed
            self.close_pipes()
            await self.reap_sandbox_init()
            proctree.reap_strays()


async def settle() -> None:
    """Wait for the reaping left to the background (abandoned runs, sandbox inits on their way out)."""
    while _CLEANUPS:
        await asyncio.wait(list(_CLEANUPS))


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return "unknown"


async def run(argv: Sequence[str], *, program: str, cwd: Path, env: Mapping[str, str],
              timeout: float | None, on_output: OutputCallback | None = None,
              cancel: asyncio.Event | None = None, term_grace: float = 2.0,
              preexec: Callable[[], None] | None = None, sandbox: SandboxInfo | None = None,
              mem_limit_mib: int | None = None, stdin: Path | None = None,
              disk: runfiles.DiskLimit | None = None, cgroup: RunCgroup | None = None) -> ExecResult:
    """Run ``program`` (the path ``Allowlist.resolve`` returned) with ``argv``; see the module doc.

    ``argv[0]`` is what the child sees as its name. Output goes to ``on_output("stdout"|"stderr", data)``
    as it arrives. Never raises for the program's own failure: ``Refused`` only if it cannot be started
    (reason ``not_found`` for ENOENT/EACCES and kin, ``exec_failed`` otherwise, ``policy`` for NUL bytes).
    An exception from ``on_output`` kills the group and is re-raised once the child is reaped.
    ``sandbox``: ``program`` is bubblewrap, told to name its namespace's init on ``sandbox``'s pipe; SIGTERM
    goes to what runs inside (bubblewrap taking it could tear the namespace down uncounted), and the init and
    what runs under it are stopped, counted and killed with the rest. ``run`` closes that pipe.
    ``mem_limit_mib``: the resident memory of the whole run (every process of it, ``proctree``) is summed
    every ``MEM_CHECK_S``; over the limit, the run is killed at once (no SIGTERM grace) and the result
    says ``over_memory``. Per-process limits (RLIMIT_AS) let four processes of 900 MiB each through.
    ``disk``: the run's files are counted every ``runfiles.DISK_CHECK_S`` (its directories, and a sandbox's
    private /tmp); over either bound the run is killed at once and the result says ``over_disk``.
    ``cgroup``: the run's cgroup (``cgroup.RunCgroup``), its first process moved in as soon as it is started.
    ``stdin``: a file the program reads as its standard input (opened here, without following a symlink);
    otherwise ``/dev/null``.
    """
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be positive or None, not {timeout!r}")
    started = time.monotonic()
    try:
        stdin_fd = None if stdin is None else os.open(stdin, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except BaseException:
        if sandbox is not None:
            sandbox.close()
        raise
    try:
        job = launch(argv, program=program, cwd=cwd, env=env, on_output=on_output, preexec=preexec,
                     sandbox=sandbox, stdin=stdin_fd, cgroup=cgroup)
    finally:
        if stdin_fd is not None:
            os.close(stdin_fd)   # the child has its copy
    result = await supervise(job, started, timeout=timeout, cancel=cancel, term_grace=term_grace,
                             mem_limit_mib=mem_limit_mib, disk=disk)
    if cgroup is not None:   # the caller removes the cgroup next: the sandbox's init must be out of it
        await job.settled()
    return result


def launch(argv: Sequence[str], *, program: str, cwd: Path, env: Mapping[str, str],
           on_output: OutputCallback | None = None, preexec: Callable[[], None] | None = None,
           sandbox: SandboxInfo | None = None, stdin: int | None = None,
           cgroup: RunCgroup | None = None) -> Running:
    """Start a run and watch it (its exit, its output, its processes), without waiting for it: ``run``'s
    first half, and how a warm runner (``warm``) is started ahead of its job. ``stdin``: a descriptor the
    child gets as its standard input (``subprocess.PIPE`` for a pipe, ``proc.stdin``), else ``/dev/null``.
    ``supervise`` the result, or ``abandon`` it. The same as ``watch(start(...))``."""
    return watch(start(argv, program=program, cwd=cwd, env=env, preexec=preexec, sandbox=sandbox, stdin=stdin,
                       cgroup=cgroup), on_output, sandbox)


def start(argv: Sequence[str], *, program: str, cwd: Path, env: Mapping[str, str],
          preexec: Callable[[], None] | None = None, sandbox: SandboxInfo | None = None, stdin: int | None = None,
          cgroup: RunCgroup | None = None) -> subprocess.Popen[bytes]:
    """``launch``'s first half, which may run in another thread (a warm runner is built off the event loop):
    the child started, in ``cgroup``, with ``sandbox``'s write end handed over. ``watch`` it next, at once."""
    try:
        if not argv:
            raise ValueError("argv is empty")
        with proctree.spawn_guard():   # until registered, it looks like a run's leftover (stray)
            proc = _start(argv, program, cwd, env, preexec, sandbox, stdin)
            proctree.supervised.add(proc.pid)   # at once: no stray sweep, nor a run's end, takes it for one
        if cgroup is not None:
            cgroup.add(proc.pid)
    except BaseException:
        if sandbox is not None:
            sandbox.close()
        raise
    if sandbox is not None:
        sandbox.close_write()   # bubblewrap has its copy: the pipe reads EOF once it is gone
    return proc


def watch(proc: subprocess.Popen[bytes], on_output: OutputCallback | None = None,
          sandbox: SandboxInfo | None = None) -> Running:
    """``launch``'s second half, on the event loop: the started child supervised from now on."""
    try:
        return Running(proc, on_output, sandbox)
    except BaseException:   # could not watch it: do not leave it running unsupervised
        kill_started(proc, sandbox)
        raise


def kill_started(proc: subprocess.Popen[bytes], sandbox: SandboxInfo | None = None) -> None:
    """Undo a ``start`` that will not be watched: the child's group killed and reaped, its pipes closed."""
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proctree.supervised.discard(proc.pid)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    if sandbox is not None:
        sandbox.close()


async def supervise(job: Running, started: float, *, timeout: float | None, cancel: asyncio.Event | None = None,
                    term_grace: float = 2.0, mem_limit_mib: int | None = None,
                    disk: runfiles.DiskLimit | None = None) -> ExecResult:
    """``run``'s second half: wait for a ``launch``ed run to end (or time out from ``started``, or be
    cancelled), kill what is left of it, and count what it used."""
    try:
        return await job.supervise(started, timeout, cancel, term_grace, mem_limit_mib, disk)
    except BaseException:
        job.abandon()
        raise
