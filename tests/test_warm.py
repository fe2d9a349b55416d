"""Warm runners: a job handed to a runner already in its sandbox sees nothing of the job before it, a runner
that dies while waiting is replaced, a changed shape drops the old ones, the allowlist still decides, and
CPU is charged as for a cold run. Real runners (bubblewrap where installed, prlimit, the job user when root),
driven through the Host as a peer's offers are; the daemon-level checks run real vestad processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from tests.helpers import Cluster, Vestad, eventually, eventually_async, idle_proc, need_tool
from vesta import allowlist, confine, proctree, proto, rundir, warm
from vesta.errors import Refused
from vesta.host import Host
from vesta.hostexec import ExecRunner, _find_shell
from vesta.spec import ExecSpec
from vesta.wire import Channel

FP = "cd" * 32
SHELL = _find_shell()


class Peer:
    """The submitter's end of the link: keeps what the host sends."""

    peer_fingerprint = FP

    def __init__(self) -> None:
        self.sent: list[proto.Message] = []

    async def send(self, *msgs: proto.Message) -> None:
        self.sent.extend(msgs)

    def result(self) -> proto.Result:
        results = [m for m in self.sent if isinstance(m, proto.Result)]
        assert len(results) == 1, self.sent
        return results[0]

    def stdout(self) -> str:
        return b"".join(m.data for m in self.sent if isinstance(m, proto.Output) and m.stream == "stdout").decode()


def make_runner(runs: Path, *, sandbox: bool = True, allowed: tuple[str, ...] = ()) -> ExecRunner:
    """What vestad builds: bubblewrap when installed (and asked for), prlimit, the job user when root."""
    job_user = confine.job_identity("nobody")
    bwrap = shutil.which("bwrap") if sandbox else None
    prlimit = shutil.which("prlimit", path=allowlist.SAFE_PATH)
    setpriv = confine.find_setpriv() if job_user is not None else None
    return ExecRunner(name="h", allowlist=allowlist.Allowlist(allowed), runs=runs, bwrap=bwrap, job_user=job_user,
                      setpriv=setpriv, prlimit=prlimit, timeout_s=60.0)


@pytest.fixture
def runs() -> Iterator[Path]:
    """Where runs are made: a directory the job user can reach (pytest's own are closed to it)."""
    base = Path(tempfile.mkdtemp(prefix="vt-warm-"))
    base.chmod(0o711)
    try:
        yield base / "runs"
    finally:
        rundir.remove_workdir(base)


@contextlib.asynccontextmanager
async def warm_host(runs: Path, *, allowed: tuple[str, ...] = (), slots: int = 4,
                    max_procs: int | None = None) -> AsyncIterator[tuple[Host, ExecRunner]]:
    """A Host whose runner keeps one warm runner, ready; stopped at the end."""
    if SHELL is None:
        pytest.skip("no POSIX shell")
    runner = make_runner(runs, allowed=allowed)
    if max_procs is not None:
        runner.max_procs = max_procs
    h = Host(name="h", counters=Counter(), capacity=lambda: (slots, 1024), events=lambda kind, text: None,
             runner=runner)
    runner.start_warm(1)
    try:
        await ready(runner, 1)
        yield h, runner
    finally:
        await runner.stop_warm()


@pytest.fixture
async def host(runs: Path) -> AsyncIterator[Host]:
    async with warm_host(runs) as (h, _):
        yield h


async def ready(runner: ExecRunner, count: int) -> None:
    assert runner.pool is not None
    await eventually_async(lambda: len(cast(warm.WarmPool, runner.pool).idle) >= count, 10)


def offer(*argv: str, rid: int = 1, **kw: Any) -> proto.Offer:
    return proto.Offer(rid=rid, job_id=f"j{rid}", spec=ExecSpec(tuple(argv), timeout_s=30, **kw), submitter="sub")


async def serve(h: Host, o: proto.Offer) -> Peer:
    peer = Peer()
    await asyncio.wait_for(h.serve_offer(o, cast(Channel, peer)), 30)
    return peer


def counters(h: Host) -> dict[str, int]:
    assert h.runner is not None
    return h.runner.warm_status()


# ------------------------------------------------------------------------------------------------ the script


