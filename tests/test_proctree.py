"""proctree: which processes belong to a run, and stopping, counting and killing them for real."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vesta import proctree
from vesta.proctree import ProcStat, RunProcs, members, parse_stat

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def stat_line(pid: int, name: str, state: str, ppid: int, pgrp: int, session: int,
              ticks: tuple[int, int, int, int] = (0, 0, 0, 0), start: int = 1000) -> bytes:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime
    # priority nice num_threads itrealvalue starttime ...
    rest = [state, ppid, pgrp, session, 0, -1, 4194560, 10, 0, 0, 0, *ticks, 20, 0, 1, 0, start, 1000, 100]
    return f"{pid} ({name}) {' '.join(map(str, rest))}\n".encode()


def ps(pid: int, ppid: int, pgrp: int, session: int, state: str = "S") -> ProcStat:
    return ProcStat(pid=pid, ppid=ppid, pgrp=pgrp, session=session, state=state, cpu_s=0.0, start=pid)


def test_stat_parses_after_the_last_parenthesis_of_the_name() -> None:
    st = parse_stat(42, stat_line(42, "a) (b c) x", "R", 7, 40, 30, ticks=(100, 50, 20, 5), start=777))
    assert st == ProcStat(pid=42, ppid=7, pgrp=40, session=30, state="R", cpu_s=175 * TICK_S, start=777)


@pytest.mark.parametrize("raw", [b"", b"42 (no closing", b"42 (x) R 1 2",
                                 b"42 (x) R a b c d e f g h i j k l m n o p q r s t"])
def test_a_stat_that_does_not_parse_is_none(raw: bytes) -> None:
    assert parse_stat(42, raw) is None


def test_scan_reads_every_numeric_entry_and_skips_the_rest(tmp_path: Path) -> None:
    for pid, line in [(1, stat_line(1, "init", "S", 0, 1, 1)), (25, stat_line(25, "job", "R", 1, 25, 25)),
                      (26, b"garbage")]:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_bytes(line)
    (tmp_path / "self").mkdir()
    (tmp_path / "27").mkdir()   # gone between the listing and the read: no stat
    assert sorted(st.pid for st in proctree.scan(tmp_path)) == [1, 25]


def test_members_are_the_group_the_session_and_their_descendants_never_the_leader() -> None:
    leader = 100
    stats = [
        ps(1, 0, 1, 1),
        ps(leader, 1, leader, leader, "Z"),
        ps(101, 1, leader, leader),           # an orphan still in the group
        ps(102, 1, 102, leader),              # left the group with setpgid: still in the session
        ps(103, 102, 103, 103),               # setsid, but its parent is in the run
        ps(104, 103, 104, 104),               # and its child
        ps(105, leader, 105, 105),            # the live leader's own child that called setsid
        ps(200, 1, 200, 200),                 # someone else's
        ps(201, 200, 200, 200),
        ps(300, 1, 300, 300),                 # setsid and orphaned before the scan: escaped
    ]
    assert sorted(members(stats, leader)) == [101, 102, 103, 104, 105]
    # a sandbox's init, adopted by us once bubblewrap is gone, and what runs under it; not a later process
    # given the same pid
    adopted = [*stats, ps(400, 1, 400, 400), ps(401, 400, 401, 401), ps(402, 1, 402, 402)]
    assert sorted(members(adopted, leader, roots={400: 400, 402: 7})) == [101, 102, 103, 104, 105, 400, 401]


# ----------------------------------------------------------------------------------------- for real

BURN = "while :; do :; done"


def start_run(script: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sh", "-c", script], start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_pids(path: Path, count: int, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            pids = path.read_text().split()
            if len(pids) >= count:
                return [int(p) for p in pids]
        time.sleep(0.02)
    raise AssertionError(f"{path} never listed {count} pids")


def state(pid: int) -> str | None:
    st = proctree.read_stat(pid)
    return None if st is None else st.state


def wait_states(pids: list[int], states: tuple[str | None, ...], timeout: float = 5.0) -> None:
    """Until each of ``pids`` is in one of ``states`` (a signal may take a moment to land on a busy machine)."""
    deadline = time.monotonic() + timeout
    while any(state(pid) not in states for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


def finish(leader: subprocess.Popen[bytes], procs: RunProcs) -> None:
    procs.kill()
    procs.close()
    leader.kill()
    leader.wait(5)


def test_stop_counts_what_the_run_used_then_kill_ends_it(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # Two burners orphaned in the group, and one that left the session under a live parent.
    leader = start_run(f"({BURN}) & echo $! >> {pids}; ({BURN}) & echo $! >> {pids}; "
                       f"{sys.executable} -c 'import os; os.setsid(); os.execvp(\"sh\", [\"sh\", \"-c\", \"{BURN}\"])' "
                       f"& echo $! >> {pids}; exec sleep 60")
    procs = RunProcs(leader.pid)
    try:
        burners = wait_pids(pids, 3)
        time.sleep(0.6)
        used = procs.stop()
        wait_states([*burners, leader.pid], ("T",))   # every one has SIGSTOP
        assert all(state(pid) == "T" for pid in burners), [state(p) for p in burners]
        assert state(leader.pid) == "T"                      # the group stopped too
        before = sum(proctree.read_stat(pid).cpu_s for pid in burners)  # type: ignore[union-attr]
        assert before - 0.05 <= used <= before               # counted as they stopped: little more ran after
        assert used >= 0.3, used                             # three burners for 0.6 s on two cores
        time.sleep(0.2)
        assert sum(proctree.read_stat(pid).cpu_s for pid in burners) == before  # type: ignore[union-attr]
        procs.kill()
        leader.wait(5)
        wait_states(burners, (None, "Z"))
        assert all(state(pid) in (None, "Z") for pid in burners)
    finally:
        finish(leader, procs)


def test_a_process_outside_the_run_is_left_alone(tmp_path: Path) -> None:
    bystander = start_run("exec sleep 60")
    leader = start_run("exec sleep 60")
    procs = RunProcs(leader.pid)
    try:
        assert procs.stop() == 0.0
        procs.kill()
        assert leader.wait(5) == -signal.SIGKILL
        assert state(bystander.pid) in ("R", "S")      # neither stopped nor killed
    finally:
        finish(leader, procs)
        bystander.kill()
        bystander.wait(5)


def test_a_pid_reused_after_the_scan_is_not_signalled(tmp_path: Path) -> None:
    # The scan saw pid P start at time t; by the time it is held, P names a process started later.
    bystander = start_run("exec sleep 60")
    procs = RunProcs(1)
    try:
        seen = proctree.read_stat(bystander.pid)
        assert seen is not None
        procs._send(bystander.pid, seen.start - 1, signal.SIGKILL)
        time.sleep(0.1)
        assert state(bystander.pid) in ("R", "S")
    finally:
        procs.close()
        bystander.kill()
        bystander.wait(5)


STRAYS = """
import json, os, subprocess, sys, time
from vesta import proctree

