"""The inputs a node keeps for a sweep's next jobs: copies by SHA-256, bounded in bytes, dropped when idle."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tests.helpers import FakeClock
from vesta.inputcache import InputCache, Key
from vesta.spec import FileInfo

PEER = "ab" * 16


def received(tmp_path: Path, name: str, data: bytes) -> tuple[Key, FileInfo, Path]:
    src = tmp_path / "work" / name
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    return (PEER, "s0123456789", sha), FileInfo(name, len(data), sha), src


def test_a_kept_file_is_copied_into_later_runs_and_never_shared_with_them(tmp_path: Path) -> None:
    cache = InputCache(tmp_path / "cache", cap=1 << 20, clock=FakeClock())
    key, info, src = received(tmp_path, "big.bin", b"x" * 1000)
    assert not cache.has(key, info.size)
    assert cache.keep(key, src, info.size)
    cache.kept(key, info.size)
    assert cache.has(key, info.size) and not cache.has(key, 999)
    run = tmp_path / "run1"
    run.mkdir()
    assert cache.fetch(key, info, run)
    assert (run / "big.bin").read_bytes() == b"x" * 1000
    with open(run / "big.bin", "ab") as f:   # a job writing to its input changes its own copy only
        f.write(b"more")
    other = tmp_path / "run2"
    other.mkdir()
    assert cache.fetch(key, info, other) and (other / "big.bin").read_bytes() == b"x" * 1000
    assert os.stat(cache.root / PEER / "s0123456789" / key[2]).st_mode & 0o777 == 0o400
    # another submitter, or another sweep, has its own: the same digest is no key to this one's file
    assert not cache.has((("cd" * 16), key[1], key[2]), info.size)
    assert not cache.has((PEER, "sother", key[2]), info.size)


def test_the_least_recently_used_go_past_the_cap_and_idle_sweeps_go(tmp_path: Path) -> None:
    clock = FakeClock()
    cache = InputCache(tmp_path / "cache", cap=2500, idle_s=600, clock=clock)
    keys = []
    for i in range(3):
        key, info, src = received(tmp_path, f"f{i}", bytes([i]) * 1000)
        clock.advance(1)
        assert cache.keep(key, src, info.size)
        cache.kept(key, info.size)
        keys.append(key)
    assert [cache.has(k, 1000) for k in keys] == [False, True, True]   # 3,000 bytes > 2,500: the oldest went
    key, info, src = received(tmp_path, "huge", b"h" * 3000)
    assert not cache.keep(key, src, info.size)                          # larger than the cap: never kept
    cache.touch(PEER, "s0123456789")
    clock.advance(601)
    cache.touch(PEER, "sanother")                                       # a job of another sweep comes later
    assert not any(cache.has(k, 1000) for k in keys)
    assert not (cache.root / PEER / "s0123456789").exists()


def test_what_was_kept_before_a_restart_is_gone(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    (root / PEER).mkdir(parents=True)
    (root / PEER / "stale").write_text("x")
    InputCache(root, cap=100)
    assert not root.exists()