@pytest.mark.skipif(SHELL is None, reason="no POSIX shell")
def test_the_job_script_gives_exactly_the_environment_and_arguments_it_was_given(tmp_path: Path) -> None:
    assert SHELL is not None
    env = {"A": "it's", "B": "two\nlines", "C": "$(touch pwned)`touch pwned2`", "EMPTY": "", "PATH": "/usr/bin:/bin"}
    args = ["a b", "'", '"', "$HOME", "*", "\n", ""]
    code = "import json, os, sys; print(json.dumps([dict(os.environ), sys.argv[1:]]))"
    script = warm.job_script(sys.executable, [sys.executable, "-c", code, *args], env, cpu_s=30, mem_kib=4 << 20)
    out = subprocess.run([SHELL, "-s"], input=warm.READY_COMMAND + script, capture_output=True, env={}, cwd=tmp_path,
                         timeout=10, check=True)
    assert out.stdout[:1] == warm.READY
    seen_env, seen_args = json.loads(out.stdout[1:])
    seen_env.pop("LC_CTYPE", None)   # Python's own locale coercion, not the shell's
    assert seen_env == env and seen_args == args
    assert not list(tmp_path.iterdir()), "a value ran as a command"


def test_the_job_script_refuses_a_nul_byte() -> None:
    with pytest.raises(Refused, match="embedded null byte") as err:
        warm.job_script("/bin/true", ["true", "a\0b"], {})
    assert err.value.reason == "policy"
    with pytest.raises(Refused, match="embedded null byte"):
        warm.job_script("/bin/true", ["true"], {"X": "\0"})


# ------------------------------------------------------------------------------------------------ runners


async def test_a_job_sees_nothing_of_the_job_before_it_in_the_same_slot(host: Host) -> None:
    marker = f"vesta-warm-{secrets.token_hex(4)}"
    first = ("sh", "-c", f"set -e; echo x > left-here; echo x > $HOME/in-home; echo x > /tmp/in-tmp; "
                         f"export LEAK=1; (setsid sh -c 'sleep 300' {marker} > /dev/null 2>&1 &); echo ran")
    p1 = await serve(host, offer(*first))
    assert p1.result().exit_code == 0 and p1.stdout() == "ran\n", p1.sent
    assert counters(host)["taken"] == 1
    assert host.runner is not None
    await ready(host.runner, 1)
    look = ("sh", "-c", "ls -A .; echo ---; ls -A $HOME; echo ---; ls -A /tmp; echo ---; env | sort; echo ---; "
                        "ps -e -o args= 2>/dev/null || ls /proc")
    p2 = await serve(host, offer(*look, rid=2))
    assert p2.result().exit_code == 0, p2.sent
    files, home, tmp, env, procs = p2.stdout().split("---\n")
    assert sorted(files.split()) == ["output", "tmp"] and home.split() == [], p2.stdout()   # as made for it
    assert "in-tmp" not in tmp.split(), p2.stdout()
    assert "LEAK" not in env and "VESTA_JOB_ID=j2\n" in env
    assert marker not in procs
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert left == [], "the first job's process outlived it"
    assert counters(host)["taken"] == 2, counters(host)   # both went through a warm runner


async def test_a_waiting_runner_s_directories_are_closed_to_the_job_user_until_its_job(host: Host) -> None:
    # A job user's process can find a waiting runner (its shell's working directory): nothing of it may be
    # reachable, or a job could swap a directory for a symlink while the daemon (root) writes the next job's
    # inputs and hands them over.
    assert host.runner is not None and host.runner.pool is not None
    if host.runner.job_user is None:
        pytest.skip("jobs run as the daemon's own user here")
    workdir = host.runner.pool.idle[0].workdir
    for path in (workdir, rundir.home_of(workdir), workdir / "tmp", workdir / "output"):
        st = path.lstat()
        assert st.st_uid == os.geteuid() and st.st_mode & 0o077 == 0, (path, oct(st.st_mode), st.st_uid)
    p = await serve(host, offer("sh", "-c", "set -e; id -u; echo x > here; echo x > $HOME/h; echo x > output/o"))
    assert p.result().exit_code == 0 and p.stdout().split() == [str(host.runner.job_user[0])], p.sent


async def test_a_job_s_process_limit_is_worked_out_when_it_starts(runs: Path) -> None:
    # The process limit is what the job user runs now plus the allowance: not what it ran when the runner was
    # built (runners wait for minutes; jobs come and go meanwhile).
    if os.geteuid() != 0:
        pytest.skip("needs root (jobs run as a job user)")
    async with warm_host(runs, max_procs=64) as (h, runner):
        assert runner.job_user is not None
        uid, gid = runner.job_user
        built = confine.count_tasks(uid)
        setpriv = confine.find_setpriv()
        extra = [subprocess.Popen([setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "sleep", "60"])
                 for _ in range(30)]
        try:
            await asyncio.sleep(confine.COUNT_TTL_S + 0.1)   # past the cached count
            p = await serve(h, offer("sh", "-c", "ulimit -p"))
            assert p.result().exit_code == 0, p.sent
            assert int(p.stdout()) >= built + 30 + 64, (p.stdout(), built)
        finally:
            for proc in extra:
                proc.kill()
                proc.wait()