assert proctree.reap_strays() == 0          # not a subreaper: never reaps
assert proctree.become_subreaper()
nothing = proctree.adopted_children()
# A supervised child and a child of our own session (as subprocess.run makes) die; so does an orphan in a
# session of its own, which comes to us.
held = subprocess.Popen(["true"], start_new_session=True)
proctree.supervised.add(held.pid)
same = subprocess.Popen(["true"])
only_ours = proctree.adopted_children()
orphaner = subprocess.Popen(["sh", "-c", "sleep 0.2 & echo $!"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
orphan = int(orphaner.stdout.readline())
orphaner.wait()
time.sleep(1.0)
adopted = proctree.adopted_children()
def state(pid):
    st = proctree.read_stat(pid)
    return None if st is None else st.state
before = {"orphan": state(orphan), "held": state(held.pid), "same": state(same.pid)}
reaped = proctree.reap_strays()
after = {"orphan": state(orphan), "held": state(held.pid), "same": state(same.pid)}
print(json.dumps({"before": before, "reaped": reaped, "after": after,
                  "adopted": [nothing, only_ours, adopted, proctree.adopted_children()],
                  "held_code": held.wait(), "same_code": same.wait()}))
"""


def test_a_subreaper_reaps_adopted_orphans_but_not_children_someone_waits_for() -> None:
    out = subprocess.run([sys.executable, "-c", STRAYS], capture_output=True, text=True, timeout=30,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["before"] == {"orphan": "Z", "held": "Z", "same": "Z"}
    assert r["after"]["orphan"] is None
    assert r["after"]["held"] == "Z" and r["after"]["same"] == "Z"   # left to whoever waits for them
    assert r["held_code"] == 0 and r["same_code"] == 0
    assert r["reaped"] == 1
    # nothing; a supervised child and one of our own session only; the orphan (a zombie); reaped again
    assert r["adopted"] == [False, False, True, False]


STRAY_CHARGED = """
import asyncio, json, sys
from vesta import execrun, proctree, rundir

# B is orphaned at once (the subreaper adopts it), burns 1 s and dies while the run still sleeps: whoever
# reaps it first (here the end of another run) charges it to this run.
JOB = '''
import os, time
if os.fork() == 0:
    if os.fork() == 0:
        t = time.process_time()
        while time.process_time() - t < 1.0: pass
        os._exit(0)
    os._exit(0)
os.wait()
time.sleep(2.5)
'''

async def run(argv):
    work = rundir.make_workdir(None, "stray")
    env = rundir.scrubbed_env(job_id="j", node="n", workdir=work)
    try:
        return await execrun.run(argv, program=argv[0], cwd=work, env=env, timeout=20)
    finally:
        rundir.remove_workdir(work)

async def main():
    assert proctree.become_subreaper()
    other = asyncio.ensure_future(run(["/bin/sleep", "1.8"]))
    charged = await run([sys.executable, "-c", JOB])
    await other
    print(json.dumps({"cpu_s": charged.cpu_s}))

asyncio.run(main())
"""


def test_an_adopted_orphan_is_charged_to_its_run_whoever_reaps_it() -> None:
    out = subprocess.run([sys.executable, "-c", STRAY_CHARGED], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["cpu_s"] >= 0.8


def test_without_pidfds_or_file_descriptors_what_was_stopped_is_still_killed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pids = tmp_path / "pids"
    leave = (f"import os, time; os.setpgid(0, 0); open({str(pids)!r}, 'a').write(f'{{os.getpid()}} '); "
             "time.sleep(60)")
    leader = start_run(f"for i in 1 2 3; do {sys.executable} -c \"{leave}\" & done; exec sleep 60")
    procs = RunProcs(leader.pid)
    try:
        left = wait_pids(pids, 3)
        real_open = os.pidfd_open
        opened: list[int] = []

        def out_of_fds(pid: int, flags: int = 0) -> int:   # the first one works, then the table is full
            if opened:
                raise OSError(errno.EMFILE, "Too many open files")
            opened.append(pid)
            return real_open(pid, flags)

        monkeypatch.setattr(os, "pidfd_open", out_of_fds)
        procs.stop()
        procs.kill()
        monkeypatch.undo()
        assert leader.wait(5) == -signal.SIGKILL
        wait_states(left, (None, "Z"))
        assert all(state(pid) in (None, "Z") for pid in left)
    finally:
        finish(leader, procs)


def test_leftovers_of_a_dead_vestad_are_known_by_their_node_and_job_and_killed() -> None:
    node_id = f"{os.getpid():08x}" * 4

    def start(**env: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["sleep", "60"], env={"PATH": os.environ["PATH"], **env}, start_new_session=True)

    ours = start(VESTA_NODE="b", VESTA_NODE_ID=node_id, VESTA_JOB_ID="j1")
    other_node = start(VESTA_NODE="b", VESTA_NODE_ID=node_id[::-1], VESTA_JOB_ID="j1")   # another node named b
    no_job = start(VESTA_NODE="b", VESTA_NODE_ID=node_id)
    procs = [ours, other_node, no_job]
    try:
        time.sleep(0.2)   # exec'd, so /proc/PID/environ is theirs
        assert proctree.kill_leftovers("", {os.getuid()}) == 0
        assert proctree.kill_leftovers(node_id, {os.getuid() + 1}) == 0   # someone else's uid: not ours to kill
        assert proctree.kill_leftovers(node_id, {os.getuid()}) == 1
        assert ours.wait(5) == -signal.SIGKILL
        assert other_node.poll() is None and no_job.poll() is None
    finally:
        for p in procs:
            p.kill()
            p.wait(5)
