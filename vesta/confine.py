"""Confine a run: resource limits, the unprivileged job user and the bubblewrap sandbox.

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

import logging
import os
import pwd
import resource
import shutil
import signal
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vesta.allowlist import SAFE_PATH
from vesta.errors import ConfigError, Refused
from vesta.execrun import ExecResult
from vesta.rundir import home_of, make_home

log = logging.getLogger(__name__)


def prepare_workdir(workdir: Path, run_as: tuple[int, int] | None) -> Path:
    """Make a fresh ``make_workdir`` directory's ``tmp/`` and its HOME (``rundir.make_home``), still the daemon's
    own; the HOME. Refused (reason ``policy``) when a directory above it is closed to the job user: the job
    could not even start in it."""
    tmp = workdir / "tmp"
    tmp.mkdir(mode=0o700, exist_ok=True)
    if run_as is not None:
        uid, gid = run_as
        for parent in workdir.resolve().parents:
            if not _may(parent.stat(), uid, gid, stat.S_IXOTH):
                raise Refused(f"the job user (uid {uid}) cannot reach its working directory {workdir}: "
                              f"{parent} is closed to it", reason="policy")
    return make_home(workdir)


def give_workdir(workdir: Path, run_as: tuple[int, int] | None) -> None:
    """Hand a ``make_workdir`` directory, everything in it and its HOME to the job user (no-op when ``None``),
    what is inside first: until the directory itself is the job user's (0700) no process of that user can
    reach in, so none can swap a directory for a symlink while the daemon (root) hands the files over.

    Refused (reason ``policy``) as ``prepare_workdir``. ``remove_workdir`` (the daemon is root) still removes
    whatever the job leaves.
    """
    home = prepare_workdir(workdir, run_as)
    if run_as is None:
        return
    uid, gid = run_as
    for top, dirs, names in os.walk(workdir):
        for entry in (*dirs, *names):
            os.chown(os.path.join(top, entry), uid, gid, follow_symlinks=False)
    for path in (home, workdir):
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


COUNT_TTL_S = 1.0   # jobs started within this of each other share one count of the uid's tasks
_counted: dict[tuple[int, Path], tuple[float, int]] = {}


def nproc_limit(uid: int, allowance: int, proc_root: Path = Path("/proc")) -> int:
    """The RLIMIT_NPROC value that lets one more job of ``uid`` have ``allowance`` tasks: the kernel
    counts every task of that real uid, so it is what the uid has now plus the allowance. (Counting
    reads every process's status, milliseconds: a count less than COUNT_TTL_S old is reused, as if
    those jobs had started together.)"""
    if allowance <= 0:
        raise ValueError(f"allowance must be positive, not {allowance!r}")
    now = time.monotonic()
    when, count = _counted.get((uid, proc_root), (-COUNT_TTL_S, 0))
    if now - when >= COUNT_TTL_S:
        count = count_tasks(uid, proc_root)
        _counted[(uid, proc_root)] = (now, count)
    return count + allowance


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

    def values(self) -> list[tuple[int, str, int]]:
        """(resource, prlimit option, value) of every limit; the process limit is worked out now
        (``nproc_limit``), just before the run starts."""
        values = [
            (resource.RLIMIT_AS, "as", self.mem_mib * 1024 * 1024),
            (resource.RLIMIT_CPU, "cpu", self.cpu_s),
            (resource.RLIMIT_FSIZE, "fsize", self.file_mib * 1024 * 1024),
            (resource.RLIMIT_NOFILE, "nofile", self.open_files),
            (resource.RLIMIT_CORE, "core", 0),
        ]
        if self.procs > 0:
            uid = os.getuid() if self.run_as is None else self.run_as[0]
            if uid == 0:
                _warn_root_nproc()
            values.append((resource.RLIMIT_NPROC, "nproc", nproc_limit(uid, self.procs)))
        return values

    def preexec(self, *, switch_user: bool = True) -> Callable[[], None]:
        """The child-side function: only setrlimit, then setgroups/setgid/setuid (safe between fork and exec).

        The process limit is worked out here, in the parent, just before the fork (``nproc_limit``).
        ``switch_user=False`` keeps the child's user: for ``bwrap_command(run_as=...)``, which switches
        inside the sandbox (bubblewrap itself must stay root there).
        """
        settings = [(which, value) for which, _, value in self.values()]
        ids = self.run_as if switch_user else None

        def apply() -> None:
            for which, value in settings:
                resource.setrlimit(which, (value, value))
            if ids is not None:
                os.setgroups([])
                os.setgid(ids[1])
                os.setuid(ids[0])

        return apply

    def command(self, prlimit: str, program: str, argv: Sequence[str], *, setpriv: str | None = None,
                switch_user: bool = True) -> tuple[str, list[str]]:
        """The same limits (and user switch) as ``preexec``, as a command prefix instead: ``prlimit``
        (util-linux) sets them on itself and execs the rest, ``setpriv`` then drops to ``run_as``.
        Without a preexec function Python spawns with vfork; with one it forks the whole daemon,
        about 8 ms more per run here. The program sees its resolved path as ``argv[0]``."""
        cmd = [prlimit, *(f"--{name}={value}" for _, name, value in self.values()), "--"]
        if switch_user and self.run_as is not None:
            cmd += drop_to(self.run_as, setpriv or find_setpriv())
        return prlimit, [*cmd, program, *argv[1:]]

    def explain(self, result: ExecResult, output_tail: bytes) -> str:
        """Which limit a failed run most likely hit, or "" when none."""
        if result.over_memory or result.over_disk:   # the run's own watch killed it: it says how much
            return result.reason
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


def drop_to(run_as: tuple[int, int], setpriv: str) -> list[str]:
    """The command prefix that runs the rest as ``run_as`` with no groups, capabilities or new privileges."""
    return [setpriv, f"--reuid={run_as[0]}", f"--regid={run_as[1]}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs", "--"]


def find_setpriv(search_path: str = SAFE_PATH) -> str:
    """Path of ``setpriv`` (util-linux), which drops to the job user; ``ConfigError`` if missing. The
    daemon looks for it at start-up when it is root (jobs then run as exec_user)."""
    found = shutil.which("setpriv", path=search_path)
    if found is None:
        raise ConfigError(f"vestad running as root needs setpriv (util-linux) to run jobs as exec_user; "
                          f"it is not in {search_path}: install util-linux")
    return found


def bwrap_command(bwrap: str, *, program: str, argv: Sequence[str], workdir: Path, allow_network: bool,
                  hide: Sequence[Path] = (), expose: Sequence[Path] = (),
                  run_as: tuple[int, int] | None = None, setpriv: str | None = None,
                  info_fd: int | None = None, die_with_parent: bool = True,
                  tmp_bytes: int | None = None) -> tuple[str, list[str]]:
    """Wrap a run in bubblewrap: the system read-only, the working directory and its HOME read-write, a private
    /tmp, /home and /root, the ``hide`` paths (the daemon's own state, its control socket) replaced
    by empty directories, then the ``expose`` paths (vesta's own Python, the program's directory)
    bound back read-only so the program and its interpreter can still be found (a ``hide`` path inside
    one of them is emptied again over that bind); new pid/ipc/uts
    namespaces, no network unless allowed, and the job killed when the runner dies. Returns
    (program, argv) to hand to ``run``.

    With ``run_as`` (uid, gid), bubblewrap runs as root and ``setpriv`` (``find_setpriv()`` when not
    given) drops to that user inside, clearing groups and every capability and setting no_new_privs;
    pair it with ``Limits.preexec(switch_user=False)``. The directories the sandbox makes above the
    exposed paths and the workdir (inside its private mounts) are then 0755, so the job user can reach
    them; what it finds there still needs modes that let it read and run.

    The program's argv[0] becomes its resolved path (bwrap 0.8 cannot set it), so a multi-call
    binary (busybox) sees its own name inside the sandbox.

    ``info_fd``: bubblewrap writes its namespace's init there (``execrun.SandboxInfo``), so its CPU time
    can be counted. ``die_with_parent=False`` lets the namespace outlive bubblewrap, which exits as soon
    as the job's main process does: only for a subreaper runner (``proctree``), which adopts the init,
    counts what is left in it and kills it (the kernel's own teardown would reap it uncounted).

    ``tmp_bytes``: the private /tmp is a tmpfs of at most this size (exec_max_disk_mb).
    """
    home = home_of(workdir)   # the run's HOME beside it (rundir.scrubbed_env), when it has one
    homes = [str(home)] if home.is_dir() and not home.is_symlink() else []
    mounts = ["/tmp", "/home", "/root"]
    mounts += [str(p) for p in hide if p.is_dir() and str(p) not in ("/", "/tmp")]
    shown = sorted({str(p) for p in expose if p.is_dir() and str(p) != "/"}, key=len)
    reach = [] if run_as is None else [*shown, str(workdir), *homes]   # what the job user must get to
    cmd = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    opened: set[str] = set()
    for mount in mounts:
        if mount == "/tmp":   # the job's own /tmp, as on any system: writable by the job user, sticky
            cmd += [*(["--size", str(tmp_bytes)] if tmp_bytes else []), "--perms", "1777", "--tmpfs", mount]
        else:
            cmd += ["--tmpfs", mount]
        cmd += _open_parents(mount, mounts, reach, shown, opened)
    for path in shown:
        cmd += ["--ro-bind", path, path]
    for mount in mounts[3:]:   # a hidden path inside an exposed one (state under the program's directory):
        if any(mount.startswith(path.rstrip("/") + "/") for path in shown):   # hidden again, over the bind
            cmd += ["--tmpfs", mount]
    for path in homes:
        cmd += ["--bind", path, path]
    cmd += ["--bind", str(workdir), str(workdir), "--chdir", str(workdir),
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--new-session"]
    if die_with_parent:
        cmd.append("--die-with-parent")
    if not allow_network:
        cmd.append("--unshare-net")
    if info_fd is not None:
        cmd += ["--info-fd", str(info_fd)]
    cmd.append("--")
    if run_as is not None:
        cmd += drop_to(run_as, setpriv or find_setpriv())
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
