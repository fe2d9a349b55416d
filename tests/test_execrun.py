"""exec: the path-proof allowlist, the scrubbed environment, and a runner that leaves nothing behind."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import resource
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import need_tool
from vesta import confine, execrun, proctree, rundir
from vesta.allowlist import SAFE_PATH, Allowlist, runs_code
from vesta.errors import ConfigError, Refused
from vesta.execrun import ExecResult
from vesta.rundir import make_workdir, remove_workdir, scrubbed_env


def real_which(name: str) -> str:
    found = shutil.which(name, path=SAFE_PATH)
    assert found is not None, name
    return os.path.realpath(found)


TRUE = real_which("true")
SH = real_which("sh")
ENV = real_which("env")
HEAD = real_which("head")


def refusal(allowlist: Allowlist, argv0: str, cwd: Path) -> Refused:
    with pytest.raises(Refused) as info:
        allowlist.resolve(argv0, cwd)
    return info.value


def executable(path: Path, text: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def job(tmp_path: Path) -> Path:
    d = tmp_path / "job"
    d.mkdir()
    return d


# ------------------------------------------------------------------------------------------- allowlist


def test_allowed_name_resolves_to_its_real_file(job: Path) -> None:
    allow = Allowlist(["true"])
    assert allow.resolve("true", job) == TRUE
    assert allow.resolve(TRUE, job) == TRUE
    assert allow.resolve("/bin/true", job) == TRUE   # another spelling of the same file
    assert allow.describe() == [f"true -> {TRUE}"]


def test_a_copy_of_another_program_named_like_an_allowed_one_is_refused(job: Path) -> None:
    allow = Allowlist(["true"])
    shutil.copy(SH, job / "true")
    err = refusal(allow, "./true", job)
    assert err.reason == "not_allowed"
    assert "'./true' is not in this node's exec_allowlist" in str(err)


def test_a_symlink_named_like_an_allowed_program_but_leading_elsewhere_is_refused(job: Path) -> None:
    (job / "true").symlink_to(SH)
    assert refusal(Allowlist(["true"]), "./true", job).reason == "not_allowed"


def test_another_file_at_an_absolute_path_is_refused(job: Path, tmp_path: Path) -> None:
    other = executable(tmp_path / "x" / "true")
    assert refusal(Allowlist(["true"]), str(other), job).reason == "not_allowed"


def test_dotdot_is_allowed_only_when_it_reaches_the_allowed_file(job: Path, tmp_path: Path) -> None:
    allow = Allowlist(["true"])
    up = "../" * len(job.parts) + TRUE.lstrip("/")   # e.g. ../../../../usr/bin/true
    assert up.startswith("../../")
    assert allow.resolve(up, job) == TRUE

    executable(tmp_path / "x" / "true")              # ../x/true from the job dir: a different file
    assert refusal(allow, "../x/true", job).reason == "not_allowed"


def test_a_symlink_to_the_allowed_file_is_that_file(job: Path) -> None:
    (job / "true").symlink_to(TRUE)
    assert Allowlist(["true"]).resolve("./true", job) == TRUE


def test_a_hard_link_is_the_allowed_file_and_the_allowed_path_runs(job: Path, tmp_path: Path) -> None:
    tool = executable(tmp_path / "tools" / "tool")
    os.link(tool, job / "linked")
    allow = Allowlist([str(tool)])
    assert allow.resolve("./linked", job) == str(tool)   # never the job's own link

    (job / "linked").unlink()
    executable(job / "linked")                       # same name, different inode
    assert refusal(allow, "./linked", job).reason == "not_allowed"


def test_a_multi_call_binary_is_allowed_only_under_its_allowlisted_name(job: Path, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    busybox = executable(bindir / "busybox")
    (bindir / "true").symlink_to("busybox")
    (bindir / "sh").symlink_to("busybox")
    allow = Allowlist(["true"], search_path=str(bindir))
    assert allow.resolve("true", job) == str(busybox)
    assert allow.resolve(str(bindir / "true"), job) == str(busybox)
    for name in ("sh", str(bindir / "sh"), str(busybox)):
        err = refusal(allow, name, job)
        assert err.reason == "not_allowed" and "only when called as true" in str(err), name


def test_a_non_executable_file_is_not_found(job: Path) -> None:
    (job / "prog").write_text("#!/bin/sh\n")
    (job / "prog").chmod(0o644)
    assert refusal(Allowlist([]), "./prog", job).reason == "not_found"
    assert refusal(Allowlist([]), str(job), job).reason == "not_found"   # a directory


def test_a_missing_program_is_not_found_and_named(job: Path) -> None:
    err = refusal(Allowlist(["true"]), "no-such-program-vesta", job)
    assert err.reason == "not_found" and "no-such-program-vesta" in str(err)
    err = refusal(Allowlist(["true"]), "./gone", job)
    assert err.reason == "not_found" and "./gone" in str(err)


def test_entries_that_resolve_to_nothing_are_missing_and_allow_nothing(job: Path) -> None:
    allow = Allowlist(["true", "no-such-program-vesta", "/nonexistent/vesta", "bin/true", ""])
    assert allow.missing == ["no-such-program-vesta", "/nonexistent/vesta", "bin/true", ""]
    assert not allow.any and list(allow.allowed) == [TRUE]
    assert "no-such-program-vesta (not found on this node: allows nothing)" in allow.describe()
    assert refusal(allow, "no-such-program-vesta", job).reason == "not_found"


def test_an_allowlist_of_only_missing_entries_allows_nothing(job: Path) -> None:
    allow = Allowlist(["no-such-program-vesta"])
    assert not allow.any
    assert refusal(allow, "true", job).reason == "not_allowed"


def test_an_empty_allowlist_allows_any_existing_program(job: Path) -> None:
    allow = Allowlist([])
    assert allow.any and allow.describe() == ["any program (exec_allowlist is empty)"]
    assert allow.resolve("sh", job) == SH
    script = executable(job / "mine")
    assert allow.resolve("./mine", job) == str(script)
    assert refusal(allow, "no-such-program-vesta", job).reason == "not_found"


# ---------------------------------------------------------------------------------------------- runner


class Collector:
    """on_output that keeps every chunk, per stream."""

    def __init__(self) -> None:
        self.data: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self.chunks: list[int] = []

    def __call__(self, stream: str, data: bytes) -> None:
        self.data[stream] += data
        self.chunks.append(len(data))

    def text(self, stream: str) -> str:
        return self.data[stream].decode()


def env_for(workdir: Path) -> dict[str, str]:
    return scrubbed_env(job_id="job-1", node="testnode", workdir=workdir)


async def run_sh(script: str, cwd: Path, *, timeout: float | None = 10.0,
                 **kwargs: object) -> tuple[ExecResult, Collector]:
    out = Collector()
    kwargs.setdefault("on_output", out)
    async with asyncio.timeout(15):
        result = await execrun.run(["sh", "-c", script], program=SH, cwd=cwd, env=env_for(cwd),
                                   timeout=timeout, **kwargs)  # type: ignore[arg-type]
    return result, out


def dead(pid: int) -> bool:
    """Gone, or a zombie waiting for init (which may not reap in a container)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return line.split()[1] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True
    return False


