"""The Python API over real daemons: a pipelined connection, typed errors, many jobs at once, the Executor, and
the README's "From Python" examples, run as written."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import msgpack
import pytest

import vesta
from tests.helpers import BIN, Cluster, Vestad, eventually, idle_proc
from vesta import errors
from vesta.client import AsyncClient, Client, Executor, JobResult, command_for

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parent.parent / "README.md"


def exec_pair(cluster: Cluster, tmp_path: Path, sandbox: str = "none") -> tuple[Vestad, Vestad]:
    """``a`` submits; ``b`` (an idle machine, see tests/test_exec_jobs.py) runs commands (without a sandbox unless
    asked: quicker)."""
    a = cluster.add("a", args=["-allow-exec"])
    cfg = tmp_path / "b.json"
    cfg.write_text(f'{{"allow_exec": true, "sandbox": "{sandbox}"}}')
    b = cluster.add("b", args=["-config", str(cfg), "-proc-root", str(idle_proc(tmp_path / "proc-b"))])
    eventually(lambda: a.peer_names() == {"b"} and b.peer_names() == {"a"}, 5)
    return a, b


def client_of(node: Vestad) -> Client:
    return Client(node.name, node.runtime_dir)


def test_requests_with_ids_are_answered_out_of_order_on_one_connection(cluster: Cluster) -> None:
    """A slow request does not hold up a quick one behind it; events and answers carry their request's id."""
    a = cluster.add("a")
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(a.runtime_dir / "vestad-a.sock"))
    sock.settimeout(20)
    frame = struct.Struct(">I")

    def send(body: dict[str, object]) -> None:
        data = msgpack.packb(body)
        sock.sendall(frame.pack(len(data)) + data)

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            piece = sock.recv(n - len(data))
            assert piece, "vestad closed the connection"
            data += piece
        return data

    def recv() -> dict[str, object]:
        (size,) = frame.unpack(exactly(4))
        return msgpack.unpackb(exactly(size), raw=False)

    send({"op": "mem", "args": {"mib": 1, "ms": 1500}, "id": 1})
    send({"op": "status", "args": {}, "id": 2})
    send({"op": "explode", "args": {}, "id": 3})
    send({"op": "status", "args": {}, "id": "x"})
    answers: list[dict[str, object]] = []
    while len(answers) < 4:
        msg = recv()
        if "event" in msg:
            assert msg["id"] == 1       # only the mem job streams events
            continue
        answers.append(msg)
    assert [m["id"] for m in answers][-1] == 1                 # the slow one answers last
    by_id = {m["id"]: m for m in answers}
    assert by_id[2]["ok"] and by_id[2]["result"]["name"] == "a"          # type: ignore[index]
    assert not by_id[3]["ok"] and by_id[3]["type"] == "ConfigError"
    assert not by_id["x"]["ok"] and "request id must be a whole number" in str(by_id["x"]["error"])
    send({"op": "exec", "args": {"argv": ["true"], "puts": ["/tmp/a\x00b"]}, "id": 4})   # bad input: answered
    bad = recv()
    assert (bad["id"], bad["ok"], bad["type"]) == (4, False, "InvalidJob")
    send({"op": "status", "args": {}})                         # a one-at-a-time request still works
    assert recv()["ok"] is True
    sock.close()


def test_a_command_through_the_client_comes_back_whole(cluster: Cluster, tmp_path: Path) -> None:
    a, _ = exec_pair(cluster, tmp_path)
    with client_of(a) as client:
        job = client.submit(["sh", "-c", "echo out; echo err >&2; mkdir -p $VESTA_OUTPUT; "
                                         "echo kept > $VESTA_OUTPUT/r.txt; exit 3"], on="b")
        result = job.result(timeout=30)
        assert isinstance(result, JobResult) and job.job_id == result.job_id
        assert (result.node, result.exit_code, result.stdout, result.stderr) == ("b", 3, b"out\n", b"err\n")
        assert not result.ok and result.run_s > 0
        with pytest.raises(errors.JobFailed, match="exit 3"):
            result.check()
        [artifact] = result.artifacts
        copied = artifact.fetch(tmp_path)
        assert copied.read_text() == "kept\n"
        with pytest.raises(errors.VestaError, match="exists"):
            artifact.fetch(tmp_path)
        cpu = client.cpu(0.5).result(timeout=30)
        assert cpu.kind == "cpu" and cpu.ok and cpu.raw["digest"]
        record = client.call("show", job_id=result.job_id)
        assert record["state"] == "failed" and record["exit_code"] == 3


