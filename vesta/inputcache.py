"""Input files a node keeps for a sweep's next jobs: a shared ``--put`` crosses the network once per node.

A sweep's jobs carry its id (``ExecSpec.share``). When a node receives an input of such a job whole and
intact, it keeps a copy here, named by its SHA-256, under the submitter's fingerprint and the sweep's id
(so one member can never learn what another shipped, or get it). A later offer of the same sweep that
announces the same file is answered with its digest in the Accept's ``have``: the submitter does not send
it, and the run gets the kept copy. A file still arriving for another run of the sweep is promised the same
way, and copied in as soon as that run has it.

Bounds: at most ``cap`` bytes in all (the least recently used go first), and a sweep's files go once it has
sent no job here for ``idle_s`` seconds, which is how "for the length of the sweep" ends on a node that is
never told. Whatever is here when the daemon starts is removed. Copies, never links: a job may write to its
inputs, and must not change the kept file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from vesta.spec import FileInfo

log = logging.getLogger(__name__)

Key = tuple[str, str, str]   # (submitter fingerprint, sweep id, sha256 hex)
IDLE_S = 600.0               # a sweep's files are dropped after this long without a job of it here
NOT_KEPT = "the run of this sweep that was receiving it stopped first"   # a promised file never came: the job
                                                                          # never started, and may run again


class InputCache:
    """The kept inputs of one node (state_dir/input-cache/NAME)."""

    def __init__(self, root: Path, cap: int, idle_s: float = IDLE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self.cap = cap
        self.idle_s = idle_s
        self.clock = clock
        self.files: dict[Key, tuple[int, float]] = {}            # what is kept: size, last use
        self.used: dict[tuple[str, str], float] = {}             # each sweep's last job here
        self.pending: dict[Key, asyncio.Future[bool]] = {}       # files a run is receiving now
        shutil.rmtree(root, ignore_errors=True)

    def _path(self, key: Key) -> Path:
        return self.root / key[0] / key[1] / key[2]

    def touch(self, peer: str, share: str) -> None:
        """A job of this sweep came: its files stay, and those of sweeps idle too long go."""
        now = self.clock()
        self.used[(peer, share)] = now
        for sweep, last in list(self.used.items()):
            if now - last > self.idle_s:
                del self.used[sweep]
                for key in [k for k in self.files if k[:2] == sweep]:
                    self._drop(key)
                shutil.rmtree(self.root / sweep[0] / sweep[1], ignore_errors=True)

    def has(self, key: Key, size: int) -> bool:
        kept = self.files.get(key)
        return kept is not None and kept[0] == size

    def fetch(self, key: Key, info: FileInfo, workdir: Path) -> bool:
        """Copy a kept file into a run's working directory as ``info.path`` (in a worker thread)."""
        target = workdir / info.path
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".vesta-cached-{target.name}")
            shutil.copyfile(self._path(key), tmp)
            os.chmod(tmp, 0o700 if info.executable else 0o600)
            os.replace(tmp, target)
        except OSError as exc:
            log.warning("kept input %s could not be copied into a run: %s", info.path, exc.strerror or exc)
            return False
        return True

    def keep(self, key: Key, src: Path, size: int) -> bool:
        """Copy an input just received (and checked) into the cache, before any job can write to it."""
        if size > self.cap:
            return False
        path = self._path(key)
        tmp = path.with_name(path.name + ".part")
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.copyfile(src, tmp)
            if os.stat(tmp).st_size != size:
                tmp.unlink(missing_ok=True)
                return False
            os.chmod(tmp, 0o400)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.warning("could not keep input %s for later jobs: %s", src.name, exc.strerror or exc)
            return False
        return True

    def kept(self, key: Key, size: int) -> None:
        """``keep`` succeeded: the file counts (back on the event loop); the least recently used go past the cap."""
        self.files[key] = (size, self.clock())
        total = sum(s for s, _ in self.files.values())
        for old in sorted(self.files, key=lambda k: self.files[k][1]):
            if total <= self.cap or old == key:
                break
            total -= self.files[old][0]
            self._drop(old)

    def used_now(self, key: Key) -> None:
        size, _ = self.files[key]
        self.files[key] = (size, self.clock())

    def _drop(self, key: Key) -> None:
        self.files.pop(key, None)
        with contextlib.suppress(OSError):
            self._path(key).unlink()
