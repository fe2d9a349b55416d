"""Exec runs' memory in cgroup v2 where the daemon has a usable one; the /proc watch otherwise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import Cluster
from vesta.cgroup import MemoryCgroups

FIND = """
import json
from vesta.cgroup import MemoryCgroups
found, why = MemoryCgroups.find()
print(json.dumps({"base": str(found.base) if found else None, "why": why}))
"""


def fake_hierarchy(tmp_path: Path, *, controllers: str = "cpu memory pids", procs: str = "4242\n") -> Path:
    """A cgroup v2 tree as the kernel shows it, in plain files: the memory controller of cgroup v2 cannot be
    had on this test machine (its memory controller is bound to cgroup v1)."""
    proc = tmp_path / "proc" / "self"
    proc.mkdir(parents=True)
    mnt = tmp_path / "cg"
    (proc / "mountinfo").write_text(f"35 24 0:30 / {mnt} rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n")
    (proc / "cgroup").write_text("0::/system.slice/vestad.service\n")
    own = mnt / "system.slice" / "vestad.service"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text(controllers + "\n")
    (own / "cgroup.subtree_control").write_text("\n")
    (own / "cgroup.procs").write_text(procs)
    return tmp_path / "proc"


def test_a_delegated_cgroup_gets_the_daemon_moved_to_a_leaf_and_memory_turned_on(tmp_path: Path) -> None:
    found, why = MemoryCgroups.find(fake_hierarchy(tmp_path), pid=4242)
    assert found is not None, why
    own = tmp_path / "cg" / "system.slice" / "vestad.service"
    assert found.base == own
    assert (own / "vestad" / "cgroup.procs").read_text() == "4242"
    assert (own / "cgroup.subtree_control").read_text() == "+memory"
    run = found.make(100)
    assert run is not None
    assert (run.path / "memory.max").read_text() == str(100 << 20)
    assert (run.path / "memory.oom.group").read_text() == "1"
    assert run.oom_kills() == 0
    (run.path / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 2\n")
    assert run.oom_kills() == 2 and "100 MiB" in run.reason()


@pytest.mark.parametrize(("controllers", "procs", "says"), [
    ("cpu pids", "4242\n", "no memory controller"),
    ("cpu memory", "4242\n77\n", "holds other processes"),
])
def test_no_usable_cgroup_says_why(tmp_path: Path, controllers: str, procs: str, says: str) -> None:
    found, why = MemoryCgroups.find(fake_hierarchy(tmp_path, controllers=controllers, procs=procs), pid=4242)
    assert found is None and says in why


def test_this_machine_says_which_it_uses() -> None:
    """The real /proc and /sys/fs/cgroup of the machine the tests run on (in a child: find may move it)."""
    out = subprocess.run([sys.executable, "-c", FIND], capture_output=True, text=True, timeout=30, check=True)
    got = json.loads(out.stdout)
    if got["base"] is None:
        assert got["why"], got   # e.g. this VM: cgroup v1 holds the memory controller
    else:
        assert Path(got["base"], "cgroup.subtree_control").read_text().split().count("memory") == 1


@pytest.mark.integration
def test_the_daemon_says_how_exec_memory_is_held(cluster: Cluster) -> None:
    node = cluster.add("a", args=["-allow-exec"])
    isolation = node.status()["isolation"]
    found, why = MemoryCgroups.find(Path("/nonexistent"))   # what a machine without /proc access says
    assert found is None and "cannot read" in why
    assert "memory: memory.max in cgroup v2" in isolation or "memory: watched from /proc: " in isolation, isolation
