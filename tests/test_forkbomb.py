"""rlimit enforcement: fork bomb bounded. A real fork bomb under ``Limits(procs=...)``, plain and in bubblewrap.

As root the job runs as ``nobody`` (``job_identity``): root ignores RLIMIT_NPROC. Before any bomb goes off,
a probe run checks that the job's uid is not 0 and its process limit is finite, so a broken limit fails the
test instead of the machine. The bomb also has a safety net of its own (at most 1000 processes).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import need_tool
from vesta import confine, execrun
from vesta.confine import Limits
from vesta.execrun import ExecResult

PROCS = 24      # tasks a job may have
# Other processes of the same uid that exit during the run leave the job that much more room: as root the
# job user (nobody) is quiet, but an unprivileged test user may have a desktop session coming and going.
SLACK = 0 if os.geteuid() == 0 else 16
# dash gives up at the first failed fork; bash retries for seconds first.
SH = os.path.realpath(shutil.which("dash", path=execrun.SAFE_PATH) or shutil.which("sh", path=execrun.SAFE_PATH)
                      or "/bin/sh")

# The leader forks children forever (up to a safety net of 1000), each sleeping, and says how many it made
# when it exits: dash gives up at the first failed fork ("Cannot fork", status 2). Each child also writes a
# line (unless the group kill is first). $1 is a unique sleep length: the processes of this run are the
# ones whose command line holds it.
BOMB = r"""
trap 'echo "forked $n"' EXIT
n=0
while [ $n -lt 1000 ]; do
  { echo "$n" >> "$PWD/spawned"; exec sleep "$1"; } &
  n=$((n + 1))
done
exec sleep "$1"
"""


def need_bwrap() -> str:
    return need_tool("bwrap", "bubblewrap")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A job directory where host.py makes them (the system temp dir), handed to the job user."""
    path = execrun.make_workdir(None, "forkbomb")
    try:
        yield path
    finally:
        execrun.remove_workdir(path)
        assert not path.exists()


def identity() -> tuple[int, int] | None:
    return confine.job_identity("nobody")


class Tail:
    def __init__(self) -> None:
        self.data = bytearray()

    def __call__(self, stream: str, data: bytes) -> None:
        self.data += data
        del self.data[:-4096]


async def run_job(argv: list[str], workdir: Path, *, sandbox: bool, timeout: float,
                  prefix: bool = False) -> tuple[ExecResult, bytes]:
    """Run ``argv`` as host.py would: limits (a preexec function, or with ``prefix`` the prlimit/setpriv
    command prefix), the job user, the workdir handed over, optionally in bwrap."""
    confine._counted.clear()   # every run counts the job user's tasks afresh
    run_as = identity()
    limits = Limits(mem_mib=1024, cpu_s=30, file_mib=16, procs=PROCS, run_as=run_as)
    confine.give_workdir(workdir, run_as)
    env = execrun.scrubbed_env(job_id="bomb", node="testnode", workdir=workdir)
    program = argv[0]
    if sandbox:
        program, argv = confine.bwrap_command(need_bwrap(), program=argv[0], argv=argv, workdir=workdir,
                                              allow_network=False, expose=(Path(argv[0]).parent,),
                                              run_as=run_as)
    preexec = limits.preexec(switch_user=not sandbox)
    if prefix:
        prlimit = shutil.which("prlimit", path=execrun.SAFE_PATH)
        assert prlimit is not None, "scripts/setup installs util-linux"
        program, argv = limits.command(prlimit, program, argv, setpriv=confine.find_setpriv(),
                                       switch_user=not sandbox)
        preexec = None
    tail = Tail()
    async with asyncio.timeout(timeout + 10):
        result = await execrun.run(argv, program=program, cwd=workdir, env=env, timeout=timeout, on_output=tail,
                                   term_grace=0.5, preexec=preexec)
    return result, bytes(tail.data)


