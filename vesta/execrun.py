"""Run a peer's command on this node: the program allowlist, and a runner that is safe for the host.

The exec allowlist rule
=======================

An allowlist entry names a *file*, not a word. When the daemon starts, every
entry of ``exec_allowlist`` is resolved once:

- a bare name (``make``) is looked up in ``SAFE_PATH`` as ``execvp`` would:
  the first directory that holds an executable regular file of that name;
- an absolute path (``/opt/tools/bin/render``) is taken as written;
- then every symlink is followed (``os.path.realpath``). The result, say
  ``/usr/bin/make``, is the allowed file.

An entry that resolves to nothing (or a relative path such as ``bin/make``,
which has no directory to be relative to) is kept in ``Allowlist.missing``;
the daemon warns about it and it allows nothing. Files installed or moved
after start-up count from the next start.

A peer's ``argv[0]`` is resolved exactly as the node is about to execute it:
a bare name through ``SAFE_PATH``; anything containing ``/`` relative to the
job's fresh working directory (or absolute); symlinks followed and ``..``
taken on the real tree, as the kernel does. It must be an existing,
executable regular file, else the request is refused with ``not_found``.
It runs only if it *is* an allowed file: the same real path, or the same
inode on the same device (a hard link is that file under another name, not
a copy; its bytes cannot differ). The runner then executes the allowed
file's own real path, never the peer's spelling again. So with ``make``
allowed (``/usr/bin/make`` on this node):

- ``make``, ``/usr/bin/make``, ``/bin/make`` (merged ``/usr``),
  ``../../../usr/bin/make`` and a symlink or hard link named ``make`` that
  leads to ``/usr/bin/make`` all run ``/usr/bin/make``;
- ``./make``, ``/tmp/x/make`` or ``../bin/make`` that lead to any other file
  (a copy, a script, a symlink to ``/bin/sh``) are refused with
  ``not_allowed``, whatever they are called. Relative paths and ``..`` are
  refused unless the file they reach is itself allowed.

The name matters in one case. The program sees ``argv[0]`` as the peer wrote
it, and multi-call programs (busybox, toybox, coreutils built as one binary)
choose what to be from it: if ``true`` is ``/bin/busybox``, a peer asking for
``/bin/sh`` reaches the very same file. Therefore, when an allowed file's own
name differs from every name it was allowlisted under (``true`` ->
``busybox``, ``python3`` -> ``python3.11``), the last component of the peer's
``argv[0]`` must be one of those names (``python3``, ``./python3``,
``/usr/bin/python3``; not ``python3.11``). When the names agree (``make`` ->
``/usr/bin/make``) the file is enough.

The seed matched the *basename* of the requested program against the list.
That was dropped on purpose: a basename match lets ``./make`` -- a script the
job wrote and called make -- run anything.

What the allowlist cannot do:

- It checks the program, not what the program does with its arguments.
  Allowing an interpreter or anything that runs code or other programs it is
  given (``python3``, ``sh``, ``perl``, ``node``, ``make``, ``env``,
  ``xargs``, ``find``, ``nice``, ``timeout``, ``busybox``, ``ssh``) allows
  every program.
- It pins the file, not its contents: there is nothing to swap between the
  check and ``exec`` (the runner executes the checked real path, PATH and
  symlinks are not looked at again), but whoever can write the allowed file
  or its directory decides what runs. Allow only files in directories that
  only root (or the node owner) can write.
- An empty ``exec_allowlist`` with ``allow_exec`` on means any program at all
  (``Allowlist.any``); it still has to exist and be executable.

The runner
==========

``run()`` starts the program without a shell, stdin from ``/dev/null``, in
its own session (so its own process group, pgid == pid), with the
environment it is given (build it with ``scrubbed_env``: nothing of the
daemon's own environment, which may hold ``VESTA_KEY``). On timeout or cancel
the whole group gets SIGTERM, ``term_grace`` seconds later SIGKILL; and when
the main process ends for any reason, whatever is left of its group is
SIGKILLed while the dead leader still pins the group id (it is reaped only
afterwards, so the id cannot have been reused). The exit status and CPU time
come from ``wait4``: user+system time of the process and of the descendants
it waited for. Orphans killed at the end are reaped by init, not by us, so
their CPU time is not counted. A process that leaves the group (``setsid``,
a daemonizing program) escapes the group kill; only a cgroup or a sandbox
(bubblewrap, DESIGN.md) can hold it.

Processes and the job user
==========================

``Limits.procs`` bounds the tasks (processes *and* threads) a job may have,
with RLIMIT_NPROC. The kernel counts that limit per *real uid*, over every
task of that uid on the machine, and never applies it to root. So:

- a daemon running as root runs jobs as ``exec_user`` (``job_identity``,
  default ``nobody``): ``Limits.run_as`` makes the child drop to that user
  right after the setrlimit calls, and ``give_workdir`` hands it its
  directory; a daemon running as anyone else runs jobs as itself;
- the limit set is what that uid already has plus ``procs`` (``nproc_limit``),
  counted just before the fork. Jobs running side by side as the same user
  share that count: each may grow by ``procs`` over what existed when it
  started, so the total is bounded by the number of jobs times ``procs``.
- in the bubblewrap sandbox, bubblewrap itself stays root (it can then bind
  directories the job user cannot reach, and needs no unprivileged user
  namespaces) and ``setpriv`` (util-linux) drops to the job user inside it,
  with no capabilities and no_new_privs: ``bwrap_command(run_as=...)`` with
  ``Limits.preexec(switch_user=False)``.

What the job user can run is what that user can read: the program, its
interpreter and every directory above them must be open to it (a Python under
``/root`` is not; in the sandbox the exposed paths are re-created under fresh
0755 directories, so only the files' own modes count there).
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import os
import pwd
import re
import resource
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from vesta.errors import ConfigError, Refused
from vesta.tasks import spawn

log = logging.getLogger(__name__)

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"   # PATH jobs see and programs are looked up in
CHUNK = 64 * 1024           # bytes per on_output call at most
OUTPUT_DRAIN_S = 2.0        # after the group is dead, how long the output readers may take to reach EOF
_NOT_FOUND_ERRNOS = {errno.ENOENT, errno.EACCES, errno.ENOTDIR, errno.ELOOP, errno.EPERM}

# Set by the node, never by a caller's ``extra``.
_FIXED_ENV = frozenset({"PATH", "HOME", "TMPDIR", "VESTA_JOB_ID", "VESTA_NODE"})
# Variables that change how the dynamic loader or libc behave (glibc's "unsecure" list): with them, an
# allowlisted binary would load code of the job's choosing.
_LOADER_ENV = frozenset({
    "GCONV_PATH", "GETCONF_DIR", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH", "MALLOC_TRACE", "NIS_PATH",
    "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS", "TZDIR",
})
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

OutputCallback = Callable[[str, bytes], Awaitable[None] | None]


# ---------------------------------------------------------------------------------------------- allowlist


def _executable_file(path: str) -> bool:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK)


def _search(name: str, search_path: str) -> str | None:
    """First executable regular file called ``name`` in ``search_path``, as execvp finds it.

    Unlike execvp, empty or relative components are skipped: they would mean the job's own directory.
    """
    for directory in search_path.split(os.pathsep):
        if directory and os.path.isabs(directory):
            candidate = os.path.join(directory, name)
            if _executable_file(candidate):
                return candidate
    return None


def _real_executable(path: str) -> str | None:
    try:
        real = os.path.realpath(path, strict=True)
    except (OSError, ValueError):
        return None
    return real if _executable_file(real) else None


class Allowlist:
    """Programs peers may run. Built once from config ``exec_allowlist`` at daemon start (rule: module doc)."""

    def __init__(self, entries: Sequence[str], search_path: str = SAFE_PATH) -> None:
        self.entries = tuple(entries)
        self.search_path = search_path
        self.any = not self.entries        # allow_exec without a list: the owner allows every program
        self.missing: list[str] = []       # entries that resolve to nothing here; they allow nothing
        names: dict[str, set[str]] = {}
        for entry in self.entries:
            real = self._resolve_entry(entry)
            if real is None:
                self.missing.append(entry)
            else:
                names.setdefault(real, set()).add(os.path.basename(entry))
        # real path of each allowed file -> the names it was allowlisted under
        self.allowed: dict[str, frozenset[str]] = {path: frozenset(n) for path, n in names.items()}

    def _resolve_entry(self, entry: str) -> str | None:
        if not entry or "\0" in entry:
            return None
        if "/" not in entry:
            found = _search(entry, self.search_path)
            return None if found is None else _real_executable(found)
        return _real_executable(entry) if os.path.isabs(entry) else None

    def resolve(self, argv0: str, cwd: Path) -> str:
        """The real path the node will execute for ``argv0`` run in ``cwd``; ``Refused`` if it may not."""
        real = self._locate(argv0, cwd)
        if self.any:
            return real
        match = self._match(real)
        if match is None:
            raise Refused(f"{argv0!r} is not in this node's exec_allowlist (it is {real}; allowed: "
                          f"{', '.join(self.names()) or 'nothing'})", reason="not_allowed")
        path, names = match
        if os.path.basename(path) not in names and os.path.basename(argv0) not in names:
            raise Refused(f"{argv0!r} is not in this node's exec_allowlist ({path} is allowed only when "
                          f"called as {' or '.join(sorted(names))})", reason="not_allowed")
        return path

    def _locate(self, argv0: str, cwd: Path) -> str:
        if not argv0 or "\0" in argv0:
            raise Refused(f"program {argv0!r} is not a valid program name", reason="not_found")
        if "/" not in argv0:
            found = _search(argv0, self.search_path)
            if found is None:
                raise Refused(f"program {argv0!r} not found on this node (looked in {self.search_path})",
                              reason="not_found")
        else:
            found = os.path.join(os.path.abspath(cwd), argv0)   # an absolute argv0 replaces cwd
        try:
            real = os.path.realpath(found, strict=True)
        except (OSError, ValueError) as exc:
            raise Refused(f"program {argv0!r} not found on this node", reason="not_found") from exc
        if not _executable_file(real):
            raise Refused(f"program {argv0!r} ({real}) is not an executable file", reason="not_found")
        return real

    def _match(self, real: str) -> tuple[str, frozenset[str]] | None:
        names = self.allowed.get(real)
        if names is not None:
            return real, names
        try:
            st = os.stat(real)
        except OSError:
            return None
        for path, names in self.allowed.items():
            try:
                allowed = os.stat(path)     # now, not at start: an inode number freed by an upgrade is reused
            except OSError:
                continue
            if (allowed.st_dev, allowed.st_ino) == (st.st_dev, st.st_ino):
                return path, names          # a hard link: run the allowed path itself, not the job's link
        return None

    def names(self) -> list[str]:
        return sorted(n for names in self.allowed.values() for n in names)

    def describe(self) -> list[str]:
        """One line per allowed program, then the missing entries (for status output)."""
        if self.any:
            return ["any program (exec_allowlist is empty)"]
        lines = [f"{' / '.join(sorted(names))} -> {path}" for path, names in sorted(self.allowed.items())]
        lines += [f"{entry} (not found on this node: allows nothing)" for entry in self.missing]
        return lines


# ---------------------------------------------------------------------------------- environment, workdir


def scrubbed_env(*, job_id: str, node: str, workdir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment a job sees: nothing is inherited from the daemon (it may hold VESTA_KEY).

    ``extra`` may not set the node's own variables (PATH, HOME, TMPDIR, VESTA_*) nor loader variables
    (LD_*, GCONV_PATH, ...), which would let an allowlisted binary load code of the job's choosing.
    """
    tmp = workdir / "tmp"
    tmp.mkdir(mode=0o700, exist_ok=True)
    env = {
        "PATH": SAFE_PATH,
        "HOME": str(workdir),
        "TMPDIR": str(tmp),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "VESTA_JOB_ID": job_id,
        "VESTA_NODE": node,
    }
    for name, value in (extra or {}).items():
        if not _ENV_NAME.fullmatch(name) or "\0" in value:
            raise Refused(f"environment variable {name!r} is not a valid name=value", reason="policy")
        if name in _FIXED_ENV or name.startswith(("LD_", "VESTA_")) or name in _LOADER_ENV:
            raise Refused(f"environment variable {name} may not be set by a job", reason="policy")
        env[name] = value
    return env


