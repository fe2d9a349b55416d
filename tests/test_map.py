"""`vesta map` over real daemons: GNU parallel's inputs and joblog, a sweep the daemon owns (it outlives its client
and a SIGKILL of the daemon), retries elsewhere, --halt, --results, --keep-order, exit codes, bad input."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pty
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import BIN, Cluster, Vestad, eventually, idle_proc, short_tmpdir, tool
from vesta import errors

pytestmark = pytest.mark.integration


@pytest.fixture
def pair(cluster: Cluster, tmp_path: Path) -> tuple[Vestad, Vestad]:
    """``a`` submits and runs commands; ``b`` (an idle machine, see tests/test_exec_jobs.py) runs them too. No
    sandbox: the jobs leave marks in a shared directory, which is how these tests count the runs."""
    return make_pair(cluster, tmp_path, "none")


def make_pair(cluster: Cluster, tmp_path: Path, sandbox: str) -> tuple[Vestad, Vestad]:
    cfg = tmp_path / "exec.json"
    cfg.write_text(f'{{"allow_exec": true, "sandbox": "{sandbox}"}}')
    a = cluster.add("a", args=["-config", str(cfg)])
    b = cluster.add("b", args=["-config", str(cfg), "-proc-root", str(idle_proc(tmp_path / "proc-b")),
                               "-label", "fast"])
    eventually(lambda: a.peer_names() == {"b"} and b.peer_names() == {"a"}, 5)
    return a, b


@pytest.fixture
def marks() -> Iterator[Path]:
    """A directory every job may write to (a root daemon runs jobs as nobody)."""
    path = short_tmpdir("vm")
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def sweep_ids(node: Vestad) -> list[str]:
    return [r["id"] for r in json.loads(node.vesta("jobs", "--json").stdout) if r["kind"] == "sweep"]


def read_parallel_joblog(path: Path) -> list[dict[str, str]]:
    """A joblog as a reader of GNU parallel's format reads it: tab-separated, a header naming the columns."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for r in rows:
        assert list(r) == ["Seq", "Host", "Starttime", "JobRuntime", "Send", "Receive", "Exitval", "Signal",
                           "Command"]
        int(r["Seq"]), float(r["Starttime"]), float(r["JobRuntime"]), int(r["Send"]), int(r["Receive"])
        int(r["Exitval"]), int(r["Signal"])
    return rows


def test_replacement_strings_products_and_input_files(pair: tuple[Vestad, Vestad], tmp_path: Path) -> None:
    a, _ = pair
    out = a.vesta("map", "-k", "--", "echo", "{#}:{}:{1}:{2}:{1.}:{1/}:{1//}:{1/.}", ":::", "d/f.tar.gz", "g",
                  ":::", "x", "y")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "1:d/f.tar.gz x:d/f.tar.gz:x:d/f.tar:f.tar.gz:d:f.tar",
        "2:d/f.tar.gz y:d/f.tar.gz:y:d/f.tar:f.tar.gz:d:f.tar",
        "3:g x:g:x:g:g:.:g",
        "4:g y:g:y:g:g:.:g"]
    # no replacement string: the inputs are appended; :::: reads a file, and - standard input
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("one\ntwo\n\nthree\n")
    out = a.vesta("map", "-k", "--", "echo", "got", "::::", str(inputs), ":::", "A", timeout=60)
    assert out.stdout.splitlines() == ["got one A", "got two A", "got three A"], out.stderr
    out = a.vesta("map", "-k", "--", "echo", "{}", "::::", "-", stdin="p\nq\n")
    assert out.stdout.splitlines() == ["p", "q"], out.stderr
    # {/} {.} of the whole input, as parallel's
    out = a.vesta("map", "--", "echo", "{/.}", "{.}", ":::", "/a/b.c")
    assert out.stdout == "b /a/b\n"