def processes_with(token: str, uid: int | None = None) -> list[int]:
    """Live (not zombie) processes whose command line contains ``token`` (and of real uid ``uid``)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            status = dict(line.split(":", 1) for line in Path(f"/proc/{name}/status").read_text().splitlines())
        except (OSError, ValueError):
            continue
        if (token.encode() in cmdline and status["State"].split()[0] != "Z"
                and (uid is None or int(status["Uid"].split()[0]) == uid)):
            found.append(int(name))
    return found


@pytest.mark.parametrize("prefix", [False, True], ids=["preexec", "prlimit"])
@pytest.mark.parametrize("sandbox", [False, True], ids=["plain", "bwrap"])
async def test_a_fork_bomb_is_bounded_explained_and_leaves_nothing(workdir: Path, sandbox: bool, prefix: bool) -> None:
    if sandbox:
        need_bwrap()
    # The probe: not root, and a finite process limit, or the bomb below would be a real one.
    result, out = await run_job([SH, "-c", "cat /proc/self/status /proc/self/limits"], workdir,
                                sandbox=sandbox, timeout=10, prefix=prefix)
    assert result.exit_code == 0, out
    text = out.decode()
    uid = int(next(line for line in text.splitlines() if line.startswith("Uid:")).split()[1])
    max_procs = next(line for line in text.splitlines() if line.startswith("Max processes")).split()[2]
    assert uid != 0 and max_procs.isdigit(), text
    assert uid == (identity() or (os.getuid(), 0))[0]

    token = f"{300 + secrets.randbelow(10**6) / 10**7:.7f}"      # a sleep length no other process has
    result, tail = await run_job([SH, "-c", BOMB, "bomb", token], workdir, sandbox=sandbox, timeout=20,
                                 prefix=prefix)

    assert not result.timed_out, (result, tail[-300:])          # the leader's fork failed: it gave up
    assert result.exit_code != 0 and (b"Cannot fork" in tail or b"fork: " in tail), (result, tail[-300:])
    forked = int(tail.split(b"forked ")[-1].split()[0])
    assert PROCS // 2 <= forked <= PROCS - 1 + SLACK, forked    # the leader is one of the PROCS
    assert len((workdir / "spawned").read_text().splitlines()) <= forked
    limits = Limits(mem_mib=1024, cpu_s=30, file_mib=16, procs=PROCS)
    assert limits.explain(result, tail) == f"process limit hit ({PROCS} processes)"

    async with asyncio.timeout(5):      # the group kill (or the pid namespace) took every one of them
        while left := processes_with(token):
            await asyncio.sleep(0.05)
    assert not left


@pytest.mark.skipif(os.geteuid() != 0, reason="jobs run as another user only when the daemon is root")
async def test_the_workdir_and_what_the_job_user_left_in_it_are_removed(workdir: Path) -> None:
    run_as = identity()
    assert run_as is not None
    script = ("id -u > me; mkdir -p a/b; echo x > a/b/f; chmod 0 a/b; chmod 500 a; "
              "mkdir locked; echo y > locked/g; chmod 0 locked; echo z > \"$TMPDIR/t\"")
    result, out = await run_job([SH, "-c", script], workdir, sandbox=False, timeout=10)
    assert result.exit_code == 0, out
    assert (workdir / "me").read_text().strip() == str(run_as[0])
    assert (workdir / "a").stat().st_uid == run_as[0] and (workdir / "tmp" / "t").stat().st_uid == run_as[0]
    execrun.remove_workdir(workdir)
    assert not workdir.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="jobs run as another user only when the daemon is root")
async def test_in_bwrap_the_job_user_reaches_exposed_programs_under_closed_directories(workdir: Path) -> None:
    bwrap = need_bwrap()
    run_as = identity()
    assert run_as is not None
    top = execrun.make_workdir(None, "closed-tools")    # like /root/.pyenv: 0700 directories above the tools
    try:
        tool = top / "py" / "bin" / "tool"
        tool.parent.mkdir(parents=True)
        (top / "py" / "state" / "vesta").mkdir(parents=True)     # hidden too, like the daemon's state
        tool.write_text("#!/bin/sh\nid -u\n")
        tool.chmod(0o755)
        (top / "py").chmod(0o700)
        assert not confine.usable_by(tool, run_as)       # outside the sandbox it cannot be run
        confine.give_workdir(workdir, run_as)
        program, argv = confine.bwrap_command(bwrap, program=str(tool), argv=["tool"], workdir=workdir,
                                              allow_network=False, hide=(top, top / "py" / "state" / "vesta"),
                                              expose=(tool.parent,),
                                              run_as=run_as)
        limits = Limits(mem_mib=1024, cpu_s=30, file_mib=16, procs=PROCS, run_as=run_as)
        tail = Tail()
        env = execrun.scrubbed_env(job_id="tools", node="testnode", workdir=workdir)
        async with asyncio.timeout(20):
            result = await execrun.run(argv, program=program, cwd=workdir, env=env, timeout=10, on_output=tail,
                                       preexec=limits.preexec(switch_user=False))
        assert result.exit_code == 0 and bytes(tail.data) == f"{run_as[0]}\n".encode(), bytes(tail.data)
    finally:
        execrun.remove_workdir(top)
