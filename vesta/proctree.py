"""The processes of one exec run, found in /proc: to stop them, count their CPU time and kill them.

``execrun.run`` starts a program in its own session, so the leader's pid is also its group and session id.
The run's *members* are every other process in that group or that session, or descended from one that is:
a child that called ``setpgid`` is still in the session; one that called ``setsid`` is still its parent's
child while the parent lives (bubblewrap's namespace init, in a session of its own, is bubblewrap's child
while bubblewrap lives, and a root of the run after, below). The leader is left out: its own CPU time, and
that of the children it waited for, come from ``wait4``. Until the leader is reaped its pid pins the group
and session ids, so no other process can hold them; ``execrun`` looks only in that window.

Stopping comes before counting. The group gets SIGSTOP, every member found gets it through a pidfd opened
for that one signal (checked against the start time the scan saw, so a freed pid given to another process
is never signalled), and the scan repeats until it finds no member it has not stopped yet and none still
running (a fork bomb races the scan, and a vfork parent never looks stopped, so the rounds are bounded).
Stopped processes use no CPU, so the count is what they used: their own time, plus what the children they
reaped used. Then they are SIGKILLed. Nothing here raises: where /proc cannot be read (out of file
descriptors) the run is handled as its process group alone, with a warning.

A *subreaper* (``become_subreaper``, vestad's main) adopts the orphans of its descendants instead of init.
That lets a run's leftovers be counted and reaped here: ``reap_strays`` (on SIGCHLD and at the end of each
run) reaps adopted orphans that died, and charges each to the run whose group or session it is in, unless
that run has already counted it. After its leader has exited, a run whose leftovers would all be ours can
tell it left none without a scan (``adopted_children``).

What escapes the run: a process whose parent in the run exited before the scan and that left the session
as well (a daemonizing program). A subreaper adopts it all the same; ``reap_strays`` kills it once every
run that could have started it has ended (it was born before every run still going), but its CPU time is
charged to nobody. Only a sandbox's pid namespace or a cgroup holds those.

A sandbox: bubblewrap exits as soon as the job's main process does, without waiting for the init of its
pid namespace, and with ``--die-with-parent`` the kernel then takes the namespace down, reaping what is in
it uncounted. So a subreaper runs bubblewrap without it, learns the init from ``--info-fd``, and makes it a
*root* of the run (``add_root``): the init and everything under it are members wherever the init ends up
(our child, once bubblewrap is gone), stopped, counted and killed with the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PROC = Path("/proc")
STOP_ROUNDS = 20        # scans spent stopping a run that keeps forking; what still runs after them is not counted
SETTLE_ROUNDS = 3       # extra scans waiting for stopped members to show as stopped (a vfork parent never does)
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_IDLE_STATES = frozenset("TtZXx")   # stopped, traced, zombie, dead: they use no more CPU
_PR_SET_CHILD_SUBREAPER = 36
_GONE = (errno.ENOENT, errno.ESRCH)
_NO_PIDFD = (errno.ENOSYS, errno.EPERM, errno.EINVAL)   # kernel < 5.3, or a seccomp filter
_subreaper = False
supervised: set[int] = set()   # children waited for by their own supervisor (run leaders, sandbox inits)
_runs: dict[int, RunProcs] = {}   # leader pid -> its run, while it is supervised: whom a stray is charged to
ESCAPED_GRACE_S = 0.5   # how long an escaped process is seen alive before it is killed (one just killed is dying)
_escaped_seen: dict[tuple[int, int], float] = {}   # (pid, start) -> when a sweep first saw it escaped
_spawning: set[int] = set()   # threads (native ids) starting a child not ``supervised`` yet (``spawn_guard``)


@contextlib.contextmanager
def spawn_guard() -> Iterator[None]:
    """Around starting a child that is then made ``supervised`` (a warm runner, started in a worker thread):
    meanwhile the children of this thread are not taken for a run's leftovers. A leftover is an orphan the
    kernel gave to this process, listed as a child of its main thread, never of the thread that forked."""
    tid = threading.get_native_id()
    _spawning.add(tid)
    try:
        yield
    finally:
        _spawning.discard(tid)


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
    rss_pages: int = field(default=0, compare=False)   # resident memory now, in pages (shared ones too)


def parse_stat(pid: int, raw: bytes) -> ProcStat | None:
    """One stat line, or None if it does not parse. The name in parentheses is free text: split after the last ')'."""
    try:
        fields = raw[raw.rindex(b")") + 2:].split()
        return ProcStat(pid=pid, ppid=int(fields[1]), pgrp=int(fields[2]), session=int(fields[3]),
                        state=fields[0].decode("ascii"), cpu_s=sum(int(f) for f in fields[11:15]) * _TICK_S,
                        start=int(fields[19]), rss_pages=int(fields[21]) if len(fields) > 21 else 0)
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def read_stat(pid: int, proc_root: Path = PROC) -> ProcStat | None:
    """The stat of ``pid``, or None if it is gone. Any other failure (EMFILE) raises ``OSError``."""
    try:
        fd = os.open(f"{proc_root}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError, PermissionError):   # PermissionError: hidepid
        return None
    try:
        raw = os.read(fd, 4096)
    except ProcessLookupError:   # reaped between the open and the read
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


def members(stats: Iterable[ProcStat], leader: int, roots: Mapping[int, int] | None = None) -> dict[int, ProcStat]:
    """The processes of ``leader``'s run among ``stats``: in its group or session, or one of the ``roots``
    (pid -> start time: a sandbox's init), or descended from any of those."""
    roots = roots or {}
    found: dict[int, ProcStat] = {}
    by_parent: dict[int, list[ProcStat]] = {}
    for st in stats:
        if st.pid == leader:
            continue
        if st.pgrp == leader or st.session == leader or roots.get(st.pid) == st.start:
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
    """The members of one run (see the module doc). ``close`` when the leader is reaped."""

    def __init__(self, leader: int, proc_root: Path = PROC) -> None:
        self.leader = leader
        self.proc_root = proc_root
        self.counted = False            # stop() took its count: a member reaped later was in it
        self.adopted_cpu_s = 0.0        # members reaped as strays before that
        self.lock = threading.Lock()    # stop() runs in a thread; reap_strays must not charge during its count
        self.roots: dict[int, int] = {}     # pid -> start of processes that are the run's wherever they are
        # A warm runner waiting for its job (``warm``): what was born after it is no child of its (it runs
        # nothing yet), so it does not keep ``reap_strays`` from killing an escaped process.
        self.waiting = False
        self.roots_cpu_s = 0.0          # what the roots that ended had used (nothing_left), counted without a scan
        self.roots_ending = False       # nothing_left found a root still on its way out: it is reaped later
        self._stopped: dict[int, int] = {}   # pid -> start of every member sent SIGSTOP
        self._all_stopped = False       # stop() found no member it had not stopped: kill() needs no scan
        self._blind = False
        try:
            st = read_stat(leader, proc_root)
        except OSError:
            st = None
        self.leader_start = st.start if st is not None else 0   # what was born before it is no child of it
        supervised.add(leader)
        _runs[leader] = self

    def add_root(self, pid: int, start: int) -> None:
        """Count ``pid`` (and what descends from it) as the run's even once it is not its descendant: a
        sandbox's init, which outlives bubblewrap as our child."""
        self.roots[pid] = start

    @property
    def kill_scans(self) -> bool:
        """Whether ``kill`` will scan /proc (so is better run in a thread)."""
        return not self._all_stopped

    def find(self) -> dict[int, ProcStat]:
        """The members now; ``OSError`` if /proc cannot be read."""
        return members(scan(self.proc_root), self.leader, self.roots)

    def resident_bytes(self) -> int:
        """The resident memory of the whole run now, the leader's included: the sum over its processes, so a
        page shared by several (a fork's copy-on-write pages, libraries) counts in each. 0 if /proc cannot
        be read."""
        found = self._find()
        try:
            leader = read_stat(self.leader, self.proc_root)
        except OSError:
            leader = None
        pages = sum(st.rss_pages for st in found.values()) + (leader.rss_pages if leader is not None else 0)
        return pages * _PAGE

    def signal(self, sig: int, *, leader: bool = True) -> None:
        """Send ``sig`` to every member found now, and to the leader unless told not to."""
        found = self._find()    # before the leader can die: its children are descendants only while it lives
        if leader:
            self._killpg(sig)   # the whole group at once, the leader included
        for st in found.values():
            self._send(st.pid, st.start, sig)

    def nothing_left(self) -> bool:
        """After the leader exited: True when, in a subreaper, it left no process behind (no scan needed). A
        root that is our zombie child (a sandbox's init that ended) left nothing either: an init ends only once
        every process of its pid namespace has ended and been reaped by it, so its CPU time (read from its
        stat, ``roots_cpu_s``) holds theirs; one that is gone was reaped by the leader, which counted it. An init
        still alive with no child left is ending too (every orphan of its namespace is its child, so nothing else
        is alive in there): what it reaped is in its count already, and tearing its namespace down takes the
        kernel 10 ms or more, which the run need not wait for."""
        if not _subreaper:
            return False
        me = os.getpid()
        used = 0.0
        ending = False
        for pid, start in self.roots.items():
            # Its children first, its count after: an init found childless gains no CPU since, while one that
            # reaped its last child between two reads the other way round would lose that child's.
            childless = not _has_children(pid, self.proc_root)
            try:
                st = read_stat(pid, self.proc_root)
            except OSError:
                return False
            if st is None or st.start != start:
                continue
            if st.ppid != me or (st.state != "Z" and not childless):
                return False
            used += st.cpu_s   # a zombie's last count; or an init with no child left, on its way out (below)
            ending = ending or st.state != "Z"
        if adopted_children():
            return False
        self.roots_cpu_s = used
        self.roots_ending = ending
        return True

    def stop(self, *, scan: bool = True) -> float:
        """SIGSTOP every member (see the module doc); the CPU seconds they used, and those reaped as strays.
        ``scan=False`` when ``nothing_left`` said there is no member."""
        with self.lock:
            found: dict[int, ProcStat] = {}
            if not scan:
                self._all_stopped = self.counted = True
                return self.adopted_cpu_s + self.roots_cpu_s
            settling = 0
            for _ in range(STOP_ROUNDS):
                self._killpg(signal.SIGSTOP)
                found = self._find()
                new = [st for st in found.values() if self._stopped.get(st.pid) != st.start]
                for st in new:
                    if self._send(st.pid, st.start, signal.SIGSTOP):
                        self._stopped[st.pid] = st.start
                if new:
                    continue
                self._all_stopped = True
                leader = self._stat(self.leader)
                running = [st for st in found.values() if st.state not in _IDLE_STATES]
                if leader is not None and leader.state not in _IDLE_STATES:
                    running.append(leader)
                if not running or settling == SETTLE_ROUNDS:
                    break
                settling += 1
                time.sleep(0.001 * settling)   # let a SIGSTOP land before the count (a member mid-wait4)
            else:
                log.warning("run %d was still starting processes after %d rounds: the last ones run on until "
                            "they are killed, uncounted", self.leader, STOP_ROUNDS)
            self.counted = True
            return sum(st.cpu_s for st in found.values()) + self.adopted_cpu_s

    def kill(self) -> None:
        """SIGKILL the group and every member: those stopped, and (unless ``stop`` stopped them all) those found now."""
        found = {} if self._all_stopped else self._find()   # before the leader dies and orphans its children
        self._killpg(signal.SIGKILL)
        for pid, start in list(self._stopped.items()):
            self._send(pid, start, signal.SIGKILL)
        for st in found.values():
            self._send(st.pid, st.start, signal.SIGKILL)

    def close(self) -> None:
        supervised.discard(self.leader)
        if _runs.get(self.leader) is self:
            del _runs[self.leader]

    def _find(self) -> dict[int, ProcStat]:
        try:
            return self.find()
        except OSError as exc:
            self._cannot_see(exc)
            return {}

    def _stat(self, pid: int) -> ProcStat | None:
        try:
            return read_stat(pid, self.proc_root)
        except OSError as exc:
            self._cannot_see(exc)
            return None

    def _cannot_see(self, exc: OSError) -> None:
        if not self._blind:
            self._blind = True
            log.warning("cannot read the processes of run %d (%s): only its process group is signalled, and "
                        "what it left elsewhere is not counted", self.leader, exc.strerror or exc)

    def _killpg(self, sig: int) -> None:
        try:
            os.killpg(self.leader, sig)
        except ProcessLookupError:
            pass
        except PermissionError:   # every member left is someone else's (a setuid program)
            log.warning("cannot signal process group %d", self.leader)

    def _send(self, pid: int, start: int, sig: int) -> bool:
        try:   # one we stopped cannot have exited, so its pid is still its own even unchecked
            return send_checked(pid, start, sig, self.proc_root, blind=self._cannot_see,
                                unchecked_ok=self._stopped.get(pid) == start)
        except PermissionError:
            log.warning("cannot signal pid %d of run %d (a setuid program?)", pid, self.leader)
            return False


def send_checked(pid: int, start: int, sig: int, proc_root: Path = PROC, *,
                 blind: Callable[[OSError], None] | None = None, unchecked_ok: bool = False) -> bool:
    """Send ``sig`` to ``pid`` if it is still the process that started at ``start``; whether it was sent (not
    when it is gone). Through a pidfd, so a pid freed and given to another process after the check is not
    hit either; without pidfds (old kernel, seccomp) by pid, right after the check. Where /proc cannot be
    read (out of fds), ``blind`` hears why, and the signal goes unchecked only if ``unchecked_ok``. Other
    failures (EPERM) raise ``OSError``."""
    fd = -1
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_PIDFD and blind is not None:
            blind(exc)
    try:
        try:
            now = read_stat(pid, proc_root)
        except OSError as exc:
            if blind is not None:
                blind(exc)
            if not unchecked_ok:
                return False
        else:
            if now is None or now.start != start:
                return False
        if fd >= 0:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        if fd >= 0:
            os.close(fd)


def become_subreaper() -> bool:
    """Adopt the orphans of every descendant from now on (prctl PR_SET_CHILD_SUBREAPER); False, with a
    warning, where the kernel refuses. Process-wide: for ``vestad``'s main, never for a library user, and
    whoever calls it must call ``reap_strays`` on SIGCHLD."""
    global _subreaper
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        log.warning("cannot adopt the orphans of jobs (prctl PR_SET_CHILD_SUBREAPER: %s): CPU time used inside "
                    "the sandbox, and by what a job leaves behind, is not counted", exc)
        return False
    _subreaper = True
    return True


def is_subreaper() -> bool:
    return _subreaper


def now_ticks() -> int:
    """Now, in the clock ticks since boot that /proc's start times count."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) / _TICK_S)


def _has_children(pid: int, proc_root: Path = PROC) -> bool:
    """Whether single-threaded ``pid`` has a child, zombies included; True when it cannot be told."""
    try:
        with open(f"{proc_root}/{pid}/task/{pid}/children", "rb") as f:
            return bool(f.read().strip())
    except FileNotFoundError:   # gone meanwhile: no child
        return False
    except OSError:
        return True


def _children(skip: frozenset[int] = frozenset()) -> list[int] | None:
    """This process's children (each thread's, /proc/self/task/*/children: CONFIG_PROC_CHILDREN), but those of
    the threads in ``skip``; None if the kernel does not say, or a thread ended while we looked."""
    me = os.getpid()
    found: list[int] = []
    try:
        for tid in os.listdir(f"{PROC}/{me}/task"):   # a child belongs to the thread that forked it
            if int(tid) in skip:
                continue
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
    try:
        children = _children(skip=frozenset(_spawning))   # a child being started there is no leftover
        if children is None:
            return True
        own_session = os.getsid(0)
        return any(_stray(pid, own_session) is not None for pid in children)
    except OSError:
        return True


def reap_strays() -> int:
    """Reap adopted orphans that died (zombie children not ``supervised`` and not of our own session: those
    are ``subprocess.run``'s), charging each to its run if that run has not counted it yet; kill those that
    live on although every run that could own them has ended (a process that left its run's session after
    its parent died: born before every run still going started). Only in a subreaper; never raises; how
    many were reaped."""
    if not _subreaper:
        return 0
    reaped = 0
    escaped: list[ProcStat] = []
    try:
        own_session = os.getsid(0)
        children = _children(skip=frozenset(_spawning))
        if children is None:   # only the first child that can be waited for is visible this way
            try:
                found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                found = None
            children = [] if found is None else [found.si_pid]
        oldest_run = min((run.leader_start for run in _runs.values() if not run.waiting), default=None)
        for pid in children:
            st = _stray(pid, own_session)
            if st is None:
                continue
            if st.state not in ("Z", "X"):
                if oldest_run is None or st.start < oldest_run:
                    escaped.append(st)
                continue
            run = _runs.get(st.session) or _runs.get(st.pgrp)
            if run is not None and not run.lock.acquire(blocking=False):
                continue   # its count is being taken: reaped by the run itself when that is done
            try:
                _, _, usage = os.wait4(pid, os.WNOHANG)
                if run is not None and not run.counted:
                    run.adopted_cpu_s += usage.ru_utime + usage.ru_stime
                reaped += 1
            except ChildProcessError:
                pass
            finally:
                if run is not None:
                    run.lock.release()
        now = time.monotonic()
        seen = {(st.pid, st.start): _escaped_seen.get((st.pid, st.start), now) for st in escaped}
        _escaped_seen.clear()
        _escaped_seen.update(seen)
        for st in escaped:
            if now - seen[st.pid, st.start] >= ESCAPED_GRACE_S:
                _kill_escaped(st)
    except OSError as exc:
        log.warning("cannot reap the orphans of jobs: %s", exc)
    return reaped


def _kill_escaped(st: ProcStat) -> None:
    """SIGKILL an adopted child (our child: its pid cannot be reused before we reap it) and its group."""
    log.warning("killing pid %d (and its process group), left running by a job that has ended", st.pid)
    try:
        if st.pgrp == st.pid:
            os.killpg(st.pid, signal.SIGKILL)   # it left with setsid: its group is its own
        os.kill(st.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_leftovers(node_id: str, uids: set[int], proc_root: Path = PROC) -> int:
    """SIGKILL what runs of an earlier vestad of this node left running when it died without stopping them
    (a crash, ``kill -9``): every process of one of ``uids`` whose environment names the node's fingerprint
    as VESTA_NODE_ID and has a VESTA_JOB_ID (``rundir.scrubbed_env`` gives every run both). Only when no
    vestad of this node runs. How many were killed; never raises."""
    if not node_id:
        return 0
    marker = f"VESTA_NODE_ID={node_id}".encode()
    me = os.getpid()
    killed = 0
    try:
        for st in scan(proc_root):
            if st.pid == me:
                continue
            try:
                if os.stat(f"{proc_root}/{st.pid}").st_uid not in uids:
                    continue
                with open(f"{proc_root}/{st.pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if marker in env and any(entry.startswith(b"VESTA_JOB_ID=") for entry in env):
                try:
                    killed += send_checked(st.pid, st.start, signal.SIGKILL, proc_root)
                except OSError:
                    continue
    except OSError as exc:
        log.warning("cannot look for processes left by an earlier vestad of this node: %s", exc)
    return killed
