"""A run's memory limit in a cgroup v2 (``memory.max``), where this daemon has a usable one.

Usable means: a cgroup v2 hierarchy is mounted, this process's cgroup in it offers the ``memory``
controller, and we may write there (root, or a cgroup delegated to our user, as systemd does with
``Delegate=yes``). Its children must have the controller turned on (``cgroup.subtree_control``), which the
kernel allows only in a cgroup holding no process itself: when vestad is alone in its cgroup it moves
itself into a ``vestad`` leaf beside the runs; when it shares it with other processes, nothing is moved
and the cgroup is not used.

Each run gets ``run-N`` with ``memory.max`` its limit, ``memory.swap.max`` 0 (no escaping to swap) and
``memory.oom.group`` 1 (the kernel kills the whole run, not one process of it). The run's first process is
moved in right after it starts, before the program it runs has forked (``execrun`` starts it behind
``prlimit``/bubblewrap); the ``/proc`` watch (``execrun``'s ``mem_limit_mib``) keeps going as well. Where no
usable cgroup exists (cgroup v1, no delegation, a container without the controller), ``find`` says why and
the ``/proc`` watch alone holds the limit, as before.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


def _mount_point(mountinfo: str) -> Path | None:
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        parts = left.split()
        if right.split()[:1] == ["cgroup2"] and len(parts) >= 5:
            return Path(parts[4])
    return None


def _own_path(cgroup: str) -> str | None:
    for line in cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip()
    return None


@dataclass
class MemoryCgroups:
    """Where runs' cgroups are made: ``base``, this daemon's own cgroup (see the module doc)."""

    base: Path
    _numbers: itertools.count[int] = field(default_factory=itertools.count)

    @classmethod
    def find(cls, proc: Path = Path("/proc"), pid: int | None = None) -> tuple[MemoryCgroups | None, str]:
        """A usable cgroup for runs, or (None, why there is none)."""
        pid = os.getpid() if pid is None else pid
        try:
            mount = _mount_point((proc / "self" / "mountinfo").read_text())
            own = _own_path((proc / "self" / "cgroup").read_text())
        except OSError as exc:
            return None, f"cannot read /proc ({exc.strerror or exc})"
        if mount is None or own is None:
            return None, "no cgroup v2 hierarchy"
        base = mount / own.lstrip("/")
        try:
            controllers = (base / "cgroup.controllers").read_text().split()
            if "memory" not in controllers:
                return None, f"cgroup v2 at {base} offers no memory controller (the system uses cgroup v1 for it?)"
            if not os.access(base, os.W_OK) or not os.access(base / "cgroup.subtree_control", os.W_OK):
                return None, f"cgroup {base} is not writable by vestad (not delegated to its user)"
            if "memory" not in (base / "cgroup.subtree_control").read_text().split():
                procs = (base / "cgroup.procs").read_text().split()
                if procs and procs != [str(pid)]:
                    return None, f"cgroup {base} holds other processes than vestad (run it as its own service)"
                if procs:
                    leaf = base / "vestad"
                    leaf.mkdir(exist_ok=True)
                    (leaf / "cgroup.procs").write_text(str(pid))
                (base / "cgroup.subtree_control").write_text("+memory")
        except OSError as exc:
            return None, f"cgroup {base} cannot be used: {exc.strerror or exc}"
        return cls(base), f"cgroup v2 {base}"

    def make(self, limit_mib: int) -> RunCgroup | None:
        """A cgroup for one run, limited to ``limit_mib``; None (logged) when it cannot be made."""
        path = self.base / f"run-{os.getpid()}-{next(self._numbers)}"
        try:
            path.mkdir()
            (path / "memory.max").write_text(str(limit_mib << 20))
            for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                with contextlib.suppress(FileNotFoundError):
                    (path / name).write_text(value)
        except OSError as exc:
            log.warning("cannot make a cgroup for a run in %s (%s): its memory is watched from /proc only",
                        self.base, exc.strerror or exc)
            with contextlib.suppress(OSError):
                path.rmdir()
            return None
        return RunCgroup(path, limit_mib)


@dataclass
class RunCgroup:
    """One run's cgroup."""

    path: Path
    limit_mib: int

    def add(self, pid: int) -> bool:
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
            return True
        except OSError as exc:   # it exited already, or the cgroup is gone
            log.debug("could not move pid %d into %s: %s", pid, self.path, exc)
            return False

    def oom_kills(self) -> int:
        """How many processes of the run the kernel killed for its memory.max."""
        try:
            for line in (self.path / "memory.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def remove(self) -> None:
        """Kill what is left in it (``cgroup.kill``, Linux 5.14) and remove it."""
        with contextlib.suppress(OSError):
            (self.path / "cgroup.kill").write_text("1")
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                os.sched_yield()
        log.warning("could not remove the run cgroup %s (processes still in it)", self.path)

    def reason(self) -> str:
        return f"memory limit hit (the kernel's cgroup limit of {self.limit_mib} MiB for the whole run)"
