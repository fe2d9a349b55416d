"""A run's files are bounded in bytes and in count: counted with a bound, the run killed over it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import Cluster, need_tool, tool
from vesta import confine, execrun, runfiles
from vesta.rundir import make_workdir, remove_workdir, scrubbed_env
from vesta.runfiles import DiskLimit

SH = shutil.which("sh") or "/bin/sh"


def test_count_stops_at_the_bound_counts_sparse_files_whole_and_never_follows_links(tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / f"f{i}").write_bytes(b"x")
    used, files = runfiles.count([tmp_path], 1 << 30, 10)
    assert files == 11                          # stopped one past the bound, not after all 50
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(1 << 30)                     # 1 GiB long, nothing allocated
    (tmp_path / "link").symlink_to("/usr")      # not followed
    used, files = runfiles.count([tmp_path], 1 << 40, 1000)
    assert files == 52 and (1 << 30) <= used < (1 << 30) + (1 << 20)
    assert runfiles.count([tmp_path / "missing"], 1, 1) == (0, 0)


def test_a_sandbox_tmp_that_is_the_hosts_own_is_never_counted(tmp_path: Path) -> None:
    # Through an init still setting its namespace up (or a pid that is no longer the sandbox's), /proc/PID/root
    # is the host's root: its /tmp holds every other user's files, none of them the run's.
    (tmp_path / "f").write_bytes(b"x")
    limit = DiskLimit(1 << 20, 10, (tmp_path,))
    assert runfiles.over(limit, sandbox_init=os.getpid()) == ""
    assert runfiles.over(DiskLimit(0, 10, (tmp_path,)), sandbox_init=os.getpid()).startswith("disk limit hit")


async def run(script: str, workdir: Path, limit: DiskLimit, **kw: object) -> execrun.ExecResult:
    async with asyncio.timeout(30):
        return await execrun.run(["sh", "-c", script], program=SH, cwd=workdir,
                                 env=scrubbed_env(job_id="j", node="n", workdir=workdir), timeout=20,
                                 disk=limit, **kw)   # type: ignore[arg-type]


async def test_a_run_that_writes_too_many_bytes_is_killed_and_says_so(tmp_path: Path) -> None:
    started = time.monotonic()
    r = await run("while :; do head -c 1048576 /dev/zero >> big; done", tmp_path, DiskLimit(8 << 20, 1000, (tmp_path,)))
    assert r.over_disk and r.signal == signal.SIGKILL and not r.timed_out, r
    assert r.reason.startswith("disk limit hit (more than 8 MiB written"), r.reason
    assert time.monotonic() - started < 10
    assert "disk limit hit" in confine.Limits(mem_mib=100, cpu_s=10, file_mib=10).explain(r, b"")


async def test_a_run_that_makes_too_many_files_is_killed_and_says_so(tmp_path: Path) -> None:
    r = await run("i=0; while :; do : > f$i; i=$((i+1)); done", tmp_path, DiskLimit(1 << 30, 500, (tmp_path,)))
    assert r.over_disk and r.reason.startswith("disk limit hit (more than 500 files made"), r.reason
    # under the bounds, the same kind of run is left alone
    r = await run("for i in 1 2 3; do : > g$i; done; head -c 1000 /dev/zero > small", tmp_path / "..",
                  DiskLimit(1 << 30, 5000, (tmp_path,)))
    assert r.exit_code == 0 and not r.over_disk, r


async def test_the_sandbox_tmp_is_a_bounded_tmpfs_and_its_files_are_counted() -> None:
    bwrap = need_tool("bwrap", "bubblewrap")
    work = make_workdir(None, "disk-sandbox")
    try:
        limit = DiskLimit(4 << 20, 300, (work,))

        async def sandboxed(script: str, expose: tuple[Path, ...] = ()) -> tuple[execrun.ExecResult, bytes]:
            info = execrun.SandboxInfo()
            program, argv = confine.bwrap_command(bwrap, program=SH, argv=["sh", "-c", script], workdir=work,
                                                  allow_network=False, info_fd=info.write_fd, tmp_bytes=4 << 20,
                                                  expose=expose)
            out = bytearray()
            async with asyncio.timeout(30):
                r = await execrun.run(argv, program=program, cwd=work, timeout=20, sandbox=info, disk=limit,
                                      env=scrubbed_env(job_id="j", node="n", workdir=work),
                                      on_output=lambda _s, d: out.extend(d))
            return r, bytes(out)

        # bytes: the private /tmp is full at 4 MiB, whatever the host's /tmp has
        r, out = await sandboxed("head -c 16777216 /dev/zero > /tmp/big; echo status=$?; ls -s /tmp/big")
        assert b"status=1" in out and r.exit_code == 0, out
        # files: counted inside the sandbox's /tmp, the run killed
        r, out = await sandboxed("i=0; while :; do : > /tmp/f$i; i=$((i+1)); done")
        assert r.over_disk and "files made" in r.reason, (r, out)
        # the working directory is bound into the sandbox's /tmp (it lives under the host's): counted once, so
        # 200 files there stay under a bound of 300 (counted twice, they were 400), however long the run lasts
        r, out = await sandboxed(f"for i in $(seq 200); do : > {work}/g$i; done; sleep {runfiles.DISK_CHECK_S * 1.5}")
        assert r.exit_code == 0 and not r.over_disk, (r, out)
        # nor is a host directory shown in the sandbox under /tmp (vesta's Python, in a checkout under /tmp)
        shown = make_workdir(None, "disk-shown")
        try:
            (shown / "big").write_bytes(bytes(6 << 20))
            r, out = await sandboxed(f"ls -s {shown}/big; sleep {runfiles.DISK_CHECK_S * 1.5}", expose=(shown,))
            assert r.exit_code == 0 and not r.over_disk and b"big" in out, (r, out)
        finally:
            remove_workdir(shown)
    finally:
        remove_workdir(work)


@pytest.mark.integration
def test_an_exec_job_over_its_disk_bound_is_killed_and_recorded_so(cluster: Cluster, tmp_path: Path) -> None:
    cfg = tmp_path / "node.json"
    cfg.write_text(json.dumps({"allow_exec": True, "exec_max_files": 200, "exec_max_disk_mb": 50}))
    node = cluster.add("a", args=["-config", str(cfg)])
    out = node.vesta("exec", "--timeout", "60", "--", "sh", "-c", "i=0; while :; do : > f$i; i=$((i+1)); done")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "disk limit hit (more than 200 files made" in out.stderr, out.stderr
    [job] = node.call("jobs")
    assert job["state"] == "failed" and "disk limit hit" in (job["reason"] or ""), job
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"exec_max_files": 0}))
    started = subprocess.run([*tool("vestad"), "-config", str(bad), "-name", "x"], capture_output=True, text=True,
                             timeout=30, env=node.env)
    assert started.returncode == 2 and "exec_max_files" in started.stderr and "Traceback" not in started.stderr