def make_workdir(base: Path | None, job_id: str) -> Path:
    """A fresh private directory (0700) for one run, under ``base`` or the system temp dir."""
    safe = _UNSAFE_NAME_CHARS.sub("_", job_id)[:48].strip("._") or "job"
    if base is not None:
        base.mkdir(mode=0o711, parents=True, exist_ok=True)   # 0711: a job user may reach its own run in it
    return Path(tempfile.mkdtemp(prefix=f"vesta-{safe}-", dir=base))


def runs_dir(node: str) -> Path:
    """Where one node makes its runs' working directories: ``$TMPDIR/vesta-runs-NODE``. A restarted
    daemon empties it (nothing can still be running), so a crash leaves no job trees behind."""
    return Path(tempfile.gettempdir()) / f"vesta-runs-{_UNSAFE_NAME_CHARS.sub('_', node)}"


def remove_workdir(path: Path) -> None:
    """rm -rf ``path``, also where the job took away its own permissions; failures are logged."""
    if path.is_symlink():
        path.unlink()
        return
    if not path.is_dir():
        return
    stack = [str(path)]
    while stack:   # give every directory back u+rwx, top-down, so rmtree can list and empty it
        directory = stack.pop()
        try:
            os.chmod(directory, 0o700)
            with os.scandir(directory) as entries:
                stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            continue
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        log.warning("could not remove job directory %s completely", path)


