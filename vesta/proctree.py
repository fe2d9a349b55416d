"""The processes of one exec run, found in /proc: to stop them, count their CPU time and kill them.

``execrun.run`` starts a program in its own session, so the leader's pid is also its group and session id.
The run's *members* are every other process in that group or that session, or descended from one that is:
a child that called ``setpgid`` is still in the session; one that called ``setsid`` is still its parent's
child while the parent lives (bubblewrap runs the job in a new session under the sandbox's init, which is
in the group). The leader is left out: its own CPU time, and that of the children it waited for, come from
``wait4``. Until the leader is reaped its pid pins the group and session ids, so no other process can hold
them; ``execrun`` looks only in that window.

Stopping comes before counting. The group gets SIGSTOP, every member found gets it through a pidfd, and the
scan repeats until it finds no member still running (a fork bomb races the scan, so the rounds are
bounded). Stopped processes use no CPU, so the count is what they used: their own time, plus what the
children they reaped used. Then they are SIGKILLed through the same pidfds, which name the very processes
that were stopped, never a later process that was given a freed pid.

What escapes: a process whose parent in the run exited before the scan (it is init's child now) and that
left the session as well. Only a sandbox's pid namespace or a cgroup holds those.

A sandbox is counted another way. bubblewrap exits as soon as the job's main process does, without waiting
for the init of its pid namespace, which is then reaped by whoever adopts it. ``vestad`` makes itself a
*subreaper* (``become_subreaper``) so that it adopts it; ``execrun`` then waits for that init, and its
rusage holds everything that ran in the sandbox (every process there is reaped by it in the end). Other
orphans of runs come to vestad too; ``reap_strays`` reaps those that died.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PROC = Path("/proc")
STOP_ROUNDS = 20        # scans spent stopping a run that keeps forking; what still runs after them is not counted
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
_IDLE_STATES = frozenset("TtZXx")   # stopped, traced, zombie, dead: they use no more CPU
_NO_PIDFD = -1
_PR_SET_CHILD_SUBREAPER = 36
_subreaper = False
supervised: set[int] = set()   # children waited for by their own supervisor (run leaders, sandbox inits)


@dataclass(frozen=True, slots=True)
class ProcStat:
    """What one /proc/PID/stat says that matters here."""

    pid: int
    ppid: int
    pgrp: int
    session: int
    state: str
    cpu_s: float        # utime + stime + cutime + cstime: its own CPU and that of the children it reaped
    start: int          # clock ticks after boot: with the pid, names one process for good


def parse_stat(pid: int, raw: bytes) -> ProcStat | None:
    """One stat line, or None if it does not parse. The name in parentheses is free text: split after the last ')'."""
    try:
        fields = raw[raw.rindex(b")") + 2:].split()
        return ProcStat(pid=pid, ppid=int(fields[1]), pgrp=int(fields[2]), session=int(fields[3]),
                        state=fields[0].decode("ascii"), cpu_s=sum(int(f) for f in fields[11:15]) * _TICK_S,
                        start=int(fields[19]))
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def read_stat(pid: int, proc_root: Path = PROC) -> ProcStat | None:
    """The stat of ``pid``, or None if it is gone (or unreadable)."""
    try:
        fd = os.open(f"{proc_root}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4096)
    except OSError:   # ESRCH: it was reaped between the open and the read
        return None
    finally:
        os.close(fd)
    return parse_stat(pid, raw)


def scan(proc_root: Path = PROC) -> Iterator[ProcStat]:
    """Every process there is now (thread group leaders: a process's stat covers all its threads)."""
    with os.scandir(proc_root) as entries:
        for entry in entries:
            if entry.name.isdigit():
                st = read_stat(int(entry.name), proc_root)
                if st is not None:
                    yield st


def members(stats: Iterable[ProcStat], leader: int) -> dict[int, ProcStat]:
    """The processes of ``leader``'s run among ``stats``: in its group or session, or descended from one."""
    found: dict[int, ProcStat] = {}
    by_parent: dict[int, list[ProcStat]] = {}
    for st in stats:
        if st.pid == leader:
            continue
        if st.pgrp == leader or st.session == leader:
            found[st.pid] = st
        else:
            by_parent.setdefault(st.ppid, []).append(st)
    todo = [leader, *found]
    while todo:
        for child in by_parent.pop(todo.pop(), ()):
            found[child.pid] = child
            todo.append(child.pid)
    return found


class RunProcs:
    """The members of one run; each one signalled is held by a pidfd until ``close``."""

    def __init__(self, leader: int, proc_root: Path = PROC) -> None:
        self.leader = leader
        self.proc_root = proc_root
        self._held: dict[int, tuple[int, int]] = {}   # pid -> (pidfd or _NO_PIDFD, start)
        self._all_held = False    # stop() saw every member stopped and held: kill() needs no scan

    def find(self) -> dict[int, ProcStat]:
        return members(scan(self.proc_root), self.leader)

    def signal(self, sig: int, *, leader: bool = True) -> None:
        """Send ``sig`` to every member found now, and to the leader unless told not to."""
        found = self.find()     # before the leader can die: its children are descendants only while it lives
        if leader:
            self._killpg(sig)   # the whole group at once, the leader included
        for st in found.values():
            self._send(st.pid, st.start, sig)

    def stop(self, *, leader_gone: bool = False) -> float:
        """SIGSTOP every member until a scan finds none running; the CPU seconds the members used.

        ``leader_gone``: the leader has exited, so in a subreaper whatever it left is our child now; with no
        such child there is nothing to scan for (the usual end of a run, and a scan of /proc costs ~5 us a
        process)."""
        if leader_gone and _subreaper and not adopted_children():
            self._all_held = True
            return 0.0
        found: dict[int, ProcStat] = {}
        for _ in range(STOP_ROUNDS):
            self._killpg(signal.SIGSTOP)
            found = self.find()
            busy = [st for st in found.values() if st.state not in _IDLE_STATES or st.pid not in self._held]
            if not busy:
                self._all_held = True
                break
            for st in busy:
                self._send(st.pid, st.start, signal.SIGSTOP)
            os.sched_yield()   # a member with SIGSTOP pending stops once it runs
        else:
            unheld = [pid for pid in found if pid not in self._held]
            if unheld:
                log.warning("run %d was still starting processes after %d rounds (%s): they are killed uncounted",
                            self.leader, STOP_ROUNDS, ", ".join(map(str, unheld[:5])))
        return sum(st.cpu_s for st in found.values())

    def kill(self) -> None:
        """SIGKILL the group and every member: the ones held, and (unless ``stop`` held them all) the ones found now."""
        found = {} if self._all_held else self.find()   # before the leader dies and orphans its children
        self._killpg(signal.SIGKILL)
        for pid, (_, start) in list(self._held.items()):
            self._send(pid, start, signal.SIGKILL)
        for st in found.values():
            self._send(st.pid, st.start, signal.SIGKILL)

    def close(self) -> None:
        for fd, _ in self._held.values():
            if fd != _NO_PIDFD:
                os.close(fd)
        self._held.clear()

    def _killpg(self, sig: int) -> None:
        try:
            os.killpg(self.leader, sig)
        except ProcessLookupError:
            pass
        except PermissionError:   # every member left is someone else's (a setuid program)
            log.warning("cannot signal process group %d", self.leader)

    def _send(self, pid: int, start: int, sig: int) -> None:
        held = self._held.get(pid)
        if held is None:
            held = self._hold(pid, start)
            if held is None:
                return
        fd, start = held
        try:
            if fd != _NO_PIDFD:
                signal.pidfd_send_signal(fd, sig)
            elif self._same(pid, start):   # no pidfds here: the start time check narrows the pid-reuse race
                os.kill(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            log.warning("cannot signal pid %d of run %d (a setuid program?)", pid, self.leader)

    def _hold(self, pid: int, start: int) -> tuple[int, int] | None:
        """A pidfd on ``pid`` if it is still the process seen in the scan; None if that one is gone."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        except OSError as exc:   # kernel < 5.3, or a seccomp filter
            if exc.errno not in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
                raise
            fd = _NO_PIDFD
        except AttributeError:   # pragma: no cover - Python without pidfd_open (not Linux)
            fd = _NO_PIDFD
        if not self._same(pid, start):   # the pid was freed and given to another process after the scan
            if fd != _NO_PIDFD:
                os.close(fd)
            return None
        self._held[pid] = (fd, start)
        return fd, start

    def _same(self, pid: int, start: int) -> bool:
        now = read_stat(pid, self.proc_root)
        return now is not None and now.start == start


def become_subreaper() -> bool:
    """Adopt the orphans of every descendant from now on (prctl PR_SET_CHILD_SUBREAPER); False, with a
    warning, where the kernel refuses. Process-wide: for ``vestad``'s main, never for a library user."""
    global _subreaper
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        log.warning("cannot adopt the orphans of jobs (prctl PR_SET_CHILD_SUBREAPER: %s): CPU time used inside "
                    "the sandbox is not counted", exc)
        return False
    _subreaper = True
    return True


def is_subreaper() -> bool:
    return _subreaper


def _children() -> list[int] | None:
    """This process's children (each thread's, /proc/self/task/*/children: CONFIG_PROC_CHILDREN); None if the
    kernel does not say, or a thread ended while we looked."""
    me = os.getpid()
    found: list[int] = []
    try:
        for tid in os.listdir(f"{PROC}/{me}/task"):   # a child belongs to the thread that forked it
            with open(f"{PROC}/{me}/task/{tid}/children", "rb") as f:
                found += map(int, f.read().split())
    except OSError:
        return None
    return found


def _stray(pid: int, own_session: int) -> ProcStat | None:
    """The stat of child ``pid`` if it may be a run's leftover (not supervised, not of our own session)."""
    if pid in supervised:
        return None
    st = read_stat(pid)
    return st if st is not None and st.session != own_session else None


def adopted_children() -> bool:
    """Whether this process has a child that may be left over from a run: one not ``supervised`` and not of
    our own session. False only when sure."""
    children = _children()
    if children is None:
        return True
    own_session = os.getsid(0)
    return any(_stray(pid, own_session) is not None for pid in children)


def reap_strays(limit: int = 64) -> int:
    """Reap adopted orphans that died: zombie children not in ``supervised`` and not of our own session (those
    are ``subprocess.run``'s). Only in a subreaper; how many were reaped."""
    if not _subreaper:
        return 0
    own_session = os.getsid(0)
    children = _children()
    if children is None:   # only the first child that can be waited for is visible this way
        try:
            found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            found = None
        children = [] if found is None else [found.si_pid]
    reaped = 0
    for pid in children[:limit]:
        st = _stray(pid, own_session)
        if st is not None and st.state in ("Z", "X"):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            reaped += 1
    return reaped

