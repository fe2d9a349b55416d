"""A node whose state filesystem is full starts, serves what it can, refuses what needs space, loses nothing."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Cluster, Vestad, eventually, short_tmpdir

pytestmark = pytest.mark.integration


@pytest.fixture
def small_fs() -> Iterator[Path]:
    """A 2 MiB tmpfs of our own (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    where = short_tmpdir("vfull")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True).returncode:
        shutil.rmtree(where, ignore_errors=True)
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        shutil.rmtree(where, ignore_errors=True)


def fill(fs: Path) -> Path:
    """Fill the filesystem to the last byte."""
    path = fs / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        (fs / "one-more").write_bytes(b"\0" * 4096)
    assert info.value.errno == errno.ENOSPC
    return path


def test_a_full_state_filesystem_serves_history_refuses_jobs_and_loses_nothing(
        cluster: Cluster, small_fs: Path) -> None:
    b = cluster.add("b")
    node = Vestad("full", cluster.key, cluster.dport, small_fs / "state", cluster.runtime_dir)
    cluster.nodes.append(node)
    node.start()
    first = node.call("cpu", millions=1, on="full")["job_id"]
    eventually(lambda: not (small_fs / "state" / "vestad-records-full.db-writes").stat().st_size, 5,
               what="the first job's records to be committed")
    second = node.call("cpu", millions=1, on="full")["job_id"]   # acknowledged, maybe only in the write log
    node.kill()
    (small_fs / "one-more").unlink(missing_ok=True)
    filler = fill(small_fs)

    node.start()   # it starts
    assert node.status()["name"] == "full"
    eventually(lambda: "b" in node.peer_names() and "full" in b.peer_names(), 10, what="the peers to see each other")
    assert first in {j["id"] for j in node.call("jobs")}   # history is served
    out = node.vesta("cpu", "1")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    [line] = out.stderr.strip().splitlines()
    assert str(small_fs / "state") in line and "free some space" in line
    out = node.vesta("exec", "--", "true")
    assert out.returncode == 1 and str(small_fs / "state") in out.stderr

    filler.unlink()   # room again: it takes jobs, and every acknowledged job is there
    eventually(lambda: node.vesta("cpu", "1").returncode == 0, 15, interval=0.5, what="jobs to be taken again")
    ids = {j["id"] for j in node.call("jobs")}
    assert {first, second} <= ids