async def test_a_long_command_line_is_handed_over_whole(host: Host) -> None:
    words = ["x'y" * 1333] * 200   # the most a job may have (spec.MAX_ARG, MAX_ARGV): 3.5 MB once quoted
    p = await serve(host, offer("sh", "-c", 'printf %s "$@" | wc -c', "sh", *words))
    assert p.result().exit_code == 0 and p.stdout().strip() == str(sum(map(len, words))), (p.stdout(), p.result())
    assert counters(host)["taken"] == 1


async def test_a_runner_killed_while_waiting_is_replaced_and_no_job_fails(host: Host) -> None:
    assert host.runner is not None and host.runner.pool is not None
    victim = host.runner.pool.idle[0]
    os.kill(victim.pids()[-1], signal.SIGKILL)   # the shell at the end of its chain
    await eventually_async(lambda: counters(host)["died"] == 1, 10)
    await ready(host.runner, 1)
    assert victim not in host.runner.pool.idle
    p = await serve(host, offer("true"))
    assert p.result().ok and p.result().exit_code == 0, p.sent
    assert counters(host)["taken"] == 1


async def test_a_changed_allowlist_or_sandbox_drops_the_old_runners(host: Host) -> None:
    runner = host.runner
    assert runner is not None and runner.pool is not None
    old = list(runner.pool.idle)
    runner.allowlist = allowlist.Allowlist(["true", "sh"])
    await eventually_async(lambda: runner.pool is not None and runner.pool.idle and runner.pool.idle[0] not in old, 10)
    assert all(not r.alive or r.used for r in old)
    assert (await serve(host, offer("true"))).result().exit_code == 0
    assert counters(host)["taken"] == 1
    if runner.bwrap is not None:   # the sandbox setting: sandbox none from now on
        await ready(runner, 1)
        old = list(runner.pool.idle)
        runner.bwrap = None
        p = await serve(host, offer("sh", "-c", "cat /proc/1/comm", rid=2))
        assert p.result().exit_code == 0 and "bwrap" not in p.stdout(), p.stdout()
        await eventually_async(lambda: all(not r.alive for r in old), 10)


async def test_a_refused_program_never_reaches_a_runner(runs: Path) -> None:
    async with warm_host(runs, allowed=("true",)) as (h, runner):
        assert runner.pool is not None
        idle = list(runner.pool.idle)
        for argv0 in ("sh", "/bin/sh", "./true", "../../../bin/sh"):
            p = await serve(h, offer(argv0, "-c", "echo pwned"))
            assert "pwned" not in p.stdout()
            assert isinstance(p.sent[0], proto.Refuse), p.sent
        assert runner.pool.idle == idle and counters(h)["taken"] == 0
        assert (await serve(h, offer("true"))).result().exit_code == 0
        assert counters(h)["taken"] == 1


async def test_a_job_refused_for_capacity_gives_its_runner_back(runs: Path) -> None:
    async with warm_host(runs, slots=0) as (h, runner):
        assert runner.pool is not None
        idle = list(runner.pool.idle)
        p = await serve(h, offer("true"))
        assert isinstance(p.sent[0], proto.Refuse) and p.sent[0].reason == "capacity", p.sent
        assert runner.pool.idle == idle and all(r.alive for r in idle)


async def test_the_pool_grows_while_jobs_come_faster_than_runners_are_built(host: Host) -> None:
    assert host.runner is not None and host.runner.pool is not None
    for rid in range(1, 6):
        assert (await serve(host, offer("true", rid=rid))).result().exit_code == 0
    c = counters(host)
    assert c["taken"] + c["missed"] == 5 and c["missed"] >= 1
    assert host.runner.pool.want > 1   # it keeps spares for a while
    await eventually_async(lambda: len(cast(warm.WarmPool, host.runner.pool).idle) >= 2, 15)   # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------------ daemons


def warm_node(cluster: Cluster, tmp_path: Path, name: str) -> Vestad:
    """A node lending exec in bubblewrap (an idle machine), its warm runner ready."""
    need_tool("bwrap", "bubblewrap")
    node = cluster.add(name, args=["-allow-exec", "-proc-root", str(idle_proc(tmp_path / f"proc-{name}"))])
    eventually(lambda: node.status()["warm_runners"].get("ready", 0) >= 1, 10)
    return node