def test_the_api_raises_the_classes_of_vesta_errors(cluster: Cluster, tmp_path: Path, runtime_dir: Path) -> None:
    with pytest.raises(errors.DaemonNotRunning):
        Client("nobody", runtime_dir)
    a, _ = exec_pair(cluster, tmp_path)
    with client_of(a) as client:
        with pytest.raises(errors.InvalidJob, match="exec needs a command"):
            client.submit([])
        with pytest.raises(errors.InvalidJob, match="--timeout must be a positive number"):
            client.submit(["true"], timeout=-1)
        with pytest.raises(errors.InvalidJob, match="no such file"):
            client.submit(["true"], put=[tmp_path / "missing"])
        with pytest.raises(errors.JobFailed, match="no node named 'nowhere'"):
            client.submit(["true"], on="nowhere", queue=False).result(timeout=30)
        with pytest.raises(errors.NotFound, match="no job 'jnothere'"):
            client.call("show", job_id="jnothere")


def test_a_thousand_jobs_at_once_all_complete_once(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.add("a")
    b = cluster.add("b", args=["-proc-root", str(idle_proc(tmp_path / "proc-b"))])
    eventually(lambda: a.peer_names() == {"b"}, 5)
    with client_of(a) as client:
        jobs = [client.cpu(0.000001) for _ in range(1000)]
        done, pending = concurrent.futures.wait(jobs, timeout=120)
        assert not pending
        results = [j.result() for j in jobs]
    ids = [r.job_id for r in results]
    assert len(set(ids)) == 1000
    records = a.call("jobs", limit=2000)
    assert Counter(r["state"] for r in records if r["id"] in set(ids)) == {"succeeded": 1000}
    on_b = sum(1 for r in results if r.node == "b")
    hosted = [r for r in b.call("jobs", hosted=True, limit=2000) if r["job_id"] in set(ids)]
    assert len(hosted) == on_b and {h["state"] for h in hosted} <= {"succeeded"}
    assert len({h["job_id"] for h in hosted}) == on_b          # no job ran twice there


def test_the_executor_keeps_the_futures_promises(cluster: Cluster, tmp_path: Path) -> None:
    a, _ = exec_pair(cluster, tmp_path)
    with Executor(a.name, directory=a.runtime_dir) as pool:
        delays = ["0.6", "0.1", "0.3"]
        results = list(pool.map("sh", ["-c"] * 3, [f"sleep {d}; echo {d}" for d in delays]))
        assert [r.stdout.decode().strip() for r in results] == delays     # in input order, not finish order
        with pytest.raises(errors.JobFailed, match="exit 5"):
            pool.submit("sh", "-c", "exit 5").result(timeout=30)
        slow = pool.submit("sleep", "60")
        eventually(lambda: slow.job_id is not None and a.call("show", job_id=slow.job_id)["state"] == "running", 15)
        assert slow.cancel() and slow.cancelled()
        eventually(lambda: a.call("show", job_id=slow.job_id)["state"] == "cancelled", 15)
        stall = threading.Event()   # the client's loop is busy: the next job is not sent before its cancel
        pool._client._loop.call_soon_threadsafe(stall.wait, 10)
        at_once = pool.submit("sleep", "30")
        assert at_once.cancel()
        stall.set()
        done, _ = concurrent.futures.wait([at_once], timeout=5)   # a cancelled job is done for those waiting
        assert at_once in done
        time.sleep(0.5)
        assert at_once.job_id is None   # never sent: the daemon has no such job
        assert not [j for j in a.call("jobs", limit=50) if j["args"].get("argv") == ["sleep", "30"]]
        last = pool.submit("sh", "-c", "sleep 0.5; echo late")
        pool.shutdown(wait=True)
        assert last.done() and last.result().stdout == b"late\n"
        with pytest.raises(RuntimeError, match="after shutdown"):
            pool.submit("true")
    pool = Executor(a.name, directory=a.runtime_dir)
    going = pool.submit("sh", "-c", "sleep 0.5; echo still")
    pool.shutdown(wait=False)                  # the jobs go on; the connection closes after the last
    assert going.result(timeout=30).stdout == b"still\n"


def test_errors_from_the_daemon_survive_pickling() -> None:
    """A future's exception may cross a process boundary (a ProcessPool, multiprocessing)."""
    import pickle
    again = pickle.loads(pickle.dumps(errors.remote("JobFailed")("no node could run it")))
    assert isinstance(again, errors.JobFailed) and isinstance(again, errors.RemoteError)
    assert str(again) == "no node could run it"


def test_cancel_from_a_done_callback_does_not_stall_the_client(cluster: Cluster, tmp_path: Path) -> None:
    """The usual "first one wins" pattern: the loser's cancel is sent without waiting on the client's own loop."""
    a, _ = exec_pair(cluster, tmp_path)
    with client_of(a) as client:
        quick = client.submit(["true"])
        slow = client.submit(["sleep", "30"])
        t0 = time.monotonic()
        quick.add_done_callback(lambda _: slow.cancel())
        quick.result(timeout=30)
        eventually(lambda: slow.cancelled(), 5)
        assert time.monotonic() - t0 < 4
        eventually(lambda: slow.job_id is not None and a.call("show", job_id=slow.job_id)["state"] == "cancelled",
                   15)
        with pytest.raises(RuntimeError, match="done callbacks"):
            fails: list[BaseException] = []
            done = threading.Event()

            def blocking(_: object) -> None:
                try:
                    client.call("status")
                except RuntimeError as exc:
                    fails.append(exc)
                done.set()

            client.submit(["true"]).add_done_callback(blocking)
            assert done.wait(30)
            raise fails[0]


def test_a_job_cancelled_before_the_daemon_names_it_is_cancelled_there(cluster: Cluster, tmp_path: Path) -> None:
    """The request is on its way when the cancel comes: the daemon is told as soon as it names the job."""
    a, _ = exec_pair(cluster, tmp_path)

    async def run() -> str | None:
        async with await AsyncClient.connect(a.name, a.runtime_dir) as client:
            job = client.submit(["sleep", "30"])
            assert await job.cancel()   # before any answer could have come
            for _ in range(150):
                if job.job_id is not None:
                    break
                await asyncio.sleep(0.1)
            return job.job_id

    job_id = asyncio.run(run())
    assert job_id is not None
    eventually(lambda: a.call("show", job_id=job_id)["state"] == "cancelled", 15)


def test_async_client_and_map_templates(cluster: Cluster, tmp_path: Path) -> None:
    a, _ = exec_pair(cluster, tmp_path)
    assert command_for(["echo", "{}-x"], 3) == ["echo", "3-x"]
    assert command_for("echo", "y") == ["echo", "y"]
    assert command_for(lambda i: ["seq", i], 2) == ["seq", "2"]

    async def run() -> list[str]:
        async with await AsyncClient.connect(a.name, a.runtime_dir) as client:
            jobs = client.map(["echo", "{}"], range(6))
            seen = [job async for job in client.as_completed(jobs)]
            assert len(seen) == 6
            return [(await job).stdout.decode().strip() for job in jobs]

    assert asyncio.run(run()) == [str(i) for i in range(6)]


def readme_examples() -> list[str]:
    text = README.read_text()
    section = text[text.index("### From Python"):text.index("### vestatop")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_examples_run_as_written(cluster: Cluster, tmp_path: Path) -> None:
    examples = readme_examples()
    assert len(examples) == 3
    a, _ = exec_pair(cluster, tmp_path, sandbox="auto")   # as a new user's node runs them (piwork from this venv)
    env = a.env | {"PATH": f"{BIN}:{os.environ['PATH']}", "VESTA_NAME": "a"}
    for code in examples:
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{code}\n{out.stderr}"
        assert out.stdout.strip() and "Traceback" not in out.stderr, out
        assert time.monotonic() - t0 < 100
    assert vesta.Client is Client