def give_workdir(workdir: Path, run_as: tuple[int, int] | None) -> None:
    """Hand a fresh ``make_workdir`` directory and its ``tmp/`` to the job user (no-op when ``None``).

    Refused (reason ``policy``) when a directory above it is closed to that user: the job could not
    even start in it. ``remove_workdir`` (the daemon is root) still removes whatever the job leaves.
    """
    tmp = workdir / "tmp"
    tmp.mkdir(mode=0o700, exist_ok=True)
    if run_as is None:
        return
    uid, gid = run_as
    for parent in workdir.resolve().parents:
        if not _may(parent.stat(), uid, gid, stat.S_IXOTH):
            raise Refused(f"the job user (uid {uid}) cannot reach its working directory {workdir}: "
                          f"{parent} is closed to it", reason="policy")
    for path in (workdir, tmp):
        os.chown(path, uid, gid, follow_symlinks=False)


def usable_by(path: str | Path, run_as: tuple[int, int] | None, *, _depth: int = 0) -> bool:
    """Whether the job user may execute ``path``: every directory on the way searchable, the file
    executable, and so its ``#!`` interpreter, if it has one. From the mode bits alone (no ACLs); a
    script needs read access too. True when jobs run as the daemon's own user (``run_as`` None)."""
    if run_as is None:
        return True
    uid, gid = run_as
    real = Path(os.path.realpath(path))
    try:
        st = real.stat()
        if not (_may(st, uid, gid, stat.S_IXOTH) and all(_may(p.stat(), uid, gid, stat.S_IXOTH)
                                                        for p in real.parents)):
            return False
        with open(real, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    if not head.startswith(b"#!"):
        return True
    words = head[2:].split(b"\n", 1)[0].split()
    return (bool(words) and _depth < 4 and _may(st, uid, gid, stat.S_IROTH)
            and usable_by(os.fsdecode(words[0]), run_as, _depth=_depth + 1))


def _may(st: os.stat_result, uid: int, gid: int, other_bit: int) -> bool:
    """The permission ``other_bit`` (as S_I?OTH) for uid/gid, by owner, group, then other bits."""
    if st.st_uid == uid:
        return bool(st.st_mode & (other_bit << 6))
    if st.st_gid == gid:
        return bool(st.st_mode & (other_bit << 3))
    return bool(st.st_mode & other_bit)


# ------------------------------------------------------------------------------------------------ runner


@dataclass(frozen=True, slots=True)
class ExecResult:
    exit_code: int | None      # None when killed by a signal
    signal: int | None
    timed_out: bool
    cancelled: bool
    elapsed_s: float
    cpu_s: float               # user+sys from wait4 rusage (the process and its waited-for descendants)
    max_rss_kb: int
    reason: str                # "" on a normal exit, else a one-line why


def _start(argv: Sequence[str], program: str, cwd: Path, env: Mapping[str, str],
           preexec: Callable[[], None] | None) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(
            list(argv), executable=program, cwd=cwd, env=dict(env),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            close_fds=True, pass_fds=(), start_new_session=True, preexec_fn=preexec,
        )
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        reason = "not_found" if exc.errno in _NOT_FOUND_ERRNOS else "exec_failed"
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


async def _pump(pipe: IO[bytes], name: str, on_output: OutputCallback | None) -> None:
    """Read one stream to EOF in chunks; an async callback is awaited before the next read (backpressure)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=CHUNK)   # the transport pauses once 2 x CHUNK are buffered
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        while data := await reader.read(CHUNK):
            if on_output is not None:
                pending = on_output(name, data)
                if inspect.isawaitable(pending):
                    await pending
    finally:
        transport.close()


_CLEANUPS: set[asyncio.Task[Any]] = set()   # reapers of runs whose caller was cancelled


class _Running:
    """One started child: its exit watch, output readers and the group kill."""

    def __init__(self, proc: subprocess.Popen[bytes], on_output: OutputCallback | None) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.proc = proc
        self.pid = proc.pid          # == its process group id (start_new_session)
        self.watch = _ExitWatch(proc.pid)
        self.readers = [
            asyncio.ensure_future(_pump(proc.stdout, "stdout", on_output)),
            asyncio.ensure_future(_pump(proc.stderr, "stderr", on_output)),
        ]
        self.status: int | None = None
        self.rusage: resource.struct_rusage | None = None
        self.reaped = False
        self.finished = False

    def killpg(self, sig: int) -> None:
        """Signal the whole group. Only called before the leader is reaped, while its pid pins the group id."""
        assert not self.reaped
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:   # every member left is someone else's (a setuid program)
            log.warning("cannot signal process group %d", self.pid)

    def reap(self) -> None:
        """wait4 the leader; it has exited (the watch said so), so this does not block."""
        if self.reaped:
            return
        self.reaped = True
        self.watch.close()
        try:
            _, self.status, self.rusage = os.wait4(self.pid, 0)
        except ChildProcessError:
            log.warning("exit status of pid %d was taken by someone else", self.pid)
            self.proc.returncode = -1
        else:
            self.proc.returncode = os.waitstatus_to_exitcode(self.status)   # Popen must not wait for it

    async def supervise(self, started: float, timeout: float | None, cancel: asyncio.Event | None,
                        term_grace: float) -> ExecResult:
        deadline = None if timeout is None else started + timeout
        cancel_wait = None if cancel is None else asyncio.ensure_future(cancel.wait())
        watching: set[asyncio.Future[Any]] = {self.watch.exited, *self.readers}
        if cancel_wait is not None:
            watching.add(cancel_wait)
        timed_out = cancelled = False
        failure: BaseException | None = None
        try:
            while not self.watch.exited.done():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    timed_out = True
                    break
                done, _ = await asyncio.wait(watching, timeout=left, return_when=asyncio.FIRST_COMPLETED)
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
        if not self.watch.exited.done():
            if failure is None:
                self.killpg(signal.SIGTERM)
                await asyncio.wait({self.watch.exited}, timeout=term_grace)
            self.killpg(signal.SIGKILL)
            await self.watch.exited
        elapsed = time.monotonic() - started
        self.killpg(signal.SIGKILL)   # orphans left in the group: they must not outlive the job
        self.reap()
        failure = failure or await self.drain()
        self.finished = True
        if failure is not None:
            raise failure
        return self.result(elapsed, timeout, timed_out, cancelled)

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
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def result(self, elapsed: float, timeout: float | None, timed_out: bool, cancelled: bool) -> ExecResult:
        exit_code = sig = None
        cpu = 0.0
        rss = 0
        if self.rusage is not None:
            cpu = self.rusage.ru_utime + self.rusage.ru_stime
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
            self.killpg(signal.SIGKILL)
        for reader in self.readers:
            reader.cancel()
        spawn(self._cleanup(), name=f"exec-reap-{self.pid}", tasks=_CLEANUPS)

    async def _cleanup(self) -> None:
        try:
            await self.watch.exited   # SIGKILLed: soon
            if not self.reaped:
                self.killpg(signal.SIGKILL)
            await asyncio.wait(self.readers, timeout=OUTPUT_DRAIN_S)
        finally:
            if not self.reaped:
                self.reap()           # blocks only if the loop is shutting down before the kill landed
            self.close_pipes()


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return "unknown"


async def run(argv: Sequence[str], *, program: str, cwd: Path, env: Mapping[str, str],
              timeout: float | None, on_output: OutputCallback | None = None,
              cancel: asyncio.Event | None = None, term_grace: float = 2.0,
              preexec: Callable[[], None] | None = None) -> ExecResult:
    """Run ``program`` (the path ``Allowlist.resolve`` returned) with ``argv``; see the module doc.

    ``argv[0]`` is what the child sees as its name. Output goes to ``on_output("stdout"|"stderr", data)``
    as it arrives. Never raises for the program's own failure: ``Refused`` only if it cannot be started
    (reason ``not_found`` for ENOENT/EACCES and kin, ``exec_failed`` otherwise, ``policy`` for NUL bytes).
    An exception from ``on_output`` kills the group and is re-raised once the child is reaped.
    """
    if not argv:
        raise ValueError("argv is empty")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be positive or None, not {timeout!r}")
    started = time.monotonic()
    proc = _start(argv, program, cwd, env, preexec)
    try:
        job = _Running(proc, on_output)
    except BaseException:   # could not watch it: do not leave it running unsupervised
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    try:
        return await job.supervise(started, timeout, cancel, term_grace)
    except BaseException:
        job.abandon()
        raise


# ------------------------------------------------------------------------------------------------ limits


def job_identity(exec_user: str) -> tuple[int, int] | None:
    """(uid, gid) that jobs run as: ``exec_user``'s when the daemon is root, else ``None`` (jobs run as
    the daemon's own user). An empty ``exec_user`` also means ``None``: root jobs with no process limit.

    ``exec_user`` is a user name or a numeric uid. ``ConfigError`` if it does not exist or is root.
    """
    if os.geteuid() != 0 or not exec_user:
        return None
    try:
        entry = pwd.getpwuid(int(exec_user)) if exec_user.isdigit() else pwd.getpwnam(exec_user)
    except (KeyError, ValueError, OverflowError):
        raise ConfigError(
            f"exec_user {exec_user!r} does not exist on this node: the daemon runs as root, so exec jobs "
            f"run as this user (to bound their processes). Create it (useradd --system --no-create-home "
            f"{exec_user}) or set exec_user to an existing unprivileged user such as 'nobody'") from None
    if entry.pw_uid == 0:
        raise ConfigError(f"exec_user {exec_user!r} is root: exec jobs must run as an unprivileged user "
                          f"(root ignores the process limit); 'nobody' or a user of their own")
    return entry.pw_uid, entry.pw_gid


def count_tasks(uid: int, proc_root: Path = Path("/proc")) -> int:
    """Tasks (processes and their threads) whose real uid is ``uid``: what RLIMIT_NPROC counts."""
    total = 0
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return 0
    for name in entries:
        if not name.isdigit():
            continue
        real_uid = threads = None
        try:
            with open(proc_root / name / "status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        real_uid = int(line.split()[1])
                    elif line.startswith(b"Threads:"):
                        threads = int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):   # exited meanwhile, or not a process directory
            continue
        if real_uid == uid:
            total += threads or 1
    return total


def nproc_limit(uid: int, allowance: int, proc_root: Path = Path("/proc")) -> int:
    """The RLIMIT_NPROC value that lets one more job of ``uid`` have ``allowance`` tasks: the kernel
    counts every task of that real uid, so it is what the uid has now plus the allowance."""
    if allowance <= 0:
        raise ValueError(f"allowance must be positive, not {allowance!r}")
    return count_tasks(uid, proc_root) + allowance


_warned_root_nproc = False


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits for one exec run, applied with setrlimit in the child before exec."""

    mem_mib: int            # RLIMIT_AS: address space (virtual memory), MiB
    cpu_s: int              # RLIMIT_CPU: CPU seconds (SIGXCPU, then SIGKILL)
    file_mib: int           # RLIMIT_FSIZE: largest file it may write (SIGXFSZ)
    open_files: int = 1024  # RLIMIT_NOFILE
    procs: int = 0          # tasks (processes + threads) the job may have, through RLIMIT_NPROC; 0: no limit
    run_as: tuple[int, int] | None = None   # (uid, gid) the job runs as (job_identity); None: ours

    def preexec(self, *, switch_user: bool = True) -> Callable[[], None]:
        """The child-side function: only setrlimit, then setgroups/setgid/setuid (safe between fork and exec).

        The process limit is worked out here, in the parent, just before the fork (``nproc_limit``).
        ``switch_user=False`` keeps the child's user: for ``bwrap_command(run_as=...)``, which switches
        inside the sandbox (bubblewrap itself must stay root there).
        """
        settings = [
            (resource.RLIMIT_AS, self.mem_mib * 1024 * 1024),
            (resource.RLIMIT_CPU, self.cpu_s),
            (resource.RLIMIT_FSIZE, self.file_mib * 1024 * 1024),
            (resource.RLIMIT_NOFILE, self.open_files),
            (resource.RLIMIT_CORE, 0),
        ]
        if self.procs > 0:
            uid = os.getuid() if self.run_as is None else self.run_as[0]
            if uid == 0:
                _warn_root_nproc()
            settings.append((resource.RLIMIT_NPROC, nproc_limit(uid, self.procs)))
        ids = self.run_as if switch_user else None

        def apply() -> None:
            for which, value in settings:
                resource.setrlimit(which, (value, value))
            if ids is not None:
                os.setgroups([])
                os.setgid(ids[1])
                os.setuid(ids[0])

        return apply

    def explain(self, result: ExecResult, output_tail: bytes) -> str:
        """Which limit a failed run most likely hit, or "" when none."""
        # A sandboxed run reports its program's death by signal N as exit status 128+N.
        died_of = result.signal or ((result.exit_code or 0) - 128 if (result.exit_code or 0) > 128 else None)
        if died_of == signal.SIGXCPU:
            return f"CPU time limit hit ({self.cpu_s} s)"
        if died_of == signal.SIGXFSZ:
            return f"file size limit hit ({self.file_mib} MiB per file)"
        failed = result.signal is not None or (result.exit_code or 0) != 0
        if failed and self.procs > 0 and any(m in output_tail for m in _FORK_MARKERS):
            return f"process limit hit ({self.procs} processes)"
        if failed and any(m in output_tail for m in _OOM_MARKERS):
            return f"memory limit hit ({self.mem_mib} MiB of address space)"
        return ""


def _warn_root_nproc() -> None:
    global _warned_root_nproc
    if not _warned_root_nproc:
        _warned_root_nproc = True
        log.warning("exec jobs run as root: the process limit is not enforced (set exec_user)")


_OOM_MARKERS = (b"MemoryError", b"Cannot allocate memory", b"bad_alloc", b"out of memory", b"Out of memory")
# How shells, libc and interpreters report EAGAIN from fork/clone (the process limit); threads count too.
_FORK_MARKERS = (b"Resource temporarily unavailable", b"fork: retry", b"Cannot fork", b"can't fork",
                 b"BlockingIOError", b"can't start new thread", b"pthread_create")


# ------------------------------------------------------------------------------------------------ sandbox


def find_setpriv(search_path: str = SAFE_PATH) -> str:
    """Path of ``setpriv`` (util-linux), which drops to the job user inside the sandbox; ``ConfigError``
    if missing. Call it at start-up when the daemon is root and sandboxed."""
    found = _search("setpriv", search_path)
    if found is None:
        raise ConfigError(f"the bwrap sandbox running as root needs setpriv (util-linux) to run jobs as "
                          f"exec_user; it is not in {search_path}: install util-linux")
    return found


def bwrap_command(bwrap: str, *, program: str, argv: Sequence[str], workdir: Path, allow_network: bool,
                  hide: Sequence[Path] = (), expose: Sequence[Path] = (),
                  run_as: tuple[int, int] | None = None, setpriv: str | None = None) -> tuple[str, list[str]]:
    """Wrap a run in bubblewrap: the system read-only, the working directory read-write, a private
    /tmp, /home and /root, the ``hide`` paths (the daemon's own state, its control socket) replaced
    by empty directories, then the ``expose`` paths (vesta's own Python, the program's directory)
    bound back read-only so the program and its interpreter can still be found; new pid/ipc/uts
    namespaces, no network unless allowed, and the job killed when the runner dies. Returns
    (program, argv) to hand to ``run``.

    With ``run_as`` (uid, gid), bubblewrap runs as root and ``setpriv`` (``find_setpriv()`` when not
    given) drops to that user inside, clearing groups and every capability and setting no_new_privs;
    pair it with ``Limits.preexec(switch_user=False)``. The directories the sandbox makes above the
    exposed paths and the workdir (inside its private mounts) are then 0755, so the job user can reach
    them; what it finds there still needs modes that let it read and run.

    The program's argv[0] becomes its resolved path (bwrap 0.8 cannot set it), so a multi-call
    binary (busybox) sees its own name inside the sandbox.
    """
    mounts = ["/tmp", "/home", "/root"]
    mounts += [str(p) for p in hide if p.is_dir() and str(p) not in ("/", "/tmp")]
    shown = sorted({str(p) for p in expose if p.is_dir() and str(p) != "/"}, key=len)
    reach = [] if run_as is None else [*shown, str(workdir)]   # what the job user must get to
    cmd = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    opened: set[str] = set()
    for mount in mounts:
        cmd += ["--tmpfs", mount]
        cmd += _open_parents(mount, mounts, reach, shown, opened)
    for path in shown:
        cmd += ["--ro-bind", path, path]
    cmd += ["--bind", str(workdir), str(workdir), "--chdir", str(workdir),
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent", "--new-session"]
    if not allow_network:
        cmd.append("--unshare-net")
    cmd.append("--")
    if run_as is not None:
        uid, gid = run_as
        cmd += [setpriv or find_setpriv(), f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    cmd += [program, *argv[1:]]
    return bwrap, cmd


def _open_parents(mount: str, mounts: Sequence[str], reach: Sequence[str], shown: Sequence[str],
                  opened: set[str]) -> list[str]:
    """``--perms 0755 --dir`` for the directories between ``mount`` and each path in ``reach`` whose
    innermost private mount it is. bubblewrap makes the directories it needs 0700 (``/root/.pyenv``
    above an exposed Python), which would close the way to the job user; run right after the mount,
    before a nested one (a hidden ``/root/.local/state/vesta``) makes them first. Directories inside
    an exposed path are the host's own (bound read-only) and are left alone."""
    args: list[str] = []
    for path in reach:
        inside = [m for m in mounts if path.startswith(m.rstrip("/") + "/")]
        if not inside or max(inside, key=len) != mount:
            continue
        for parent in reversed(Path(path).parents):
            name = str(parent)
            if len(name) <= len(mount) or name in opened:
                continue
            if any(name == s or name.startswith(s.rstrip("/") + "/") for s in shown):
                continue
            opened.add(name)
            args += ["--perms", "0755", "--dir", name]
    return args
