"""Inputs, artifacts, the queue and retries of exec jobs, across real daemons."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.helpers import Cluster, Vestad, eventually, idle_proc, tool
from tests.test_exec_jobs import exec_pair, one_line

pytestmark = pytest.mark.integration

MAKE_OUTPUT = ("head -c 700000 /dev/urandom > \"$VESTA_OUTPUT/r.bin\"; mkdir -p \"$VESTA_OUTPUT/d/e\"; "
               "echo nested > \"$VESTA_OUTPUT/d/e/f.txt\"; sha256sum \"$VESTA_OUTPUT/r.bin\"")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_artifacts_come_back_from_a_peer_and_copy_out_checked(cluster: Cluster, tmp_path: Path) -> None:
    a, _ = exec_pair(cluster, tmp_path, "-allow-exec")
    out = a.vesta("exec", "--on", "b", "--json", "--", "sh", "-c", MAKE_OUTPUT)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    printed = r["stdout"].split()[0]          # what the job itself measured, on b
    files = {f["path"]: f for f in r["artifacts"]}
    assert set(files) == {"r.bin", "d/e/f.txt"} and {f["state"] for f in files.values()} == {"stored"}
    assert files["r.bin"]["sha256"] == printed and files["r.bin"]["size"] == 700000
    stored = Path(r["artifacts_dir"])
    assert stored == a.state_dir / "artifacts" / r["job_id"] and sha(stored / "r.bin") == printed
    # vesta artifacts lists them (with the node they came from) and copies them out, checked.
    listing = json.loads(a.vesta("artifacts", r["job_id"], "--json").stdout)
    assert [(f["path"], f["node"]) for f in listing["files"]] == [("d/e/f.txt", "b"), ("r.bin", "b")]
    dest = tmp_path / "copy"
    out = a.vesta("artifacts", r["job_id"], "-o", str(dest))
    assert out.returncode == 0, out.stderr
    assert "copied 2 file(s)" in out.stdout and "SHA-256 checked" in out.stdout
    assert sha(dest / "r.bin") == printed and (dest / "d/e/f.txt").read_text() == "nested\n"
    # A second copy into the same place overwrites nothing.
    again = a.vesta("artifacts", r["job_id"], "-o", str(dest))
    assert again.returncode == 2 and "exists: choose another -o directory" in one_line(again.stderr)
    # A stored file damaged on disk is caught, and nothing is copied for it.
    with open(stored / "r.bin", "r+b") as f:   # flip the first byte (writing a fixed one: unchanged 1 in 256)
        first = f.read(1)[0]
        f.seek(0)
        f.write(bytes([first ^ 0xFF]))
    bad = a.vesta("artifacts", r["job_id"], "-o", str(tmp_path / "copy2"))
    assert bad.returncode == 1
    assert "stored artifact r.bin no longer matches its SHA-256" in one_line(bad.stderr)
    assert not (tmp_path / "copy2" / "r.bin").exists()
    shown = a.call("show", job_id=r["job_id"])
    assert [f["path"] for f in shown["artifacts"]] == ["d/e/f.txt", "r.bin"]


def test_artifacts_over_the_cap_and_symlinks_are_refused_with_reasons(cluster: Cluster, tmp_path: Path) -> None:
    cfg = tmp_path / "a.json"
    cfg.write_text(json.dumps({"artifact_max_mb": 1}))
    a = cluster.add("a", args=["-config", str(cfg)])
    cluster.add("b", args=["-allow-exec", "-proc-root", str(idle_proc(tmp_path / "proc-b"))])
    eventually(lambda: a.peer_names() == {"b"}, 5)
    script = ("head -c 2000000 /dev/zero > \"$VESTA_OUTPUT/big\"; echo small > \"$VESTA_OUTPUT/small\"; "
              "ln -s /etc/hostname \"$VESTA_OUTPUT/link\"")
    out = a.vesta("exec", "--on", "b", "--", "sh", "-c", script)
    assert out.returncode == 0
    assert "vesta: artifact big not kept: not sent: 1.9 MiB, over the 1.0 MiB left of the submitter's artifact " \
           "cap (artifact_max_mb)" in out.stderr
    assert "vesta: artifact link not kept: not sent: a symlink (not followed)" in out.stderr
    job = a.call("jobs")[0]
    files = {f["path"]: f["state"] for f in a.call("artifacts", job_id=job["id"])["files"]}
    assert files == {"big": "refused", "link": "refused", "small": "stored"}
    assert sorted(p.name for p in (a.state_dir / "artifacts" / job["id"]).iterdir()) == ["small"]


def test_put_ships_inputs_and_a_shipped_program_runs_only_without_an_allowlist(cluster: Cluster,
                                                                               tmp_path: Path) -> None:
    a, _ = exec_pair(cluster, tmp_path, "-allow-exec")
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 3000)
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\nsha256sum data.bin\necho \"args: $*\"\n")
    script.chmod(0o755)
    out = a.vesta("exec", "--on", "b", "--put", str(data), "--put", str(script), "--", "./run.sh", "x")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == sha(data) and "args: x" in out.stdout
    # Inputs are checked before the job is sent anywhere.
    missing = a.vesta("exec", "--put", str(tmp_path / "nope"), "--", "true")
    assert missing.returncode == 2 and "--put" in one_line(missing.stderr) and "no such file" in missing.stderr
    twice = a.vesta("exec", "--put", str(data), "--put", str(data), "--", "true")
    assert twice.returncode == 1 and "another file is also called data.bin" in one_line(twice.stderr)


def test_a_shipped_program_is_refused_where_an_allowlist_holds(cluster: Cluster, tmp_path: Path) -> None:
    cfg = tmp_path / "b.json"
    cfg.write_text(json.dumps({"allow_exec": True, "exec_allowlist": ["sh"], "exec_max_input_mb": 1}))
    a, _ = exec_pair(cluster, tmp_path, "-config", str(cfg))
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\necho pwned\n")
    script.chmod(0o755)
    out = a.vesta("exec", "--on", "b", "--put", str(script), "--", "./run.sh")
    assert out.returncode == 1 and "pwned" not in out.stdout
    assert "refused (not_allowed: './run.sh' was shipped with the job; b runs only its exec_allowlist (sh))" \
        in one_line(out.stderr)
    ok = a.vesta("exec", "--on", "b", "--put", str(script), "--", "sh", "run.sh")   # an allowed interpreter
    assert ok.returncode == 0 and ok.stdout == "pwned\n"
    big = tmp_path / "big"
    big.write_bytes(bytes(2 << 20))
    out = a.vesta("exec", "--on", "b", "--put", str(big), "--", "sh", "-c", "true")
    assert out.returncode == 1
    assert "b takes at most 1 MiB of input files per job (2.0 MiB sent; exec_max_input_mb)" in one_line(out.stderr)


def test_queued_jobs_wait_for_a_node_and_survive_a_restart(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.add("a")
    note = tmp_path / "note.txt"
    note.write_text("shipped while queued\n")
    out = a.vesta("exec", "--queue", "--detach", "--put", str(note), "--", "cat", "note.txt")
    assert out.returncode == 0, out.stderr
    first = out.stdout.strip()
    queued = a.call("jobs", state="queued")
    assert [j["id"] for j in queued] == [first]
    eventually(lambda: "no node allows exec" in a.call("show", job_id=first)["reason"], 5)
    a.kill()                     # SIGKILL: the queue must come back from the records alone
    a.start()
    assert a.call("show", job_id=first)["state"] == "queued"
    # A client that waits in the queue: it sees the job start once a node can take it.
    waiting = subprocess.Popen(tool("vesta") + ["-name", "a", "exec", "--queue", "--", "sh", "-c", "echo fg"],
                               env=a.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        eventually(lambda: len(a.call("jobs", state="queued")) == 2, 5)
        b = cluster.add("b", args=["-allow-exec", "-proc-root", str(idle_proc(tmp_path / "proc-b"))])
        stdout, stderr = waiting.communicate(timeout=30)
    finally:
        waiting.kill()
        waiting.wait(timeout=5)
    assert waiting.returncode == 0 and stdout == "fg\n", stderr
    assert "queued: " in stderr
    done = a.vesta("wait", first, "--timeout", "20")
    assert done.returncode == 0, done.stdout + done.stderr
    assert a.vesta("logs", first).stdout == "shipped while queued\n"
    record = a.call("show", job_id=first)
    assert record["state"] == "succeeded" and [p["node"] for p in record["parts"]] == [b.name]
    assert not (a.state_dir / "inputs" / "a" / first).exists()   # staged inputs go when the job ends


def test_a_queued_job_can_be_cancelled(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.add("a")
    job = a.vesta("exec", "--queue", "--detach", "--", "true").stdout.strip()
    out = a.vesta("cancel", job)
    assert out.returncode == 0 and f"cancelled {job}" in out.stdout
    record = a.call("show", job_id=job)
    assert (record["state"], record["reason"]) == ("cancelled", "cancelled while queued")
    assert a.vesta("cancel", job).returncode == 1


def three(cluster: Cluster, tmp_path: Path) -> tuple[Vestad, Vestad, Vestad]:
    a = cluster.add("a")
    b = cluster.add("b", args=["-allow-exec", "-proc-root", str(idle_proc(tmp_path / "proc-b"))])
    c = cluster.add("c", args=["-allow-exec", "-proc-root", str(idle_proc(tmp_path / "proc-c"))])
    eventually(lambda: a.peer_names() == {"b", "c"}, 5)
    return a, b, c


@pytest.mark.parametrize("retries", [0, 1])
def test_a_lost_exec_runs_again_only_with_retries(cluster: Cluster, tmp_path: Path, retries: int) -> None:
    a, b, c = three(cluster, tmp_path)
    job = a.vesta("exec", "--detach", "--retries", str(retries), "--", "sh", "-c", "sleep 2; echo done").stdout.strip()
    running_on = eventually(lambda: next((p["node"] for p in a.call("show", job_id=job)["parts"]
                                          if p["state"] == "running"), None), 10)
    victim = b if running_on == "b" else c
    victim.kill()
    out = a.vesta("wait", job, "--timeout", "30")
    record = a.call("show", job_id=job)
    states = [(p["node"], p["state"]) for p in record["parts"]]
    if retries:
        assert out.returncode == 0, record
        assert states[0] == (victim.name, "lost") and states[-1][1] == "succeeded"
        assert a.vesta("logs", job).stdout == "done\n"
    else:
        assert out.returncode == 1 and record["state"] == "failed"
        assert "not re-run: it may have had effects; vesta exec --retries N allows re-runs" in record["reason"]
        assert states == [(victim.name, "lost")]


def test_keep_runs_keeps_the_working_directory_and_says_where(cluster: Cluster, tmp_path: Path) -> None:
    cfg = tmp_path / "b.json"
    cfg.write_text(json.dumps({"allow_exec": True, "keep_runs": True}))
    a, b = exec_pair(cluster, tmp_path, "-config", str(cfg))
    out = a.vesta("exec", "--on", "b", "--", "sh", "-c", "echo kept > here.txt")
    assert out.returncode == 0, out.stderr
    run = b.call("jobs", hosted=True)[0]
    kept = Path(run["args"]["workdir"])
    try:
        assert (kept / "here.txt").read_text() == "kept\n"
        assert "kept the working directory" in b.log()
    finally:
        subprocess.run(["rm", "-rf", str(kept)], check=True)


def test_a_restart_removes_artifacts_never_put_on_record_and_a_clean_stop_leaves_no_runs_dir(
        cluster: Cluster, tmp_path: Path) -> None:
    # A submitter killed while artifacts came in left their files on disk, listed nowhere (71 files); and a
    # clean stop left an empty vesta-runs-* directory in /tmp.
    a, b = exec_pair(cluster, tmp_path, "-allow-exec")
    out = a.vesta("exec", "--on", "b", "--json", "--", "sh", "-c", "echo kept > \"$VESTA_OUTPUT/k.txt\"")
    assert out.returncode == 0, out.stderr
    kept = json.loads(out.stdout)["job_id"]
    runs = [Path(tempfile.gettempdir()) / f"vesta-runs-{n.name}-{n.status()['fingerprint'][:8]}" for n in (a, b)]
    assert runs[1].is_dir()   # b ran a job in it
    assert a.stop() == 0 and b.stop() == 0
    assert not any(r.exists() for r in runs)
    cut = a.state_dir / "artifacts" / "jcut0000001"   # what a kill -9 mid-transfer leaves
    (cut / "d").mkdir(parents=True)
    for i in range(71):
        (cut / "d" / f"f{i}").write_text("x")
    (a.state_dir / "artifacts" / ".vesta-incoming-abc").mkdir()
    a.start()
    assert not cut.exists() and not (a.state_dir / "artifacts" / ".vesta-incoming-abc").exists()
    assert (a.state_dir / "artifacts" / kept / "k.txt").read_text() == "kept\n"
    listing = json.loads(a.vesta("artifacts", kept, "--json").stdout)
    assert [f["path"] for f in listing["files"]] == ["k.txt"]
