"""Requirements by label: every node advertises automatic labels beside its owner's, and a job that needs
labels goes only to nodes that have every one (refused at once, naming what each node has, when none does)."""

from __future__ import annotations

import json
import platform
import sys
import time
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


def test_need_across_three_nodes_and_a_queued_job_that_waits_for_a_node_with_the_label(
        cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.add("a", args=["-label", "desk"])
    cluster.add("b", args=["-label", "fast", "-allow-exec", "-proc-root", str(idle_proc(tmp_path / "proc-b"))])
    eventually(lambda: a.peer_names() == {"b"}, 5)

    # no node has the label yet: a queued exec job waits, saying why, and a plain one is refused at once
    queued = a.vesta("exec", "--queue", "--detach", "--need", "late", "--", "sh", "-c", "echo placed")
    assert queued.returncode == 0, queued.stderr
    job = queued.stdout.strip()
    waiting = eventually(lambda: (r := a.call("show", job_id=job))["state"] == "queued"
                         and "unknown label late" in r["reason"] and r, 10, what="the queued job's reason")
    assert "b: unknown label late (has fast," in waiting["reason"]
    t0 = time.monotonic()
    refused = a.vesta("exec", "--need", "late", "--", "true")
    assert refused.returncode == 1 and time.monotonic() - t0 < 10
    assert "unknown label late (has fast," in refused.stderr

    cluster.add("c", args=["-label", "late", "-allow-exec", "-proc-root", str(idle_proc(tmp_path / "proc-c"))])
    done = a.vesta("wait", job, "--timeout", "30", "--json")
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert json.loads(done.stdout)["ran_on"] == ["c"]
    assert a.vesta("logs", job).stdout == "placed\n"

    eventually(lambda: a.peer_names() == {"b", "c"}, 5)
    for need, node in (("fast", "b"), ("late", "c"), ("desk", "a"), ("late,os:linux", "c")):
        for _ in range(2):   # every time, never a node without the label
            out = a.vesta("cpu", "1", "--need", need, "--json")
            assert out.returncode == 0, out.stderr
            assert [p["node"] for p in json.loads(out.stdout)["parts"]] == [node], need
    ran = a.vesta("exec", "--need", "late", "--json", "--", "hostname")
    assert ran.returncode == 0 and json.loads(ran.stdout)["node"] == "c", ran.stderr

    # none matching: refused at once, naming the labels each live node has
    t0 = time.monotonic()
    none = a.vesta("cpu", "1", "--need", "gpu")
    assert none.returncode == 1 and time.monotonic() - t0 < 10
    for name, own in (("a", "desk"), ("b", "fast"), ("c", "late")):
        assert f"{name}: unknown label gpu (has {own}," in none.stderr, none.stderr
    assert "Traceback" not in none.stderr
    # and the record's "why not there?" table names the missing label for every node
    failed = a.call("jobs", limit=1)[0]["id"]
    shown = a.vesta("show", failed)
    assert "why not there?" in shown.stdout
    rows = [line.split("\t") for line in shown.stdout.splitlines()]
    for name in ("a", "b", "c"):
        assert any(row[0] == name and any("unknown label gpu" in cell for cell in row) for row in rows), shown.stdout
