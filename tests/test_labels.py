"""Requirements by label: every node advertises automatic labels beside its owner's, and a job that needs
labels goes only to nodes that have every one (refused at once, naming what each node has, when none does)."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest

from tests.helpers import Cluster, eventually, idle_proc
from vesta import errors
from vesta.client import Client
from vesta.spec import JobRequest

pytestmark = pytest.mark.integration


def test_a_job_goes_only_to_nodes_with_the_labels_it_needs(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.add("a", args=["-label", "desk"])
    b = cluster.add("b", args=["-label", "fast", "-proc-root", str(idle_proc(tmp_path / "proc-b"))])
    eventually(lambda: a.peer_names() == {"b"} and b.peer_names() == {"a"}, 5)
    labels = {p["name"]: p["labels"] for p in a.call("peers")}   # this node too
    python = f"python:{sys.version_info.major}.{sys.version_info.minor}"
    for name, own in (("a", "desk"), ("b", "fast")):
        assert {own, f"arch:{platform.machine()}", "os:linux", python} <= set(labels[name]), labels
        assert any(label.startswith("cores:") for label in labels[name])
    shown = a.vesta("peers")
    assert shown.returncode == 0 and "fast" in shown.stdout and f"arch:{platform.machine()}" in shown.stdout

    for need, node in (("fast", "b"), ("desk", "a"), (f"fast,arch:{platform.machine()}", "b")):
        out = a.vesta("cpu", "1", "--need", need, "--json")
        assert out.returncode == 0, out.stderr
        assert [p["node"] for p in json.loads(out.stdout)["parts"]] == [node], need
    none = a.vesta("cpu", "1", "--need", "gpu", "--need", "fast")
    assert none.returncode == 1 and "unknown label gpu (has " in none.stderr and "fast" in none.stderr
    bad = a.vesta("cpu", "1", "--need", "x" * 40)
    assert bad.returncode == 2 and "--need takes at most 16 labels" in bad.stderr

    with Client("a", a.runtime_dir) as client:
        assert client.cpu(1, need=["fast"]).result(timeout=30).node == "b"
        with pytest.raises(errors.JobFailed, match="unknown label gpu"):
            client.cpu(1, need=["gpu"]).result(timeout=30)
    record = a.call("jobs", limit=1)[0]
    assert record["args"]["need"] == ["gpu"] and record["state"] == "failed"   # on record, with what it needed
    assert JobRequest.from_wire("cpu", record["args"]).need == ("gpu",)
