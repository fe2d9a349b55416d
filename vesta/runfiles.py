"""How much one exec run has written: the bytes and files under its directories, counted with a bound.

A run may write only so much (``DiskLimit``): its working directory and HOME on the host, and, in the
sandbox, its private ``/tmp`` (a tmpfs of ``max_bytes``, reached for counting through the sandbox init's
``/proc/PID/root``). ``execrun`` counts every ``DISK_CHECK_S`` and kills a run over either bound; the count
stops as soon as a bound is passed, so a million files cost one bounded scan, not a million stats a check.
Bytes are what the files take on disk (allocated blocks) or their length, whichever is larger, so a sparse
file counts at its full length. Symbolic links are counted, never followed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DISK_CHECK_S = 1.0   # how often a run with a disk limit is counted


@dataclass(frozen=True, slots=True)
class DiskLimit:
    """At most ``max_bytes`` and ``max_files`` (directories included) under ``paths`` together."""

    max_bytes: int
    max_files: int
    paths: tuple[Path, ...]

    def describe(self) -> str:
        return f"{self.max_bytes >> 20} MiB and {self.max_files} files"


def count(paths: Iterable[Path], max_bytes: int, max_files: int, skip: frozenset[str] = frozenset()) -> tuple[int, int]:
    """(bytes, files) under ``paths``, stopping once either passes its bound; unreadable parts count as nothing
    (the job may take its own permissions away; its files are still bounded by the filesystem). Directories
    in ``skip`` are not entered (counted elsewhere)."""
    used = files = 0
    stack = [str(p) for p in paths]
    while stack:
        top = stack.pop()
        if top in skip:
            continue
        try:
            entries = os.scandir(top)
        except OSError:
            continue
        with entries:
            for entry in entries:
                files += 1
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                used += max(st.st_size, st.st_blocks * 512)
                if files > max_files or used > max_bytes:
                    return used, files
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return used, files


def over(limit: DiskLimit, sandbox_init: int | None = None) -> str:
    """Why the run is over its disk limit now, or ""."""
    paths = list(limit.paths)
    skip: frozenset[str] = frozenset()
    if sandbox_init is not None:
        tmp = Path(f"/proc/{sandbox_init}/root/tmp")   # the sandbox's private /tmp
        if _private(tmp):
            paths.append(tmp)
            # the run's own directories are bound into it (they live under the host's /tmp): counted once, above
            skip = frozenset(f"/proc/{sandbox_init}/root{p}" for p in limit.paths)
    used, files = count(paths, limit.max_bytes, limit.max_files, skip)
    if used > limit.max_bytes:
        return f"disk limit hit (more than {limit.max_bytes >> 20} MiB written, limit {limit.describe()})"
    if files > limit.max_files:
        return f"disk limit hit (more than {limit.max_files} files made, limit {limit.describe()})"
    return ""


def _private(tmp: Path) -> bool:
    """Whether ``tmp`` (a sandbox's /tmp seen through its init) is not the host's own /tmp: it is not while the
    init is still setting its namespace up, or when the pid is no longer that init's."""
    try:
        seen, host = os.stat(tmp), os.stat("/tmp")
    except OSError:
        return False
    return (seen.st_dev, seen.st_ino) != (host.st_dev, host.st_ino)
