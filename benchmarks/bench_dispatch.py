"""Dispatch latency: submit-to-result of tiny jobs on a peer over loopback.

Target (jobs issue): "dispatch: submit-to-result of a 1-iteration cpu job on a peer over
loopback, from a client on the control socket, p50 <= 1.2 ms, p99 <= 5 ms over 1,000
sequential jobs; a remote `exec -- true` p50 <= 2 ms."

Two real daemons, a and b (b with -allow-exec), bound to 127.0.0.1 with 200 ms beacons. Once a
lists b, one persistent control-socket client on a runs 1,000 x ``cpu`` of one iteration forced
onto b (``on="b"``) and then 200 x ``exec -- true`` on b, timing each call (request written to
reply read) with perf_counter. The first calls open the peer link and are a warm-up, not counted.
Besides the client's view the table gives a's own ``elapsed_s`` (from offering the chunk to its
result), so the control socket's share can be told apart, and the CPU time each daemon spent per
job (the daemons are not "other processes": the note says how busy the rest of the machine was).
b must advertise a spare core before the runs start: a forced job that b refuses (start-up load)
would count as failed. b's exec sandbox is its default (``auto``: bubblewrap when installed, which
alone costs several ms per run); VESTA_BENCH_DISPATCH_SANDBOX=none|bwrap sets it, and the exec rows
name the one used.

Before the daemons start it measures the floor under all this, in the same run: the same hops with
no work in them (``relay.py``: a client, a unix-socket relay and a TCP echo, plain uvloop streams)
and a local ``subprocess.run(["true"])``. This VM's own speed drifts by 2-4x over an afternoon; the
floor rows say how fast the machine was while the dispatch rows were measured.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import LoadWatch, ProcessCpu, Report, busy_note, daemons, settle

from tests.helpers import eventually
from vesta.control import ControlClient, RemoteError

CPU_JOBS = int(os.environ.get("VESTA_BENCH_DISPATCH_JOBS", "1000"))
EXEC_JOBS = int(os.environ.get("VESTA_BENCH_DISPATCH_EXECS", "200"))
SANDBOX = os.environ.get("VESTA_BENCH_DISPATCH_SANDBOX", "auto")
WARMUP = 50
FLOOR_TRIPS = 2000              # trips through the plain relay (benchmarks/relay.py)
SPAWNS = 200                    # local subprocess.run(["true"]) for the exec floor
ONE_ITERATION = 0.000001        # millions: the daemon rounds it to exactly 1 iteration
CPU_P50_MS, CPU_P99_MS, EXEC_P50_MS = 1.2, 5.0, 2.0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank: a value that was really measured."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def run_jobs(client: ControlClient, n: int, op: str, **args: Any) -> tuple[list[float], list[float], list[str]]:
    """``n`` sequential calls; (client ms, daemon-side ms, errors)."""
    client_ms: list[float] = []
    daemon_ms: list[float] = []
    errors: list[str] = []
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            result = client.call(op, **args)
        except RemoteError as exc:
            errors.append(str(exc))
            continue
        client_ms.append((time.perf_counter() - t0) * 1000)
        daemon_ms.append(float(result["elapsed_s"]) * 1000)
        check(op, result)
    return client_ms, daemon_ms, errors


def check(op: str, result: dict[str, Any]) -> None:
    if op == "cpu":
        nodes = [p["node"] for p in result["parts"]]
        if nodes != ["b"] or result["iterations"] != 1:
            raise AssertionError(f"cpu job did not run 1 iteration on b: {nodes} {result['iterations']}")
    elif result["node"] != "b" or result["exit_code"] != 0:
        raise AssertionError(f"exec did not run `true` on b: node {result['node']}, exit {result['exit_code']}, "
                             f"{result.get('reason')}")


def describe(report: Report, label: str, client_ms: list[float], daemon_ms: list[float], errors: list[str],
             n: int, load: LoadWatch, cpu: ProcessCpu) -> None:
    busy = busy_note(cpu.others(load))
    if not client_ms:
        report.row(f"{label}: completed", 0, f"of {n}", errors[0] if errors else "")
        return
    for q in (50, 90, 99):
        report.row(f"{label}: p{q}", percentile(client_ms, q), "ms", "client: request to reply" + (busy if q == 50
                                                                                                   else ""))
    report.row(f"{label}: max", max(client_ms), "ms", "")
    report.row(f"{label}: a's elapsed_s p50", percentile(daemon_ms, 50), "ms",
               f"offer to result, inside a (p99 {percentile(daemon_ms, 99):.2f} ms)")
    per_job = ", ".join(f"{name} {used / len(client_ms) * 1000:.2f} ms" for name, used in cpu.used.items())
    report.row(f"{label}: daemon CPU per job", sum(cpu.used.values()) / len(client_ms) * 1000, "ms", per_job)
    if errors:
        report.row(f"{label}: failed", len(errors), f"of {n}", errors[0][:80])


def relay_trips(n: int) -> list[float]:
    """ms per trip through benchmarks/relay.py: client -> unix socket -> relay -> TCP loopback -> echo, and
    back, with no work on the way (the hops a dispatch takes, in the same kind of processes)."""
    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="vrelay") as tmp:
        port_file, sock_path = Path(tmp) / "port", str(Path(tmp) / "relay.sock")
        procs = [subprocess.Popen([sys.executable, str(here / "relay.py"), "echo", str(port_file)])]
        try:
            port = eventually(lambda: port_file.exists() and port_file.read_text(), 10, what="the echo to listen")
            procs.append(subprocess.Popen([sys.executable, str(here / "relay.py"), "relay", sock_path, port]))
            eventually(lambda: os.path.exists(sock_path), 10, what="the relay to listen")
            payload = bytes(120)   # about a control request's size
            frame = struct.pack(">I", len(payload)) + payload
            times: list[float] = []
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(10)
                client.connect(sock_path)
                for _ in range(n + WARMUP):
                    t0 = time.perf_counter()
                    client.sendall(frame)
                    got = b""
                    while len(got) < len(frame):
                        chunk = client.recv(len(frame) - len(got))
                        if not chunk:
                            raise AssertionError("the relay closed the connection")
                        got += chunk
                    times.append((time.perf_counter() - t0) * 1000)
            return times[WARMUP:]
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


def spawn_times(n: int) -> list[float]:
    """ms per local ``subprocess.run(["true"])`` in this process: the spawn alone."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(["true"], check=True)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def main() -> None:
    report = Report("dispatch", f"dispatch: tiny jobs on a peer over loopback ({os.cpu_count()} cores)")
    report.extra["busy_pct_before"] = settle()
    floor = relay_trips(FLOOR_TRIPS)
    spawn = spawn_times(SPAWNS)
    report.row(f"same hops, no work ×{FLOOR_TRIPS}: p50", percentile(floor, 50), "ms",
               f"plain relay (benchmarks/relay.py), p99 {percentile(floor, 99):.2f} ms")
    report.row(f"local subprocess.run(['true']) ×{SPAWNS}: p50", percentile(spawn, 50), "ms",
               "the spawn alone, in this process")
    report.extra["floor_ms"] = floor
    report.extra["spawn_ms"] = spawn
    with daemons() as cluster:
        base = cluster.base
        a = cluster.add("a", interval_ms=200)
        b_config = base / "b.json"
        b_config.write_text(json.dumps({"sandbox": SANDBOX}))
        b = cluster.add("b", interval_ms=200, args=["-allow-exec", "-config", str(b_config)])
        sandbox = "bubblewrap" if "bubblewrap:" in b.status()["isolation"] else "no sandbox"
        report.extra["exec_sandbox"] = sandbox
        eventually(lambda: "b" in a.peer_names(), 15, what="a to list b")
        eventually(lambda: next(p for p in a.peers() if p["name"] == "b")["spare_cores"] >= 0.5, 30,
                   what="b to settle after start-up and advertise a spare core")
        pids = {"a": a.pid, "b": b.pid}
        with a.client() as client:
            run_jobs(client, WARMUP, "cpu", millions=ONE_ITERATION, on="b")   # opens the peer link
            run_jobs(client, WARMUP // 5, "exec", argv=["true"], on="b")

            with LoadWatch() as load, ProcessCpu(pids) as cpu:
                cpu_ms, cpu_daemon, cpu_err = run_jobs(client, CPU_JOBS, "cpu", millions=ONE_ITERATION, on="b")
            describe(report, f"cpu 1 iteration on b ×{CPU_JOBS}", cpu_ms, cpu_daemon, cpu_err, CPU_JOBS, load,
                     cpu)
            with LoadWatch() as load, ProcessCpu(pids) as cpu:
                exec_ms, exec_daemon, exec_err = run_jobs(client, EXEC_JOBS, "exec", argv=["true"], on="b")
            describe(report, f"exec true on b ({sandbox}) ×{EXEC_JOBS}", exec_ms, exec_daemon, exec_err, EXEC_JOBS,
                     load, cpu)

        report.extra["cpu_ms"] = cpu_ms
        report.extra["cpu_daemon_ms"] = cpu_daemon
        report.extra["exec_ms"] = exec_ms
        report.extra["exec_daemon_ms"] = exec_daemon
        report.extra["errors"] = cpu_err + exec_err
        if cpu_ms:
            p50, p99 = percentile(cpu_ms, 50), percentile(cpu_ms, 99)
            report.target(f"cpu p50 ≤ {CPU_P50_MS:g} ms", p50 <= CPU_P50_MS and not cpu_err,
                          f"{p50:.2f} ms" + (f"; {len(cpu_err)} failed" if cpu_err else ""))
            report.target(f"cpu p99 ≤ {CPU_P99_MS:g} ms", p99 <= CPU_P99_MS and not cpu_err, f"{p99:.2f} ms")
        else:
            report.target(f"cpu p50 ≤ {CPU_P50_MS:g} ms", False, "no job completed: " + cpu_err[0][:60])
        if exec_ms:
            p50 = percentile(exec_ms, 50)
            report.target(f"exec p50 ≤ {EXEC_P50_MS:g} ms", p50 <= EXEC_P50_MS and not exec_err, f"{p50:.2f} ms")
        else:
            report.target(f"exec p50 ≤ {EXEC_P50_MS:g} ms", False, "no job completed: " + exec_err[0][:60])
    report.finish()


if __name__ == "__main__":
    sys.exit(main())
