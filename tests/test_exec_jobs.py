"""`vesta exec` across real daemons: off by default, the allowlist holds, output streams, codes come back."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import BIN, Cluster, Vestad, eventually, idle_proc, need_tool, tool

pytestmark = pytest.mark.integration


def exec_pair(cluster: Cluster, tmp_path: Path, *b_args: str) -> tuple[Vestad, Vestad]:
    a = cluster.add("a")
    # b plays an idle machine (see tests/test_jobs.py): its capacity must not depend on this host's load.
    b = cluster.add("b", args=[*b_args, "-proc-root", str(idle_proc(tmp_path / "proc-b"))])
    eventually(lambda: a.peer_names() == {"b"}, 5)
    return a, b


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_exec_is_off_by_default(cluster: Cluster, tmp_path: Path) -> None:
    a, b = exec_pair(cluster, tmp_path)
    out = a.vesta("exec", "--", "true")
    assert out.returncode == 1
    assert "no node allows exec (a: exec off, b: exec off): start a node with -allow-exec" in one_line(out.stderr)
    out = a.vesta("exec", "--on", "b", "--", "true")
    assert out.returncode == 1
    assert "b: refused (exec_disabled: b does not allow exec (start it with -allow-exec))" in one_line(out.stderr)
    assert b.status()["allow_exec"] is False
    assert b.status()["counters"].get("offers_refused") == 1


def test_allowlist_holds_against_path_tricks(cluster: Cluster, tmp_path: Path) -> None:
    cfg = tmp_path / "b.json"
    cfg.write_text(json.dumps({"allow_exec": True, "exec_allowlist": ["true", str(BIN / "piwork")]}))
    a, b = exec_pair(cluster, tmp_path, "-config", str(cfg))
    eventually(lambda: b.status()["warm_runners"].get("ready", 0) >= 1, 10)   # b's runs go to warm runners
    out = a.vesta("exec", "--", "true")
    assert out.returncode == 0, out.stderr
    # A decoy named like the allowed program, in a directory the peer controls.
    decoy = tmp_path / "x"
    decoy.mkdir()
    shutil.copy("/bin/sh", decoy / "true")
    (decoy / "link").mkdir()
    os.symlink("/bin/sh", decoy / "link" / "true")
    attempts = ["./true", str(decoy / "true"), str(decoy / "link" / "true"), "../../../../bin/sh", "sh",
                "/bin/sh", "../true"]
    for argv0 in attempts:
        out = a.vesta("exec", "--on", "b", "--", argv0, "-c", "echo pwned")
        assert out.returncode == 1, (argv0, out.stdout)
        assert "pwned" not in out.stdout
        line = one_line(out.stderr)
        assert "refused (not_allowed" in line or "refused (not_found" in line, (argv0, line)
    # piwork, allowlisted by its full path, runs and says which machine it ran on.
    out = a.vesta("exec", "--", str(BIN / "piwork"), "2", "--seed", "5")
    assert out.returncode == 0, out.stderr
    assert socket.gethostname() in out.stdout and "pi ≈ 3.1" in out.stdout
    assert b.status()["warm_runners"]["taken"] == b.status()["counters"].get("offers_accepted", 2), \
        "a refused program was handed to a warm runner"


def test_exit_codes_output_and_no_secret_in_the_job(cluster: Cluster, tmp_path: Path) -> None:
    a, b = exec_pair(cluster, tmp_path, "-allow-exec")
    out = a.vesta("exec", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert out.returncode == 7
    assert out.stdout == "out\n" and out.stderr == "err\n"
    out = a.vesta("exec", "--json", "--", "env")
    assert out.returncode == 0
    r = json.loads(out.stdout)
    assert r["node"] == "b" and r["exit_code"] == 0
    env = dict(line.split("=", 1) for line in r["stdout"].splitlines() if "=" in line)
    assert env["VESTA_NODE"] == "b" and env["VESTA_JOB_ID"] == r["job_id"]
    assert env["VESTA_NODE_ID"] == b.status()["fingerprint"]   # how b knows its own jobs after a crash
    assert "VESTA_KEY" not in env and cluster.key not in r["stdout"]
    assert not Path(env["HOME"]).exists()    # the working directory is gone afterwards


def test_output_streams_live_and_timeout_is_enforced(cluster: Cluster, tmp_path: Path) -> None:
    a, _ = exec_pair(cluster, tmp_path, "-allow-exec")
    cmd = tool("vesta") + ["-name", "a", "exec", "--", "sh", "-c", "echo first; sleep 3; echo second"]
    with subprocess.Popen(cmd, env=a.env, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            t0 = time.monotonic()
            assert proc.stdout.readline() == "first\n"
            assert time.monotonic() - t0 < 2.5, "the first line came only when the command ended"
            assert proc.stdout.readline() == "second\n"
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    t0 = time.monotonic()
    out = a.vesta("exec", "--timeout", "1", "--", "sh", "-c", "sleep 30")
    assert time.monotonic() - t0 < 8
    assert out.returncode == 143
    assert "timed out after 1s" in out.stderr


def test_limits_stop_hogs_and_say_which_limit(cluster: Cluster, tmp_path: Path) -> None:
    a, b = exec_pair(cluster, tmp_path, "-allow-exec", "-config", str(limits_config(tmp_path)))
    # memory hog: 600 MiB in a job limited to 200 MiB of address space
    out = a.vesta("exec", "--mem", "200", "--", "python3", "-c", "x = bytearray(600 * 1024 * 1024)")
    assert out.returncode != 0
    assert "memory limit hit (200 MiB of address space)" in out.stderr
    # the same program within its limit runs
    out = a.vesta("exec", "--mem", "400", "--", "python3", "-c", "x = bytearray(50 * 1024 * 1024); print(len(x))")
    assert out.returncode == 0 and out.stdout.strip() == str(50 * 1024 * 1024)
    # a job may not ask for more memory than the node offers
    out = a.vesta("exec", "--on", "b", "--mem", "100000", "--", "true")
    assert out.returncode == 1 and "refused (memory: b gives exec jobs at most 512 MiB" in out.stderr
    # file-size hog: a 20 MiB file where 5 MiB is the limit
    out = a.vesta("exec", "--", "sh", "-c", "exec head -c 20000000 /dev/zero > big")
    assert out.returncode == 128 + 25      # killed by SIGXFSZ
    assert "file size limit hit (5 MiB per file)" in out.stderr
    # no core files, few open files
    out = a.vesta("exec", "--", "sh", "-c", "ulimit -c; ulimit -n")
    assert out.stdout.split() == ["0", "1024"]
    _ = b


def test_a_fork_bomb_is_bounded_and_jobs_never_run_as_root(cluster: Cluster, tmp_path: Path) -> None:
    cfg = tmp_path / "procs.json"
    cfg.write_text(json.dumps({"allow_exec": True, "exec_max_procs": 20}))
    a, b = exec_pair(cluster, tmp_path, "-config", str(cfg))
    assert "at most 20 processes" in b.status()["isolation"]
    out = a.vesta("exec", "--", "sh", "-c", "id -u; grep 'Max processes' /proc/self/limits")
    assert out.returncode == 0, out.stderr
    uid, nproc = out.stdout.split()[0], out.stdout.split()[3]
    if os.geteuid() == 0:   # a root vestad runs peers' jobs as exec_user (nobody), where RLIMIT_NPROC holds
        assert uid != "0" and "runs as nobody" in b.status()["isolation"]
    assert nproc != "unlimited"
    # Children that each sleep, forked until fork fails (with a safety net of 500).
    bomb = 'n=0; while [ $n -lt 500 ]; do sleep 29.37 & n=$((n + 1)); done; echo "forked $n"'
    out = a.vesta("exec", "--timeout", "20", "--", "sh", "-c", bomb, timeout=40)
    assert out.returncode != 0 and "forked 500" not in out.stdout
    assert "process limit hit (20 processes)" in out.stderr
    eventually(lambda: not b.status()["hosting"], 10)
    left = subprocess.run(["pgrep", "-f", "sleep 29.37"], capture_output=True, text=True).stdout.split()
    assert left == [], "the bomb's children outlived the job"


def limits_config(tmp_path: Path) -> Path:
    path = tmp_path / "limits.json"
    path.write_text(json.dumps({"mem_offer_mb": 512, "exec_max_file_mb": 5}))
    return path


def need_bwrap() -> None:
    need_tool("bwrap", "bubblewrap")


def test_sandboxed_job_cannot_write_outside_read_home_or_use_the_network(cluster: Cluster, tmp_path: Path) -> None:
    need_bwrap()
    planted = Path.home() / f".vesta-planted-{secrets.token_hex(4)}"
    planted.write_text("the owner's secret\n")
    escape = f"vesta-escape-{secrets.token_hex(4)}"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        a, b = exec_pair(cluster, tmp_path, "-allow-exec")
        assert "bubblewrap" in b.status()["isolation"] and "no network" in b.status()["isolation"]
        # its own directory is writable
        out = a.vesta("exec", "--", "sh", "-c", "echo ok > mine.txt && cat mine.txt")
        assert out.returncode == 0 and out.stdout == "ok\n"
        # the system is read-only and /tmp is private
        out = a.vesta("exec", "--", "sh", "-c", f"touch /etc/{escape}; touch /var/tmp/{escape}; echo x > /tmp/{escape}")
        assert not Path(f"/etc/{escape}").exists() and not Path(f"/var/tmp/{escape}").exists()
        assert not Path(f"/tmp/{escape}").exists()
        assert "Read-only file system" in out.stderr
        # the owner's home and the node's own identity are out of sight
        identity = b.state_dir / "vestad-identity-b.json"
        out = a.vesta("exec", "--", "sh", "-c", f"cat {planted}; cat {identity}")
        assert out.returncode != 0 and "secret" not in out.stdout and "seed" not in out.stdout
        # no network
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')"
        out = a.vesta("exec", "--", "python3", "-c", probe)
        assert out.returncode != 0 and "connected" not in out.stdout
    finally:
        planted.unlink(missing_ok=True)
        listener.close()


def test_cpu_used_inside_the_sandbox_is_charged(cluster: Cluster, tmp_path: Path) -> None:
    # bubblewrap exits without waiting for its namespace's init: b adopts it so what ran inside is counted.
    need_bwrap()
    a, b = exec_pair(cluster, tmp_path, "-allow-exec")
    assert "bubblewrap" in b.status()["isolation"]
    burn = "while :; do :; done"
    out = a.vesta("exec", "--json", "--on", "b", "--", "sh", "-c", f"timeout 1 sh -c '{burn}'; exit 0")
    r = json.loads(out.stdout)
    assert r["exit_code"] == 0 and r["cpu_s"] >= 0.5, r
    # left running behind a leader that is cut off by the timeout
    out = a.vesta("exec", "--json", "--on", "b", "--timeout", "1.5", "--", "sh", "-c", f"({burn}) & exec sleep 60")
    r = json.loads(out.stdout)
    assert "timed out" in r["reason"] and r["cpu_s"] >= 0.5, r
    # still running when the job's main process exits (bubblewrap exits at once; b takes over its namespace)
    out = a.vesta("exec", "--json", "--on", "b", "--", "sh", "-c", f"({burn}) & ({burn}) & sleep 1.5; exit 0")
    r = json.loads(out.stdout)
    assert r["exit_code"] == 0 and r["cpu_s"] >= 1.5, r
    eventually(lambda: not b.status()["hosting"], 10)
    left = subprocess.run(["pgrep", "-f", "exec sleep 60"], capture_output=True, text=True).stdout.split()
    assert left == [], "the job outlived its sandbox"


def test_cpu_left_behind_without_the_sandbox_is_charged_and_killed(cluster: Cluster, tmp_path: Path) -> None:
    cfg = tmp_path / "b.json"
    cfg.write_text(json.dumps({"allow_exec": True, "sandbox": "none"}))
    a, b = exec_pair(cluster, tmp_path, "-config", str(cfg))
    marker = f"vesta-left-{secrets.token_hex(4)}"

    def left() -> list[str]:
        return subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()

    # The burner outlives its shell, so b adopts it: it is found, counted and killed when the run ends.
    out = a.vesta("exec", "--json", "--on", "b", "--", "sh", "-c",
                  f"sh -c 'while :; do :; done' {marker} & sleep 1; exit 0")
    r = json.loads(out.stdout)
    assert r["exit_code"] == 0 and r["cpu_s"] >= 0.4, r
    eventually(lambda: left() == [], 5, what="the burner to be killed")

    # One that leaves the session once its parent is gone is out of the run's reach; b, its adopter, kills
    # it once no job that might own it runs any more.
    out = a.vesta("exec", "--on", "b", "--", "sh", "-c",
                  f"setsid sh -c 'while :; do :; done' {marker} > /dev/null 2>&1 & sleep 0.2; exit 0")
    assert out.returncode == 0, out.stderr
    eventually(lambda: left() == [], 5, what="the escaped burner to be killed")

    # Forty sleepers left behind: killed at the end, they come to b as zombies and are reaped (as zombies
    # they would count against exec_user's process limit, and pile up job after job).
    def zombies() -> list[str]:
        out = subprocess.run(["ps", "-o", "pid=,stat=", "--ppid", str(b.pid)], capture_output=True, text=True)
        return [line for line in out.stdout.splitlines() if line.split()[1].startswith("Z")]

    nap = f"59.{secrets.randbelow(10**6):06d}"
    out = a.vesta("exec", "--on", "b", "--", "sh", "-c", f"for i in $(seq 40); do sleep {nap} & done; exit 0")
    assert out.returncode == 0, out.stderr
    eventually(lambda: zombies() == [], 5, what="b to reap what the job left behind")
    assert subprocess.run(["pgrep", "-f", f"sleep {nap}"], capture_output=True).stdout == b""


def test_a_run_on_several_cores_is_borrowed_as_much_as_it_was_lent(cluster: Cluster, tmp_path: Path) -> None:
    # Three burners for 1.5 s on two cores: more CPU than wall time. The borrower's ledger caps what a peer
    # says it lent at what it could have used (its cores x the wall time), not at the wall time alone.
    cfg = tmp_path / "b.json"
    cfg.write_text(json.dumps({"allow_exec": True, "sandbox": "none"}))
    a, b = exec_pair(cluster, tmp_path, "-config", str(cfg))
    burn = "sh -c 'while :; do :; done'"
    out = a.vesta("exec", "--json", "--on", "b", "--timeout", "1.5", "--", "sh", "-c",
                  f"{burn} & {burn} & {burn} & wait")
    r = json.loads(out.stdout)
    assert "timed out" in r["reason"] and r["cpu_s"] > 1.2 * r["run_s"], r

    def row(n: Vestad, peer: str) -> dict[str, float] | None:
        return next((x for x in n.call("ledger")["peers"] if x["name"] == peer and x["lent"] + x["borrowed"]), None)

    lent = eventually(lambda: row(b, "a"), 5)["lent"]
    assert lent == pytest.approx(r["cpu_s"], rel=0.01)
    assert eventually(lambda: row(a, "b"), 5)["borrowed"] == pytest.approx(lent, rel=0.01)


@pytest.mark.parametrize("own_runtime_dir", [False, True])
def test_a_second_vestad_of_the_same_node_leaves_the_running_one_alone(cluster: Cluster, tmp_path: Path,
                                                                        own_runtime_dir: bool) -> None:
    # The same name and state directory, with the same control socket or (started from another login, say)
    # another one: either way it stops before it clears anything of the running one's.
    a, b = exec_pair(cluster, tmp_path, "-allow-exec")
    job = subprocess.Popen(tool("vesta") + ["-name", "a", "exec", "--on", "b", "--", "sh", "-c",
                                            "echo started; sleep 1.5; echo done > f; cat f"],
                           env=a.env, stdout=subprocess.PIPE, text=True)
    elsewhere = Path(tempfile.mkdtemp(prefix="vt", dir="/tmp"))
    try:
        assert job.stdout is not None and job.stdout.readline() == "started\n"
        env = dict(b.env, XDG_RUNTIME_DIR=str(elsewhere)) if own_runtime_dir else b.env
        again = subprocess.run(b.command(), env=env, capture_output=True, text=True, timeout=30)
        assert again.returncode == 2
        last = again.stderr.strip().splitlines()[-1]
        assert ("a vestad of node 'b' is already running on" in last if own_runtime_dir
                else "a vestad named 'b' is already running" in last), last
        # it did not clear the running one's working directories, nor kill its jobs, on its way out
        assert job.stdout.read() == "done\n" and job.wait(10) == 0
        assert b.status()["fingerprint"] and b.running()
    finally:
        if job.poll() is None:
            job.kill()
        job.wait()
        assert job.stdout is not None
        job.stdout.close()
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_jobs_left_running_by_a_vestad_that_died_are_killed_when_it_comes_back(cluster: Cluster,
                                                                                tmp_path: Path) -> None:
    a, b = exec_pair(cluster, tmp_path, "-allow-exec")
    nap = f"59.{secrets.randbelow(10**6):06d}"
    job = subprocess.Popen(tool("vesta") + ["-name", "a", "exec", "--on", "b", "--", "sh", "-c",
                                            f"echo started; sleep {nap}"],
                           env=a.env, stdout=subprocess.PIPE, text=True)

    def running() -> list[str]:
        return subprocess.run(["pgrep", "-f", f"sleep {nap}"], capture_output=True, text=True).stdout.split()

    try:
        assert job.stdout is not None and job.stdout.readline() == "started\n"
        b.kill()   # no clean-up at all: its job runs on
        assert running()
        b.start()
        assert running() == [], "b came back and left the job of its dead self running"
    finally:
        job.kill()
        job.wait()
        assert job.stdout is not None
        job.stdout.close()
        subprocess.run(["pkill", "-f", f"sleep {nap}"], check=False)


def test_network_when_the_owner_allows_it(cluster: Cluster, tmp_path: Path) -> None:
    need_bwrap()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    cfg = tmp_path / "net.json"
    cfg.write_text(json.dumps({"allow_exec": True, "allow_network": True}))
    try:
        a, b = exec_pair(cluster, tmp_path, "-config", str(cfg))
        assert "network allowed" in b.status()["isolation"]
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')"
        out = a.vesta("exec", "--", "python3", "-c", probe)
        assert out.returncode == 0 and out.stdout.strip() == "connected"
    finally:
        listener.close()


def test_sandbox_bwrap_without_bubblewrap_is_a_config_error(cluster: Cluster, tmp_path: Path) -> None:
    cfg = tmp_path / "strict.json"
    cfg.write_text(json.dumps({"sandbox": "bwrap"}))
    node = cluster.add("strict", start=False, args=["-config", str(cfg)])
    env = dict(node.env, PATH=str(BIN))          # a PATH on which there is no bwrap
    out = subprocess.run(node.command(), env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]    # (test daemons log at debug level before it)
    assert last.startswith("vestad: error: sandbox is 'bwrap' but bubblewrap is not installed")
    assert "Traceback" not in out.stderr


def test_a_shipped_config_file_runs_nothing_and_code_runners_are_called_out(cluster: Cluster, tmp_path: Path) -> None:
    # With git allowed, `--put .gitconfig -- git x` ran the shipped alias: the job's HOME was its working
    # directory. And an allowlist naming a program that runs code from its arguments says so.
    git = need_tool("git", "git")
    cfg = tmp_path / "b.json"
    cfg.write_text(json.dumps({"allow_exec": True, "exec_allowlist": ["true", git]}))
    a, b = exec_pair(cluster, tmp_path, "-config", str(cfg))
    gitconfig = tmp_path / ".gitconfig"
    gitconfig.write_text("[alias]\n\tx = !echo pwned\n")
    out = a.vesta("exec", "--on", "b", "--put", str(gitconfig), "--", "git", "x")
    assert "pwned" not in out.stdout + out.stderr
    assert out.returncode == 1 and "'x' is not a git command" in out.stderr, out.stderr
    assert b.status()["exec_code_runners"] == ["git"]
    shown = b.vesta("status")
    assert shown.returncode == 0
    assert "git run code from their arguments or input files: every key holder may run any program here" in shown.stdout
    assert "exec_allowlist allows git, which run code from their arguments or input files" in b.log()
    assert a.status()["exec_code_runners"] == []   # exec off there


def test_without_the_sandbox_a_job_cannot_read_the_key_from_the_daemon_s_command_line(
        cluster: Cluster, tmp_path: Path) -> None:
    # /proc/PID/cmdline is readable by every user: a job running as exec_user read `-key SECRET` there.
    cfg = tmp_path / "b.json"
    cfg.write_text(json.dumps({"allow_exec": True, "sandbox": "none"}))
    a, b = exec_pair(cluster, tmp_path, "-config", str(cfg), "-key", cluster.key)
    out = a.vesta("exec", "--on", "b", "--", "cat", f"/proc/{b.pid}/cmdline")
    assert out.returncode == 0, out.stderr
    assert "\0-key\0" in out.stdout and cluster.key not in out.stdout   # it read the line; the key is gone
    environ = Path(f"/proc/{b.pid}/environ").read_bytes()
    assert b"VESTA_KEY=" in environ and cluster.key.encode() not in environ
    assert a.vesta("ping", "b", "-c", "1").returncode == 0   # the daemon kept its own copy


HOGS = """
import subprocess, sys
hogs = [subprocess.Popen([sys.executable, "-c", "import time; b = b'x' * (60 << 20); time.sleep(6)"]) for _ in range(4)]
print("survived", [h.wait() for h in hogs], flush=True)
"""


def test_the_memory_limit_holds_for_the_whole_run(cluster: Cluster, tmp_path: Path) -> None:
    # The limit was RLIMIT_AS per process: four processes of 60 MiB passed a 150 MiB mem_offer_mb.
    need_tool("python3", "python3")
    cfg = tmp_path / "b.json"
    cfg.write_text(json.dumps({"allow_exec": True, "mem_offer_mb": 150}))
    a, b = exec_pair(cluster, tmp_path, "-config", str(cfg))
    out = a.vesta("exec", "--json", "--on", "b", "--", "python3", "-c", HOGS)
    r = json.loads(out.stdout)
    assert "survived" not in r["stdout"]
    assert r["signal"] == 9 and r["reason"].startswith("memory limit hit (") and "limit 150 MiB" in r["reason"], r
    shown = a.vesta("show", r["job_id"])
    assert shown.returncode == 0 and "memory limit hit" in shown.stdout, shown.stdout


def test_exec_forwards_standard_input_when_it_is_not_a_terminal(cluster: Cluster, tmp_path: Path) -> None:
    """`echo hi | vesta exec -- cat` printed nothing: stdin was silently /dev/null."""
    cfg = tmp_path / "b.json"
    cfg.write_text(json.dumps({"allow_exec": True, "exec_max_input_mb": 1}))
    a, b = exec_pair(cluster, tmp_path, "-config", str(cfg))
    out = a.vesta("exec", "--on", "b", "--", "cat", stdin="hi\nthere\n")
    assert out.returncode == 0 and out.stdout == "hi\nthere\n", out.stderr
    out = a.vesta("exec", "--on", "b", "--", "sh", "-c", "wc -c; ls -A", stdin="x" * 1000)
    assert out.stdout.split()[:2] == ["1000", ".vesta-stdin"], out   # read whole, shipped as one input
    refused = a.vesta("exec", "--no-stdin", "--on", "b", "--", "cat", stdin="not sent")
    assert refused.returncode == 0 and refused.stdout == ""
    empty = a.vesta("exec", "--on", "b", "--", "cat", stdin="")        # nothing to send: /dev/null as before
    assert empty.returncode == 0 and empty.stdout == ""
    big = a.vesta("exec", "--on", "b", "--", "cat", stdin="y" * (2 << 20))   # over b's exec_max_input_mb
    assert big.returncode == 1 and "exec_max_input_mb" in one_line(big.stderr)
    record = a.call("jobs", limit=1)[0]
    assert record["state"] == "failed" and "exec_max_input_mb" in record["reason"]   # on record, not lost