def test_bad_input_is_one_line_and_exit_2(pair: tuple[Vestad, Vestad], tmp_path: Path) -> None:
    a, _ = pair
    cases = [
        (("--", "echo", "hi"), "map needs inputs: end the command with ::: A B C"),
        (("--", "echo", "::::", str(tmp_path / "missing.txt")), f":::: {tmp_path}/missing.txt: cannot read it"),
        (("--", "echo", "{3}", ":::", "a", ":::", "b"), "replacement string {3} names input source 3, but there are "
                                                        "only 2 input sources"),
        (("--", "echo", ":::"), "input source 1 is empty"),
        (("--halt", "never", "--", "echo", ":::", "a"), "--halt 'never': use now,fail=N or soon,fail=N%"),
        (("--resume", "--", "echo", ":::", "a"), "--resume and --resume-failed read the joblog"),
        (("--put", str(tmp_path / "nope"), "--", "cat", ":::", "a"), "no such file"),
        (("--tiemout", "3", "--", "echo", ":::", "a"), "unknown flag '--tiemout'"),
    ]
    huge = tmp_path / "huge.txt"
    huge.write_text(("x" * 190 + "\n") * 90_000)
    cases.append((("--", "echo", "::::", str(huge)), "the inputs take 16.5 MiB, more than one request carries"))
    for args, message in cases:
        out = a.vesta("map", *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert message in one_line(out.stderr), (args, out.stderr)
        assert out.stdout == ""
    assert sweep_ids(a) == []   # nothing was submitted
    out = subprocess.run(tool("vesta") + ["-name", "nosuchnode", "map", "--", "echo", ":::", "a"], env=a.env,
                         capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert out.returncode == 3 and "not running" in one_line(out.stderr)


def test_exit_status_counts_failures_and_json(pair: tuple[Vestad, Vestad]) -> None:
    a, _ = pair
    out = a.vesta("map", "--", "sh", "-c", "echo {}; exit {}", ":::", "0", "3", "0", "1")
    assert out.returncode == 2, out.stderr
    assert sorted(out.stdout.split()) == ["0", "0", "1", "3"]
    assert "2 succeeded, 2 failed" in out.stderr
    out = a.vesta("map", "--json", "--", "sh", "-c", "echo {}; exit {}", ":::", "0", "4")
    assert out.returncode == 1
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    jobs = sorted((x for x in lines if "seq" in x), key=lambda x: x["seq"])
    assert [(j["seq"], j["exit_code"], j["stdout"], j["outcome"]) for j in jobs] == [
        (1, 0, "0\n", "succeeded"), (2, 4, "4\n", "failed, exit 4")]
    assert all(j["node"] in ("a", "b") and j["job_id"].startswith("j") for j in jobs)
    assert lines[-1]["sweep"]["state"] == "failed" and lines[-1]["sweep"]["exit_code"] == 1
    # one line per sweep in vesta jobs, with its counts; vesta show lists its jobs
    rows = [r for r in json.loads(a.vesta("jobs", "--json").stdout)]
    assert [r["kind"] for r in rows] == ["sweep", "sweep"]
    assert rows[0]["counts"]["succeeded"] == 1 and rows[0]["counts"]["failed"] == 1
    listing = a.vesta("jobs").stdout
    assert "map sh -c echo {}; exit {}: 2 jobs (1 succeeded, 1 failed)" in listing
    shown = a.vesta("show", rows[0]["id"])
    assert shown.returncode == 0 and "failed, exit 4" in shown.stdout and "sh -c echo 4; exit 4" in shown.stdout


def test_joblog_resume_and_resume_failed(pair: tuple[Vestad, Vestad], marks: Path, tmp_path: Path) -> None:
    a, _ = pair
    joblog = tmp_path / "jobs.log"
    cmd = ("--", "sh", "-c", f"echo {{}} >> {marks}/runs; test -e {marks}/ok-{{}}", ":::", *map(str, range(1, 7)))
    for i in (1, 2, 4):
        (marks / f"ok-{i}").touch()
    out = a.vesta("map", "--joblog", str(joblog), *cmd)
    assert out.returncode == 3, out.stderr
    rows = read_parallel_joblog(joblog)
    assert sorted(int(r["Seq"]) for r in rows) == [1, 2, 3, 4, 5, 6]
    assert {r["Seq"]: r["Exitval"] for r in rows} == {"1": "0", "2": "0", "3": "1", "4": "0", "5": "1", "6": "1"}
    assert {r["Host"] for r in rows} <= {"a", "b"}
    assert rows[0]["Command"].startswith("sh -c echo ")
    # a sweep cut short: its joblog lost the lines of jobs 5 and 6; --resume runs just those, nothing twice
    joblog.write_text("".join(line for line in joblog.read_text().splitlines(keepends=True)
                              if line.split("\t")[0] not in ("5", "6")))
    (marks / "runs").write_text("")
    out = a.vesta("map", "--joblog", str(joblog), "--resume", *cmd)
    assert out.returncode == 2, out.stderr
    assert sorted((marks / "runs").read_text().split()) == ["5", "6"]
    # --resume with nothing left runs nothing
    (marks / "runs").write_text("")
    out = a.vesta("map", "--joblog", str(joblog), "--resume", *cmd)
    assert out.returncode == 0 and (marks / "runs").read_text() == ""
    # --resume-failed runs exactly the failed ones again, and they succeed now
    for i in (3, 5):
        (marks / f"ok-{i}").touch()
    out = a.vesta("map", "--joblog", str(joblog), "--resume-failed", *cmd)
    assert sorted((marks / "runs").read_text().split()) == ["3", "5", "6"]
    assert out.returncode == 1   # 6 still fails
    rows = read_parallel_joblog(joblog)
    last = {r["Seq"]: r["Exitval"] for r in rows}
    assert last == {"1": "0", "2": "0", "3": "0", "4": "0", "5": "0", "6": "1"}


def test_results_layout_and_put_each(pair: tuple[Vestad, Vestad], tmp_path: Path) -> None:
    a, _ = pair
    data = tmp_path / "data"
    data.mkdir()
    for name, text in (("x.txt", "one two\n"), ("y.txt", "three\n")):
        (data / name).write_text(text)
    results = tmp_path / "res"
    out = a.vesta("map", "--put-each", "{}", "--results", str(results), "--", "sh", "-c",
                  "wc -w < {/}; cp {/} $VESTA_OUTPUT/copy-{/}; echo err >&2; exit {#}",
                  ":::", str(data / "x.txt"), str(data / "y.txt"))
    assert out.returncode == 2, out.stderr
    for seq, words, name in ((1, "2", "x.txt"), (2, "1", "y.txt")):
        d = results / str(seq)
        assert sorted(p.name for p in d.iterdir()) == ["artifacts", "exit", "node", "stderr", "stdout"]
        assert (d / "stdout").read_text().strip() == words
        assert (d / "stderr").read_text() == "err\n"
        assert (d / "exit").read_text() == f"{seq}\n"
        assert (d / "node").read_text().strip() in ("a", "b")
        assert (d / "artifacts" / f"copy-{name}").read_bytes() == (data / name).read_bytes()


def test_keep_order_prints_in_input_order(pair: tuple[Vestad, Vestad], tmp_path: Path) -> None:
    a, _ = pair
    joblog = tmp_path / "log"
    out = a.vesta("map", "-k", "-j", "3", "--joblog", str(joblog), "--", "sh", "-c", "sleep {}; echo {}",
                  ":::", "1.5", "0.7", "0", timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1.5", "0.7", "0"]
    rows = read_parallel_joblog(joblog)
    ended = [r["Seq"] for r in sorted(rows, key=lambda r: float(r["Starttime"]) + float(r["JobRuntime"]))]
    assert ended != ["1", "2", "3"], "the jobs ended in input order: this test shows nothing"
    out = a.vesta("map", "-j", "3", "--", "sh", "-c", "sleep {}; echo {}", ":::", "1.5", "0.7", "0", timeout=60)
    assert out.stdout.split() != ["1.5", "0.7", "0"]   # without -k: as they end


def test_halt_now_stops_the_sweep(pair: tuple[Vestad, Vestad], marks: Path) -> None:
    a, _ = pair
    t0 = time.monotonic()
    out = a.vesta("map", "-j", "2", "--halt", "now,fail=1", "--", "sh", "-c",
                  f"echo {{}} >> {marks}/runs; [ {{}} = bad ] && exit 7; sleep 20",
                  ":::", "bad", "s1", "s2", "s3", "s4", "s5", timeout=60)
    assert time.monotonic() - t0 < 15, "--halt now waited for the running jobs"
    assert out.returncode >= 1
    assert "halted: 1 job failed (--halt now,fail=1)" in out.stderr
    ran = (marks / "runs").read_text().split()
    assert "bad" in ran and len(ran) < 6
    sweep = json.loads(a.vesta("show", sweep_ids(a)[0], "--json").stdout)
    assert sweep["state"] == "failed" and sweep["reason"].startswith("halted")
    assert {j["outcome"] for j in sweep["jobs"]} <= {"failed, exit 7", "cancelled"}
    # soon: the running jobs end as they would; no new one starts
    (marks / "runs").write_text("")
    out = a.vesta("map", "-j", "2", "--halt", "soon,fail=50%", "--", "sh", "-c",
                  f"echo {{}} >> {marks}/runs; [ {{}} = bad ] && exit 7; sleep 1; echo slept {{}}",
                  ":::", "bad", "s1", "s2", "s3", timeout=60)
    assert "halted: 1 job failed (--halt soon,fail=50%)" not in out.stderr   # 1 of 4 is not half
    assert out.returncode == 1 and out.stdout.count("slept") == 3
    (marks / "runs").write_text("")
    out = a.vesta("map", "-j", "2", "--halt", "soon,fail=1", "--", "sh", "-c",
                  f"echo {{}} >> {marks}/runs; [ {{}} = bad ] && exit 7; sleep 1; echo slept {{}}",
                  ":::", "bad", "s1", "s2", "s3", timeout=60)
    assert "halted: 1 job failed (--halt soon,fail=1)" in out.stderr
    ran = (marks / "runs").read_text().split()
    assert "bad" in ran and len(ran) < 4
    assert out.stdout.count("slept") == len(ran) - 1   # what was running when it halted ran to its end
    assert out.returncode == 4 - out.stdout.count("slept")   # the failed one, and those never run


def test_a_retry_lands_on_another_node(pair: tuple[Vestad, Vestad], marks: Path) -> None:
    a, _ = pair
    # each job fails on the node it first runs on (it leaves a mark there) and succeeds anywhere else
    script = f"m={marks}/{{}}; if [ -e $m ]; then [ $(cat $m) != $VESTA_NODE ]; else echo $VESTA_NODE > $m; exit 1; fi"
    out = a.vesta("map", "--retries", "1", "--", "sh", "-c", script, ":::", "1", "2", "3", timeout=60)
    assert out.returncode == 0, out.stderr
    sweep = json.loads(a.vesta("show", sweep_ids(a)[0], "--json").stdout)
    by_seq: dict[int, list[dict[str, object]]] = {}
    for j in sweep["jobs"]:
        by_seq.setdefault(int(j["sweep_seq"]), []).append(j)
    for seq, jobs in by_seq.items():
        assert [j["outcome"] for j in jobs] == ["failed, exit 1", "succeeded"], (seq, jobs)
        assert jobs[0]["node"] != jobs[1]["node"], f"job {seq} was retried on the node it failed on"
    # without --retries a failure is final
    out = a.vesta("map", "--", "false", ":::", "x")
    assert out.returncode == 1
    # --timeout holds for every job
    out = a.vesta("map", "--timeout", "1", "--json", "--", "sleep", ":::", "0", "30", timeout=60)
    jobs = sorted((json.loads(line) for line in out.stdout.splitlines()[:-1]), key=lambda j: j["seq"])
    assert out.returncode == 1 and [j["outcome"] for j in jobs] == ["succeeded", "timed out"], out.stdout


def test_the_sweep_outlives_its_client_and_vesta_wait_reattaches(pair: tuple[Vestad, Vestad], marks: Path) -> None:
    a, _ = pair
    proc = subprocess.Popen(tool("vesta") + ["-name", "a", "map", "-j", "2", "--", "sh", "-c",
                                             f"sleep 0.4; echo {{}} >> {marks}/runs; echo out-{{}}",
                                             ":::", *map(str, range(1, 11))],
                            env=a.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        eventually(lambda: (marks / "runs").exists() and len((marks / "runs").read_text().split()) >= 2, 20)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert len((marks / "runs").read_text().split()) < 10
    (sweep_id,) = sweep_ids(a)
    out = a.vesta("wait", sweep_id, timeout=60)
    assert out.returncode == 0, out.stderr
    assert sorted(map(int, (marks / "runs").read_text().split())) == list(range(1, 11))   # each once
    assert set(out.stdout.split()) <= {f"out-{i}" for i in range(1, 11)} and out.stdout   # what ended since
    assert json.loads(a.vesta("show", sweep_id, "--json").stdout)["counts"]["succeeded"] == 10
    # --detach returns at once; cancel stops the rest; wait then says so
    out = a.vesta("map", "--detach", "-j", "1", "--", "sleep", "5", ":::", "1", "2", "3")
    sweep_id = out.stdout.strip()
    assert out.returncode == 0 and sweep_id.startswith("s") and sweep_id in sweep_ids(a)
    t0 = time.monotonic()
    out = a.vesta("wait", sweep_id, "--timeout", "1")
    assert out.returncode == 124 and time.monotonic() - t0 < 4.5, out.stderr
    assert one_line(out.stderr) == f"vesta: sweep {sweep_id} still running after 1s"
    assert a.vesta("cancel", sweep_id).stdout.strip() == f"cancelled {sweep_id}"
    out = a.vesta("wait", sweep_id, timeout=30)
    assert out.returncode == 3, out.stderr   # one cancelled, two never ran
    assert json.loads(a.vesta("show", sweep_id, "--json").stdout)["state"] == "cancelled"


def test_a_daemon_killed_mid_sweep_resumes_it(pair: tuple[Vestad, Vestad], marks: Path, tmp_path: Path) -> None:
    a, _ = pair
    joblog = tmp_path / "log"
    out = a.vesta("map", "--detach", "-j", "2", "--joblog", str(joblog), "--", "sh", "-c",
                  f"echo {{}} >> {marks}/runs; sleep 0.5", ":::", *map(str, range(1, 9)))
    sweep_id = out.stdout.strip()
    eventually(lambda: len(read_parallel_joblog(joblog)) >= 2, 30, what="two jobs done")
    a.kill()
    a.start()
    out = a.vesta("wait", sweep_id, timeout=90)
    assert out.returncode == 0, out.stderr + a.log()[-3000:]
    rows = read_parallel_joblog(joblog)
    assert sorted(int(r["Seq"]) for r in rows) == list(range(1, 9)), "a job was reported twice, or never"
    sweep = json.loads(a.vesta("show", sweep_id, "--json").stdout)
    assert sweep["state"] == "succeeded" and sweep["counts"] == {"succeeded": 8, "failed": 0, "cancelled": 0,
                                                                  "running": 0, "queued": 0}
    per_seq = Counter(int(j["sweep_seq"]) for j in sweep["jobs"])
    interrupted = [j for j in sweep["jobs"] if j["reason"] == "daemon restarted"]
    assert interrupted, "no job was running when the daemon was killed: this test shows nothing"
    for j in interrupted:   # what ran when it died ran again, and the records keep both
        assert per_seq[int(j["sweep_seq"])] == 2
    assert sum(1 for j in sweep["jobs"] if j["reported"]) == 8
    assert set(map(int, (marks / "runs").read_text().split())) == set(range(1, 9))


def test_a_shared_put_crosses_the_network_once_per_node(pair: tuple[Vestad, Vestad], tmp_path: Path) -> None:
    a, b = pair
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    digest = subprocess.run(["sha256sum", str(big)], capture_output=True, text=True, check=True).stdout.split()[0]
    out = a.vesta("map", "--json", "--put", str(big), "--", "sh", "-c", "sha256sum big.bin; echo {} >> big.bin",
                  ":::", *map(str, range(12)), timeout=120)
    assert out.returncode == 0, out.stderr
    jobs = [json.loads(line) for line in out.stdout.splitlines() if '"seq"' in line]
    assert len(jobs) == 12 and {j["stdout"].split()[0] for j in jobs} == {digest}   # a job's writes never leak
    on_b = sum(1 for j in jobs if j["node"] == "b")
    assert on_b >= 2, f"only {on_b} jobs ran on b: this test shows nothing"
    counters = b.status()["counters"]
    assert counters["input_bytes_received"] == 3 << 20, counters   # once, not once per job
    assert counters["input_cache_hits"] == on_b - 1
    # a new sweep is a new share: the file crosses again, once
    out = a.vesta("map", "--put", str(big), "--on", "b", "--", "sh", "-c", "sha256sum big.bin", ":::", "1", "2", "3",
                  timeout=60)
    assert out.returncode == 0 and set(out.stdout.split()) == {digest, "big.bin"}
    assert b.status()["counters"]["input_bytes_received"] == 2 * (3 << 20)


def readme_sweeps() -> list[list[str]]:
    """The commands of the README's "Sweeps" examples, block by block."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("### Sweeps"):text.index("### From Python")]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [[line[2:] for line in block.splitlines() if line.startswith("$ ")] for block in blocks]


def test_the_readme_sweep_examples_run_as_written(cluster: Cluster, tmp_path: Path) -> None:
    a, _ = make_pair(cluster, tmp_path, "auto")   # as a new user's nodes run them (piwork from this venv)
    blocks = readme_sweeps()
    assert len(blocks) == 3 and all(blocks)
    env = a.env | {"PATH": f"{BIN}:{os.environ['PATH']}", "VESTA_NAME": "a"}
    outputs = []
    for commands in blocks:
        out = subprocess.run(["bash", "-e", "-c", "\n".join(commands)], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and "Traceback" not in out.stderr, (commands, out.stdout, out.stderr)
        outputs.append(out.stdout)
    assert [line.split()[0] for line in outputs[0].splitlines()[:3]] == ["pi", "pi", "pi"]
    assert "map piwork 2 --seed {}: 3 jobs (3 succeeded)" in outputs[0]
    assert outputs[1].splitlines()[:3] == ["1000 part-1.txt", "2000 part-2.txt", "3000 part-3.txt"]
    assert {"exit", "node", "stderr", "stdout", "2000 part-2.txt"} <= set(outputs[1].splitlines())
    log = read_parallel_joblog(tmp_path / "sweep.log")
    last = {int(r["Seq"]): r["Exitval"] for r in log}
    assert last == dict.fromkeys(range(1, 7), "0"), log   # every job done in the end, after the resume
    assert any(r["Exitval"] != "0" for r in log), "the cancel stopped nothing: this example shows nothing"


def test_need_places_every_job_where_the_labels_are(pair: tuple[Vestad, Vestad]) -> None:
    a, _ = pair
    eventually(lambda: "fast" in next(p for p in a.peers() if p["name"] == "b")["labels"], 5)
    out = a.vesta("map", "--need", "fast", "--", "sh", "-c", "echo $VESTA_NODE", ":::", "1", "2", "3", "4")
    assert out.returncode == 0 and out.stdout.split() == ["b"] * 4, out.stderr
    out = a.vesta("map", "--need", "fast,nosuch", "--", "true", ":::", "1")
    assert out.returncode == 1
    assert "no node has fast, nosuch (a: " in one_line(out.stderr)
    out = a.vesta("map", "--on", "nosuch", "--", "true", ":::", "1")
    assert out.returncode == 1 and "no node named 'nosuch' (known: a, b)" in one_line(out.stderr)


def test_the_progress_bar_is_for_a_terminal_only(pair: tuple[Vestad, Vestad]) -> None:
    a, _ = pair
    args = tool("vesta") + ["-name", "a", "map", "-j", "2", "--", "sh", "-c", "sleep 0.3; echo {}", ":::",
                            *map(str, range(6))]
    main, side = pty.openpty()
    try:
        proc = subprocess.Popen(args, env=a.env | {"COLUMNS": "150"}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=side)
        os.close(side)
        seen = b""
        with contextlib.suppress(OSError):   # EIO once the process has closed its end
            while chunk := os.read(main, 4096):
                seen += chunk
        stdout, _ = proc.communicate(timeout=60)
    finally:
        os.close(main)
    assert proc.returncode == 0
    assert sorted(stdout.decode().split()) == [str(i) for i in range(6)]   # the output itself stays plain
    text = seen.decode(errors="replace")
    assert "failed 0" in text and "running" in text and "6/6" in text, text
    assert "succeeded, 0 failed; ran on" in text   # the last line, for a person
    piped = a.vesta("map", "--", "echo", ":::", "x")
    assert piped.stderr == "" and piped.stdout == "x\n"   # nothing of it in a pipe


def test_a_bad_sweep_on_the_control_socket_is_refused_by_name(pair: tuple[Vestad, Vestad]) -> None:
    a, _ = pair
    bad = [
        ({"spec": "x"}, errors.InvalidJob, "a sweep must be a map"),
        ({"spec": {"template": ["echo"], "sources": "abc"}}, errors.InvalidJob, "sources must be a list"),
        ({"spec": {"template": ["echo"], "sources": [["a"]], "puts": ["relative"]}}, errors.InvalidJob, "absolute"),
        ({"spec": {"template": ["echo"], "sources": [["a"]], "seqs": [0]}}, errors.InvalidJob, "job numbers"),
        ({"spec": {"template": ["echo", "{2}"], "sources": [["a"]]}}, errors.InvalidJob, "input source 2"),
        ({"spec": {"template": ["cat"], "sources": [["a"]], "puts": ["/nonexistent/x"]}}, errors.InputError,
         "/nonexistent/x"),
    ]
    for args, cls, message in bad:
        with pytest.raises(cls, match=re.escape(message)):
            a.call("map", **args)
    with pytest.raises(errors.NotFound, match="no sweep 'snotasweep1'"):
        a.call("sweep", sweep_id="snotasweep1")
    with pytest.raises(errors.NotFound):
        a.call("cancel", job_id="snotasweep1")
    assert a.status()["name"] == "a" and sweep_ids(a) == []   # still up, nothing submitted
