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


def count(paths: Iterable[Path], max_bytes: int, max_files: int, one_device: Iterable[Path] = ()) -> tuple[int, int]:
    """(bytes, files) under ``paths``, stopping once either passes its bound; unreadable parts count as nothing
    (the job may take its own permissions away; its files are still bounded by the filesystem). Under the
    ``one_device`` paths only what is on their own filesystem counts: a sandbox's /tmp holds bind mounts of
    host directories (the run's own, counted by their host paths, or vesta's Python when it lives under /tmp)."""
    used = files = 0
    stack: list[tuple[str, int | None]] = [(str(p), None) for p in paths]
    for root in one_device:
        try:
            stack.append((str(root), os.stat(root).st_dev))
        except OSError:
            continue
    while stack:
        top, device = stack.pop()
        try:
            entries = os.scandir(top)
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    files += 1
                    continue
                if device is not None and st.st_dev != device:
                    continue   # a mount point: another filesystem's, not this one's
                files += 1
                used += max(st.st_size, st.st_blocks * 512)
                if files > max_files or used > max_bytes:
                    return used, files
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, device))
    return used, files


def over(limit: DiskLimit, sandbox_init: int | None = None) -> str:
    """Why the run is over its disk limit now, or ""."""
    tmp = [] if sandbox_init is None else [Path(f"/proc/{sandbox_init}/root/tmp")]   # the sandbox's private /tmp
    used, files = count(limit.paths, limit.max_bytes, limit.max_files, [t for t in tmp if _private(t)])
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