async def wait_dead(pid: int, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not dead(pid):
            await asyncio.sleep(0.02)


async def wait_file(path: Path, timeout: float = 5.0) -> int:
    async with asyncio.timeout(timeout):
        while not path.exists() or not path.read_text().strip():
            await asyncio.sleep(0.02)
    return int(path.read_text())


@pytest.fixture(params=["pidfd", "thread"])
def exit_watch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the runner learns of the exit: a pidfd, or (old kernels) a thread blocked in waitid."""
    if request.param == "thread":
        def no_pidfd(pid: int, flags: int = 0) -> int:
            raise OSError(errno.ENOSYS, "pidfd_open is not available")
        monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    return str(request.param)


async def test_output_is_captured_in_order_per_stream(job: Path) -> None:
    result, out = await run_sh("echo a; echo b >&2; echo c; echo d >&2", job)
    assert (result.exit_code, result.signal, result.reason) == (0, None, "")
    assert out.text("stdout") == "a\nc\n"
    assert out.text("stderr") == "b\nd\n"


async def test_exit_code_is_reported(job: Path, exit_watch: str) -> None:
    result, _ = await run_sh("exit 3", job)
    assert (result.exit_code, result.signal, result.timed_out, result.cancelled) == (3, None, False, False)
    assert result.reason == ""


async def test_death_by_signal_is_reported(job: Path) -> None:
    result, _ = await run_sh("kill -9 $$", job)
    assert (result.exit_code, result.signal) == (None, 9)
    assert result.reason == "killed by signal 9 (SIGKILL)"


async def test_cpu_time_comes_from_wait4_and_includes_children(job: Path) -> None:
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3:\n    pass\n"
    result, _ = await run_sh(f"{shlex.quote(sys.executable)} -c {shlex.quote(busy)}; exit 0", job)
    assert result.exit_code == 0
    assert result.cpu_s >= 0.2           # the python was sh's child: waited for, so counted
    assert result.max_rss_kb > 1000


async def test_program_runs_as_resolved_with_argv0_kept_in_the_workdir_and_stdin_empty(job: Path) -> None:
    async with asyncio.timeout(15):
        out = Collector()
        result = await execrun.run(["myname", "-c", 'echo "$0"; pwd; cat'], program=SH, cwd=job,
                                   env=env_for(job), timeout=10, on_output=out)
    assert result.exit_code == 0
    assert out.text("stdout").splitlines() == ["myname", str(job)]


async def test_timeout_kills_the_whole_group(job: Path, exit_watch: str) -> None:
    script = """sh -c 'trap "" TERM; echo $$ > "$1"; exec sleep 60' grandchild "$PWD/gc.pid" &
wait"""
    start = time.monotonic()
    result, _ = await run_sh(script, job, timeout=0.5, term_grace=0.5)
    assert time.monotonic() - start < 0.5 + 0.5 + 2
    assert result.timed_out and not result.cancelled
    assert result.reason == "timed out after 0.5s"
    assert result.signal == signal.SIGTERM   # the leader obeyed TERM; the grandchild got SIGKILL after it
    await wait_dead(int((job / "gc.pid").read_text()))


async def test_timeout_escalates_to_sigkill_after_the_grace(job: Path, exit_watch: str) -> None:
    script = """trap '' TERM
sh -c 'echo $$ > "$1"; exec sleep 60' grandchild "$PWD/gc.pid" &
echo started
wait"""
    start = time.monotonic()
    result, out = await run_sh(script, job, timeout=0.5, term_grace=0.3)
    took = time.monotonic() - start
    assert out.text("stdout") == "started\n"
    assert 0.5 + 0.3 - 0.05 <= took < 0.5 + 0.3 + 2
    assert result.timed_out and result.signal == signal.SIGKILL and result.exit_code is None
    await wait_dead(int((job / "gc.pid").read_text()))


async def test_cancel_event_stops_the_run_promptly(job: Path) -> None:
    cancel = asyncio.Event()

    def on_output(stream: str, data: bytes) -> None:
        if b"ready" in data:
            cancel.set()

    start = time.monotonic()
    result, _ = await run_sh("echo ready; exec sleep 60", job, on_output=on_output, cancel=cancel)
    assert time.monotonic() - start < 2
    assert result.cancelled and not result.timed_out and result.reason == "cancelled"
    assert result.signal == signal.SIGTERM


async def test_cancelling_the_caller_kills_the_group(job: Path, exit_watch: str) -> None:
    task = asyncio.ensure_future(run_sh('sleep 60 & echo $! > "$PWD/bg.pid"; exec sleep 60', job))
    pid = await wait_file(job / "bg.pid")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_dead(pid)
    async with asyncio.timeout(3):   # the background reaper finishes
        while execrun._CLEANUPS:
            await asyncio.sleep(0.02)


async def test_orphans_are_killed_on_normal_exit_without_hanging_on_their_pipe(job: Path, exit_watch: str) -> None:
    start = time.monotonic()
    result, _ = await run_sh('sleep 60 & echo $! > "$PWD/bg.pid"; exit 0', job)
    assert time.monotonic() - start < 2       # the backgrounded sleep held stdout open
    assert result.exit_code == 0 and result.reason == ""
    await wait_dead(int((job / "bg.pid").read_text()))


BURN = "while :; do :; done"


async def test_cpu_of_orphans_killed_at_the_end_is_counted(job: Path, exit_watch: str) -> None:
    # sh never waits for the burners, so wait4 knows nothing of them: without counting the rest of the run a
    # job could use CPU uncharged by leaving it behind.
    result, _ = await run_sh(f'({BURN}) > /dev/null & echo $! > "$PWD/bg.pid"; sleep 1; exit 0', job)
    assert result.exit_code == 0 and result.reason == ""
    assert result.cpu_s >= 0.4, result.cpu_s
    await wait_dead(int((job / "bg.pid").read_text()))


async def test_cpu_of_a_run_that_times_out_is_counted(job: Path) -> None:
    result, _ = await run_sh(f"({BURN}) & ({BURN}) & exec sleep 60", job, timeout=1.0, term_grace=0.3)
    assert result.timed_out and result.signal == signal.SIGTERM
    assert result.cpu_s >= 0.7, result.cpu_s   # two burners for a second: up to 2 s on two cores


async def test_processes_that_left_the_group_or_the_session_are_killed_too(job: Path, exit_watch: str) -> None:
    leave_group = ('import os, sys, time; os.setpgid(0, 0); open(sys.argv[1], "w").write(str(os.getpid())); '
                   'time.sleep(60)')
    script = (f"{shlex.quote(sys.executable)} -c {shlex.quote(leave_group)} \"$PWD/pg.pid\" > /dev/null 2>&1 &\n"
              "setsid sleep 60 > /dev/null 2>&1 & echo $! > \"$PWD/sid.pid\"\n"
              "exec sleep 60")
    result, _ = await run_sh(script, job, timeout=1.0, term_grace=0.3)
    assert result.timed_out
    left_group = await wait_file(job / "pg.pid")
    left_session = await wait_file(job / "sid.pid")
    await wait_dead(left_group)        # orphaned but still in the session
    await wait_dead(left_session)      # a new session, but its parent was the run's leader


async def test_a_failing_output_callback_kills_the_run_and_is_raised(job: Path) -> None:
    def on_output(stream: str, data: bytes) -> None:
        raise RuntimeError("records are full")

    with pytest.raises(RuntimeError, match="records are full"):
        await run_sh('echo $$ > "$PWD/main.pid"; echo hi; exec sleep 60', job, on_output=on_output)
    await wait_dead(int((job / "main.pid").read_text()))


async def test_environment_is_scrubbed(job: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VESTA_KEY", "federation-secret")
    out = Collector()
    async with asyncio.timeout(15):
        result = await execrun.run(["env"], program=ENV, cwd=job, env=env_for(job), timeout=10, on_output=out)
    assert result.exit_code == 0
    seen = dict(line.split("=", 1) for line in out.text("stdout").splitlines())
    assert seen == {
        "PATH": SAFE_PATH, "HOME": str(rundir.home_of(job)), "TMPDIR": str(job / "tmp"), "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8", "VESTA_JOB_ID": "job-1", "VESTA_NODE": "testnode", **rundir.HOOKS_OFF,
    }
    assert "federation-secret" not in out.text("stdout")
    assert (job / "tmp").is_dir()


def test_extra_environment_may_not_override_the_node_or_the_loader(job: Path) -> None:
    env = scrubbed_env(job_id="j", node="n", workdir=job, extra={"OMP_NUM_THREADS": "2"})
    assert env["OMP_NUM_THREADS"] == "2"
    for name in ("LD_PRELOAD", "LD_LIBRARY_PATH", "GCONV_PATH", "PATH", "HOME", "VESTA_JOB_ID", "VESTA_KEY", "A=B"):
        with pytest.raises(Refused) as info:
            scrubbed_env(job_id="j", node="n", workdir=job, extra={name: "x"})
        assert info.value.reason == "policy", name


def test_code_runners_in_the_allowlist_are_named() -> None:
    assert runs_code("python3.11") and runs_code("sh") and runs_code("git")
    assert not runs_code("true") and not runs_code("piwork") and not runs_code("py3compile")
    allowed = Allowlist(["true", "sh", "env", "head"])
    assert allowed.code_runners() == ["env", "sh"]
    assert Allowlist(["true", "head"]).code_runners() == []
    assert Allowlist([]).code_runners() == ["any program"]


SHIPPED_HOOKS = {
    # Python's per-user site directory, where HOME would be the working directory (found below)
    "usercustomize.py": "print('pwned by usercustomize')\n",
    ".gitconfig": "[alias]\n\tx = !echo pwned by gitconfig\n",
    "json.py": "print('pwned by json.py')\n",   # first on sys.path with python3 -m / -c (PYTHONSAFEPATH)
}


@pytest.mark.parametrize("sandbox", [False, True])
async def test_files_shipped_into_the_workdir_are_never_a_program_s_own_configuration(sandbox: bool) -> None:
    # A peer's inputs land in the working directory (nested names included). With HOME there, an allowlisted
    # Python script (py3compile) loaded a shipped usercustomize.py and git ran a shipped .gitconfig's alias.
    py3compile = need_tool("py3compile", "py3compile (python3-minimal)")
    git = need_tool("git", "git")
    bwrap = need_tool("bwrap", "bubblewrap") if sandbox else None
    work = make_workdir(None, "hooks")
    try:
        python = Path(py3compile).read_bytes().split(b"\n", 1)[0][2:].split()[0].decode()   # its #! interpreter
        user_site = subprocess.run([python, "-c", "import site; print(site.getusersitepackages())"],
                                   env={"HOME": str(work), "PATH": SAFE_PATH}, capture_output=True, text=True,
                                   check=True).stdout.strip()
        assert user_site.startswith(str(work) + "/")
        Path(user_site).mkdir(parents=True)
        (Path(user_site) / "usercustomize.py").write_text(SHIPPED_HOOKS["usercustomize.py"])
        (work / ".gitconfig").write_text(SHIPPED_HOOKS[".gitconfig"])
        (work / "json.py").write_text(SHIPPED_HOOKS["json.py"])
        env = env_for(work)
        home = Path(env["HOME"])
        assert home != work and not home.is_relative_to(work) and list(home.iterdir()) == []
        for argv in ([py3compile, "-h"], [git, "x"], [python, "-c", "import json"],
                     [SH, "-c", 'echo "home=$HOME"; ls -A "$HOME"; touch "$HOME/.cache"']):
            program, full = os.path.realpath(argv[0]), argv
            if bwrap is not None:
                program, full = confine.bwrap_command(bwrap, program=program, argv=argv, workdir=work,
                                                      allow_network=False, expose=(Path(program).parent,))
            out = Collector()
            async with asyncio.timeout(30):
                result = await execrun.run(full, program=program, cwd=work, env=env, timeout=20, on_output=out)
            said = out.text("stdout") + out.text("stderr")
            assert "pwned" not in said, (argv, said)
            if argv[0] == SH:
                assert result.exit_code == 0 and said == f"home={home}\n", said   # empty, and writable
            elif argv[0] == git:
                assert result.exit_code != 0 and "'x' is not a git command" in said, said
            else:
                assert result.exit_code == 0, said
    finally:
        remove_workdir(work)
    assert not work.exists() and not rundir.home_of(work).exists()


MEMORY_HOGS = """
import subprocess, sys
hog = "import time; b = b'x' * (%d << 20); time.sleep(%d)"
hogs = [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(4)]
print("survived", [h.wait() for h in hogs], flush=True)
"""


async def test_the_memory_limit_holds_for_the_whole_run_not_each_process(job: Path) -> None:
    # RLIMIT_AS bounds each process: four of 60 MiB passed a 150 MiB limit. The run's resident sum does not.
    python = real_which("python3")   # the system one, as a job finds it
    out = Collector()
    started = time.monotonic()
    async with asyncio.timeout(30):
        result = await execrun.run(["python3", "-c", MEMORY_HOGS % (60, 20)], program=python, cwd=job,
                                   env=env_for(job), timeout=25, on_output=out, mem_limit_mib=150)
    assert "survived" not in out.text("stdout"), out.text("stderr")
    assert result.over_memory and result.signal == signal.SIGKILL and not result.timed_out, out.text("stderr")
    assert result.reason.startswith("memory limit hit (") and "limit 150 MiB" in result.reason, result.reason
    assert time.monotonic() - started < 15
    # under the limit, the same run is left alone
    out = Collector()
    async with asyncio.timeout(30):
        result = await execrun.run(["python3", "-c", MEMORY_HOGS % (5, 1)], program=python, cwd=job,
                                   env=env_for(job), timeout=25, on_output=out, mem_limit_mib=150)
    assert result.exit_code == 0 and not result.over_memory and "survived [0, 0, 0, 0]" in out.text("stdout")


async def test_large_output_arrives_completely_through_an_async_callback(job: Path) -> None:
    got = Collector()

    async def on_output(stream: str, data: bytes) -> None:
        await asyncio.sleep(0)   # the runner waits for us before reading more
        got(stream, data)

    async with asyncio.timeout(15):
        result = await execrun.run(["head", "-c", "5000000", "/dev/zero"], program=HEAD, cwd=job,
                                   env=env_for(job), timeout=10, on_output=on_output)
    assert result.exit_code == 0
    assert len(got.data["stdout"]) == 5_000_000 and not got.data["stdout"].strip(b"\0")
    assert max(got.chunks) <= execrun.CHUNK


async def test_preexec_runs_in_the_child(job: Path) -> None:
    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    result, out = await run_sh("ulimit -n", job, preexec=limit_files)
    assert result.exit_code == 0 and out.text("stdout") == "64\n"


async def test_exec_failure_is_refused_as_not_found(job: Path) -> None:
    (job / "plain").write_text("not a program")
    for program in (str(job / "plain"), str(job / "absent")):
        with pytest.raises(Refused) as info:
            await execrun.run(["x"], program=program, cwd=job, env=env_for(job), timeout=5)
        assert info.value.reason == "not_found", program


# --------------------------------------------------------------------------------------------- workdir


def test_make_workdir_is_private_unique_and_named_for_the_job(tmp_path: Path) -> None:
    base = tmp_path / "jobs"
    a = make_workdir(base, "../../etc/evil job")
    b = make_workdir(base, "../../etc/evil job")
    assert a != b and a.parent == base and b.parent == base
    assert stat.S_IMODE(a.stat().st_mode) == 0o700
    assert "/" not in a.name and "evil_job" in a.name
    default = make_workdir(None, "j")
    try:
        assert stat.S_IMODE(default.stat().st_mode) == 0o700
    finally:
        remove_workdir(default)


def test_a_runs_directory_someone_else_could_write_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "runs"
    base.mkdir(mode=0o777)
    base.chmod(0o777)   # as a stranger's /tmp/vesta-runs-NODE-FP would be
    with pytest.raises(Refused, match="is not a private directory of this node's user"):
        make_workdir(base, "j")
    base.chmod(0o711)
    assert make_workdir(base, "j").parent == base


def test_remove_workdir_removes_a_tree_the_job_locked(tmp_path: Path) -> None:
    work = make_workdir(tmp_path, "j")
    (work / "ro" / "deeper").mkdir(parents=True)
    (work / "ro" / "deeper" / "f").write_text("x")
    (work / "ro" / "deeper").chmod(0o500)
    (work / "ro").chmod(0o500)
    (work / "locked").mkdir()
    (work / "locked" / "g").write_text("y")
    (work / "locked").chmod(0)
    (work / "link").symlink_to(tmp_path)   # followed by nobody
    remove_workdir(work)
    assert not work.exists() and tmp_path.exists()
    remove_workdir(work)                   # already gone: fine


# ------------------------------------------------------------------------------- processes, the job user


def fake_proc(root: Path, tasks: dict[int, tuple[int, int]]) -> Path:
    """A /proc with ``pid -> (real uid, threads)``, plus the entries that are not processes."""
    for pid, (uid, threads) in tasks.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "status").write_text(
            f"Name:\tx\nState:\tS (sleeping)\nUid:\t{uid}\t{uid + 1}\t{uid}\t{uid}\nGid:\t0\t0\t0\t0\n"
            f"Threads:\t{threads}\n")
    (root / "self").mkdir()
    (root / "meminfo").write_text("MemTotal: 1 kB\n")
    (root / "77").mkdir()            # gone before its status could be read
    return root


def test_nproc_limit_is_what_the_uid_has_now_plus_the_allowance(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc", {10: (1000, 1), 11: (1000, 4), 12: (0, 50), 13: (1001, 1)})
    assert confine.count_tasks(1000, proc) == 5          # threads count: RLIMIT_NPROC counts tasks
    assert confine.nproc_limit(1000, 16, proc) == 21
    assert confine.nproc_limit(4242, 16, proc) == 16
    with pytest.raises(ValueError, match="allowance must be positive"):
        confine.nproc_limit(1000, 0, proc)
    # here, for real: this test process and its threads are some of ours
    import threading
    assert confine.nproc_limit(os.getuid(), 5) >= 5 + threading.active_count()


def test_job_identity_is_the_exec_user_only_when_root(monkeypatch: pytest.MonkeyPatch) -> None:
    import pwd
    nobody = pwd.getpwnam("nobody")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert confine.job_identity("nobody") is None            # not root: jobs run as the daemon's user
    assert confine.job_identity("no-such-user-vesta") is None
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert confine.job_identity("nobody") == (nobody.pw_uid, nobody.pw_gid)
    assert confine.job_identity(str(nobody.pw_uid)) == (nobody.pw_uid, nobody.pw_gid)
    assert confine.job_identity("") is None                  # the owner's explicit choice: jobs run as root
    with pytest.raises(ConfigError) as info:
        confine.job_identity("no-such-user-vesta")
    assert str(info.value).startswith("exec_user 'no-such-user-vesta' does not exist on this node")
    assert "useradd --system --no-create-home no-such-user-vesta" in str(info.value)
    with pytest.raises(ConfigError, match="exec_user 'root' is root"):
        confine.job_identity("root")
    with pytest.raises(ConfigError, match="is root"):
        confine.job_identity("0")


def test_explain_names_the_process_limit_when_fork_failed() -> None:
    limits = confine.Limits(mem_mib=64, cpu_s=5, file_mib=1, procs=16)
    failed = ExecResult(exit_code=2, signal=None, timed_out=False, cancelled=False, elapsed_s=0.1, cpu_s=0.0,
                        max_rss_kb=0, reason="")
    for tail in (b"sh: 1: Cannot fork\n", b"bash: fork: retry: Resource temporarily unavailable\n",
                 b"BlockingIOError: [Errno 11] Resource temporarily unavailable\n",
                 b"RuntimeError: can't start new thread\n"):
        assert limits.explain(failed, tail) == "process limit hit (16 processes)", tail
    assert limits.explain(failed, b"MemoryError\n") == "memory limit hit (64 MiB of address space)"
    ok = ExecResult(exit_code=0, signal=None, timed_out=False, cancelled=False, elapsed_s=0.1, cpu_s=0.0,
                    max_rss_kb=0, reason="")
    assert limits.explain(ok, b"Cannot fork") == ""
    unlimited = confine.Limits(mem_mib=64, cpu_s=5, file_mib=1)
    assert unlimited.explain(failed, b"Cannot fork") == ""   # no process limit: it is not what failed


async def test_the_process_limit_is_set_in_the_child(job: Path) -> None:
    limits = confine.Limits(mem_mib=1024, cpu_s=10, file_mib=16, procs=40)
    before = confine.count_tasks(os.getuid())
    result, out = await run_sh("grep 'Max processes' /proc/self/limits", job, preexec=limits.preexec())
    assert result.exit_code == 0
    value = int(out.text("stdout").split()[2])
    assert before + 40 - 20 <= value <= before + 40 + 20     # our own threads may come and go meanwhile


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@needs_root
async def test_run_as_drops_to_the_job_user_after_the_limits(tmp_path: Path) -> None:
    ident = confine.job_identity("nobody")
    assert ident is not None
    work = make_workdir(None, "runas")
    try:
        confine.give_workdir(work, ident)
        assert (work.stat().st_uid, (work / "tmp").stat().st_uid) == (ident[0], ident[0])
        limits = confine.Limits(mem_mib=1024, cpu_s=10, file_mib=16, procs=8, run_as=ident)
        script = "grep -E '^(Uid|Gid|Groups):' /proc/self/status; grep 'Max processes' /proc/self/limits; touch mine"
        result, out = await run_sh(script, work, preexec=limits.preexec())
        assert result.exit_code == 0, out.text("stderr")
        lines = out.text("stdout").splitlines()
        assert lines[0].split()[1:] == [str(ident[0])] * 4 and lines[1].split()[1:] == [str(ident[1])] * 4
        assert lines[2].split() == ["Groups:"]
        assert (work / "mine").stat().st_uid == ident[0]
        result, out = await run_sh("id -u", work, preexec=limits.preexec(switch_user=False))
        assert out.text("stdout") == "0\n"       # bwrap_command(run_as=...) switches inside the sandbox instead
    finally:
        remove_workdir(work)


@needs_root
def test_give_workdir_refuses_a_directory_the_job_user_cannot_reach(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    work = make_workdir(closed, "j")
    with pytest.raises(Refused) as info:
        confine.give_workdir(work, (65534, 65534))
    assert info.value.reason == "policy" and f"{closed} is closed to it" in str(info.value)
    confine.give_workdir(work, None)     # jobs run as ourselves: nothing to hand over
    assert (work / "tmp").is_dir()


def test_usable_by_follows_the_modes_on_the_way() -> None:
    assert confine.usable_by(SH, (65534, 65534)) and confine.usable_by("/anything", None)
    top = make_workdir(None, "usable")       # in the system temp dir: every directory above is open
    try:
        prog = executable(top / "closed" / "prog")
        (top / "closed").chmod(0o700)
        owner = (top.stat().st_uid, top.stat().st_gid)
        stranger = (owner[0] + 12345, owner[1] + 12345)
        assert confine.usable_by(prog, owner)
        assert not confine.usable_by(prog, stranger)          # top/ is 0700 too
        top.chmod(0o701)
        assert not confine.usable_by(prog, stranger)
        (top / "closed").chmod(0o701)
        assert confine.usable_by(prog, stranger)
        assert not confine.usable_by(top / "closed" / "absent", owner)
        # a script is as usable as its interpreter
        (top / "hidden").mkdir(mode=0o700)
        python = executable(top / "hidden" / "python")
        script = executable(top / "closed" / "script", f"#!{python} -u\nprint(1)\n")
        assert confine.usable_by(script, owner) and not confine.usable_by(script, stranger)
        (top / "hidden").chmod(0o701)
        assert confine.usable_by(script, stranger)
        script.chmod(0o711)                   # it must be read to be run
        assert not confine.usable_by(script, stranger)
    finally:
        remove_workdir(top)


def test_bwrap_command_switches_user_inside_and_opens_the_way_to_exposed_paths(tmp_path: Path) -> None:
    hidden = tmp_path / "state"
    (hidden / "py" / "lib").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    plain, argv = confine.bwrap_command("/usr/bin/bwrap", program=SH, argv=["sh", "-c", "x"], workdir=work,
                                        allow_network=False, hide=[hidden], expose=[hidden / "py" / "lib"])
    assert "setpriv" not in " ".join(argv)
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--perms"] == ["1777"]   # /tmp only: no way to open
    assert argv[-4:] == ["--", SH, "-c", "x"]
    _, argv = confine.bwrap_command("/usr/bin/bwrap", program=SH, argv=["sh", "-c", "x"], workdir=work,
                                    allow_network=False, hide=[hidden], expose=[hidden / "py" / "lib"],
                                    run_as=(65534, 65534), setpriv="/usr/bin/setpriv")
    i = argv.index("--ro-bind", 3)
    assert argv[i - 4:i] == ["--perms", "0755", "--dir", str(hidden / "py")]   # not the hidden dir itself
    assert argv[i + 1] == str(hidden / "py" / "lib")
    at = argv.index("--")
    assert argv[at + 1:] == ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", SH, "-c", "x"]


def test_remove_workdir_never_chmods_through_a_directory_swapped_for_a_symlink(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A job process still alive swaps a directory for a link to somewhere else between the listing and
    # the chmod: a root daemon must not make that place 0700.
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    victim.chmod(0o755)
    (victim / "sub").chmod(0o755)
    work = make_workdir(tmp_path, "j")
    (work / "d" / "e").mkdir(parents=True)
    (work / "d").chmod(0o500)
    swapped: list[bool] = []

    def race(name: Any) -> None:   # the job wins the race at the first touch of d after the listing
        if os.path.basename(os.fsdecode(name)) == "d" and not swapped:
            (work / "d").rename(work / "d-old")
            (work / "d").symlink_to(victim)
            swapped.append(True)

    def racing(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(name: Any, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(name, int):
                race(name)
            return real(name, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "open", racing(os.open))
    monkeypatch.setattr(os, "chmod", racing(os.chmod))
    remove_workdir(work)
    monkeypatch.undo()
    assert swapped
    assert stat.S_IMODE(victim.stat().st_mode) == 0o755 and stat.S_IMODE((victim / "sub").stat().st_mode) == 0o755
    assert not work.exists() and (victim / "sub").is_dir()   # the link went, not what it points to


async def test_in_bwrap_the_state_stays_hidden_under_an_exposed_program_directory() -> None:
    bwrap = need_tool("bwrap", "bubblewrap")
    top = make_workdir(None, "state-under-tools")   # like ~/run.sh with the daemon's state in ~/.vesta
    work = make_workdir(None, "state-under-tools-run")
    try:
        (top / "state").mkdir()
        (top / "state" / "identity").write_text("the node's signing key\n")
        tool = top / "tool"
        tool.write_text("#!/bin/sh\nls -A \"$1\"; cat \"$1/identity\" 2>/dev/null || echo hidden\n")
        tool.chmod(0o755)
        program, argv = confine.bwrap_command(bwrap, program=str(tool), argv=["tool", str(top / "state")],
                                              workdir=work, allow_network=False, hide=(top / "state",),
                                              expose=(tool.parent,))
        out = Collector()
        async with asyncio.timeout(20):
            result = await execrun.run(argv, program=program, cwd=work, env=env_for(work), timeout=10,
                                       on_output=out)
        assert result.exit_code == 0, out.text("stderr")
        assert out.text("stdout") == "hidden\n"
    finally:
        remove_workdir(top)
        remove_workdir(work)


SANDBOXED_RUN = """
import asyncio, json, sys
from pathlib import Path
from vesta import confine, execrun, proctree, rundir

async def main(bwrap: str, sh: str, script: str, timeout: float) -> None:
    print(json.dumps({"subreaper": proctree.become_subreaper()}), flush=True)
    work = rundir.make_workdir(None, "bwrap-cpu")
    try:
        info = execrun.SandboxInfo()
        program, argv = confine.bwrap_command(bwrap, program=sh, argv=["sh", "-c", script], workdir=work,
                                              allow_network=False, info_fd=info.write_fd, die_with_parent=False)
        env = rundir.scrubbed_env(job_id="j", node="n", workdir=work)
        r = await execrun.run(argv, program=program, cwd=work, env=env, timeout=timeout, term_grace=0.3,
                              sandbox=info)
        await execrun.settle()   # an init on its way out is reaped after the result
        print(json.dumps({"cpu_s": r.cpu_s, "timed_out": r.timed_out, "exit_code": r.exit_code,
                          "supervised": sorted(proctree.supervised), "strays": proctree.reap_strays()}))
    finally:
        rundir.remove_workdir(work)

asyncio.run(main(*sys.argv[1:4], float(sys.argv[4])))
"""


@pytest.mark.parametrize("script, timeout, timed_out, least", [
    (f"timeout 1 sh -c '{BURN}'; exit 0", 10.0, False, 0.5),               # waited for inside, by the job
    (f"({BURN}) & exec sleep 60", 1.5, True, 0.5),                          # left behind, the run cut off
    (f"trap '' TERM; ({BURN}) & sleep 60", 1.5, True, 0.5),                # ... and deaf to SIGTERM
    (f"for i in 1 2; do ({BURN}) & done; sleep 1.5; exit 0", 10.0, False, 1.5),   # still running at the end
    # orphaned inside, ended and reaped by the namespace's init before the end: counted from the init's own count
    (f"(timeout 0.8 sh -c '{BURN}' &); sleep 1.5; exit 0", 10.0, False, 0.5),
])
def test_in_bwrap_the_cpu_of_the_whole_sandbox_is_counted(script: str, timeout: float, timed_out: bool,
                                                          least: float) -> None:
    # bubblewrap exits with the job's main process without waiting for its namespace's init, and the kernel's
    # own teardown of a namespace reaps uncounted: a subreaper adopts the init and counts what is left in it.
    # A subreaper is process-wide, so the run happens in a process of its own.
    bwrap = need_tool("bwrap", "bubblewrap")
    out = subprocess.run([sys.executable, "-c", SANDBOXED_RUN, bwrap, SH, script, str(timeout)],
                         capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    first, result = (json.loads(line) for line in out.stdout.splitlines())
    assert first == {"subreaper": True}
    assert result["timed_out"] is timed_out and result["cpu_s"] >= least, result
    assert result["supervised"] == [] and result["strays"] == 0   # the sandbox's init was reaped as ours


def test_sandbox_info_is_read_whole_however_bubblewrap_splits_it() -> None:
    child = subprocess.Popen([real_which("sleep"), "30"])
    info = execrun.SandboxInfo()
    try:
        seen = proctree.read_stat(child.pid)
        assert seen is not None
        os.write(info.write_fd, b'{\n    "child-pid": ' + str(child.pid).encode())   # bwrap 0.8 writes it in pieces
        assert info.feed() is False and info.init is None
        os.write(info.write_fd, b',\n    "pid-namespace": 4026532179')
        assert info.feed() is False
        os.write(info.write_fd, b"\n}\n")
        assert info.feed() is True and info.init == (child.pid, seen.start)
    finally:
        info.close()
        child.kill()
        child.wait()


@pytest.mark.parametrize("written", [b"", b"garbage", b'{"child-pid": "1234"}', b'{"child-pid": 1}', b"[1, 2]",
                                     b'{"child-pid": 12'])
def test_sandbox_info_that_names_no_init_is_done_at_the_end(written: bytes) -> None:
    info = execrun.SandboxInfo()
    try:
        os.write(info.write_fd, written)
        info.close_write()   # bubblewrap is gone
        assert info.feed() is True and info.init is None
    finally:
        info.close()


async def test_a_sandboxed_run_cancelled_at_once_leaves_no_reader_on_its_pipe() -> None:
    bwrap = need_tool("bwrap", "bubblewrap")
    work = make_workdir(None, "cancel-early")
    try:
        info = execrun.SandboxInfo()
        program, argv = confine.bwrap_command(bwrap, program=real_which("sleep"), argv=["sleep", "30"],
                                              workdir=work, allow_network=False, info_fd=info.write_fd)
        task = asyncio.ensure_future(execrun.run(argv, program=program, cwd=work, env=env_for(work), timeout=10,
                                                 sandbox=info))
        await asyncio.sleep(0)   # started, and watching the pipe
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(10):
            while execrun._CLEANUPS:
                await asyncio.sleep(0.02)
        assert info.read_fd == -1 and info.write_fd == -1   # the run closed it ...
        loop = asyncio.get_running_loop()
        r, w = os.pipe()   # ... after letting go of it: a new file with its number is watched as usual
        try:
            fired = asyncio.Event()
            loop.add_reader(r, fired.set)
            os.write(w, b"x")
            async with asyncio.timeout(2):
                await fired.wait()
            loop.remove_reader(r)
        finally:
            os.close(r)
            os.close(w)
    finally:
        remove_workdir(work)


async def test_cancelling_the_caller_kills_what_left_the_group_too(job: Path) -> None:
    leave = 'import os, sys, time; os.setpgid(0, 0); open(sys.argv[1], "w").write(str(os.getpid())); time.sleep(60)'
    script = f'{shlex.quote(sys.executable)} -c {shlex.quote(leave)} "$PWD/pg.pid" > /dev/null 2>&1 & exec sleep 60'
    task = asyncio.ensure_future(run_sh(script, job))
    pid = await wait_file(job / "pg.pid")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_dead(pid)
    async with asyncio.timeout(5):
        while execrun._CLEANUPS:
            await asyncio.sleep(0.02)


def test_a_run_never_closes_a_descriptor_it_no_longer_owns(tmp_path: Path) -> None:
    # uvloop's pipe transport closed an output pipe's number a second time after its file object had (uvloop
    # #763): a descriptor opened in between by another thread was closed under its owner (a warm runner's
    # build, a directory removal: "Bad file descriptor"). Runs go on while a thread keeps opening
    # descriptors and checking they stay open; and every run's pipes close cleanly.
    uvloop = pytest.importorskip("uvloop")
    true = shutil.which("true", path=SAFE_PATH)
    assert true is not None
    stolen: list[int] = []
    done = threading.Event()

    def hold() -> None:
        while not done.is_set():
            fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(8)]
            time.sleep(0.0005)
            for fd in fds:
                try:
                    os.fstat(fd)
                    os.close(fd)
                except OSError:
                    stolen.append(fd)

    async def main() -> None:
        for _ in range(400):
            r = await execrun.run(["true"], program=true, cwd=tmp_path, env={}, timeout=10)
            assert r.exit_code == 0
            await asyncio.sleep(0)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    finally:
        done.set()
        holder.join(10)
    assert stolen == [], "a run closed descriptors it did not own"