def runs_of(node: Vestad) -> str:
    """The part of a path that is this node's runs directory (asked while it runs)."""
    return f"/vesta-runs-{node.name}-{node.status()['fingerprint'][:8]}/"


def runner_dirs(*runs: str) -> list[str]:
    """Working directories of processes now under these runs directories (``runs_of``: where runners wait)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if any(r in cwd + "/" for r in runs):
            found.append(cwd)
    return found


@pytest.mark.integration
def test_exec_off_or_warm_runners_0_means_no_runners(cluster: Cluster, tmp_path: Path) -> None:
    need_tool("bwrap", "bubblewrap")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"allow_exec": True, "warm_runners": "0"}))
    a = cluster.add("a")
    c = cluster.add("c", args=["-config", str(cfg), "-proc-root", str(idle_proc(tmp_path / "proc-c"))])
    on = cluster.add("on", args=["-allow-exec", "-proc-root", str(idle_proc(tmp_path / "proc-on"))])
    assert a.status()["warm_runners"] == {} and c.status()["warm_runners"] == {}
    eventually(lambda: on.status()["warm_runners"].get("ready", 0) >= 1, 10)
    assert "warm runner" in on.status()["isolation"]
    eventually(lambda: a.peer_names() == {"c", "on"}, 5)
    out = a.vesta("exec", "--json", "--on", "c", "--", "true")
    assert out.returncode == 0, out.stderr
    on_runs = runs_of(on)
    assert runner_dirs(runs_of(a), runs_of(c)) == [] and runner_dirs(on_runs)
    on.stop()
    eventually(lambda: runner_dirs(on_runs) == [], 10, what="the runners to go with their daemon")


@pytest.mark.integration
def test_runners_of_a_killed_daemon_go_with_it(cluster: Cluster, tmp_path: Path) -> None:
    b = warm_node(cluster, tmp_path, "b")
    b_runs = runs_of(b)
    assert runner_dirs(b_runs)
    b.kill()
    eventually(lambda: runner_dirs(b_runs) == [], 10, what="the runners of a SIGKILLed vestad to exit")


@pytest.mark.integration
def test_cpu_of_a_warm_sandboxed_run_with_background_children_is_charged_in_full(cluster: Cluster,
                                                                                 tmp_path: Path) -> None:
    a = cluster.add("a")
    b = warm_node(cluster, tmp_path, "b")
    eventually(lambda: a.peer_names() == {"b"}, 10)
    # Two children burn 0.4 s of CPU each, say so, and stay behind when the main process exits.
    burn = (f"{sys.executable} -c \"import time, pathlib, sys\nwhile time.process_time() < 0.4: pass\n"
            f"pathlib.Path(sys.argv[1]).touch(); time.sleep(300)\"")
    script = f"{burn} d1 & {burn} d2 & while [ ! -e d1 ] || [ ! -e d2 ]; do sleep 0.05; done; exit 0"
    out = a.vesta("exec", "--json", "--on", "b", "--", "sh", "-c", script)
    r = json.loads(out.stdout)
    assert r["exit_code"] == 0 and r["cpu_s"] >= 0.7, r   # 0.8 s, less the rounding of /proc's clock ticks
    assert b.status()["warm_runners"]["taken"] == 1
    eventually(lambda: not b.status()["hosting"], 10)
    left = subprocess.run(["pgrep", "-f", "time.sleep.300"], capture_output=True, text=True).stdout.split()
    assert left == [], "the job's children outlived it"


@pytest.mark.integration
def test_a_runner_left_by_a_crashed_daemon_is_killed_when_it_comes_back(cluster: Cluster, tmp_path: Path) -> None:
    b = warm_node(cluster, tmp_path, "b")
    b_runs = runs_of(b)

    def runners() -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                st = proctree.read_stat(int(pid))
                if b_runs in os.readlink(f"/proc/{pid}/cwd") + "/" and st is not None and st.state != "Z":
                    found.append(int(pid))
            except OSError:
                continue
        return found

    stuck = runners()
    assert stuck
    for pid in stuck:   # stopped, they cannot see their pipe close: what a crash mid-build can leave
        os.kill(pid, signal.SIGSTOP)
    b.kill()
    time.sleep(0.5)
    assert runners() == stuck
    b.start()
    eventually(lambda: not set(stuck) & set(runners()), 10, what="the old runners to be killed")
    assert "killed" in b.log() and "left running" in b.log()
