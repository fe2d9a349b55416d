"""Many jobs through the Python API (batches issue): throughput over one pipelined connection.

Targets (batches issue): "10,000 one-iteration cpu jobs through one vesta.Client over two daemons:
>= 3,000 jobs/s with none lost"; "1,000 `exec -- true` through the API across two daemons with exec
on: report jobs/s with and without the sandbox, and the time from submit to the last result".

Two real daemons on loopback, a and b, both allowing exec (b's sandbox set per run: bubblewrap, then
none). One ``vesta.Client`` on a submits every job at once (``client.cpu`` / ``client.submit``); the
figure is jobs / (submit of the first to result of the last), and every job's record on a must say
succeeded exactly once. The floor of the same run: the plain relay of bench_dispatch (the hops with no
work), as jobs/s of one client sending request after request.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import wait

from bench_dispatch import percentile, relay_trips
from common import LoadWatch, ProcessCpu, Report, busy_note, daemons, settle

from tests.helpers import Vestad, eventually
from vesta.client import Client

CPU_JOBS = int(os.environ.get("VESTA_BENCH_API_CPU_JOBS", "10000"))
EXEC_JOBS = int(os.environ.get("VESTA_BENCH_API_EXEC_JOBS", "1000"))
ONE_ITERATION = 0.000001
CPU_TARGET = 3000.0   # jobs/s


def batch(client: Client, a: Vestad, n: int, submit: str) -> tuple[float, int, Counter[str], list[str]]:
    """Submit ``n`` jobs at once; (seconds to the last result, jobs lost, where they ran, errors)."""
    t0 = time.perf_counter()
    if submit == "cpu":
        jobs = [client.cpu(ONE_ITERATION) for _ in range(n)]
    else:
        jobs = [client.submit(["true"]) for _ in range(n)]
    done, pending = wait(jobs, timeout=600)
    elapsed = time.perf_counter() - t0
    errors = [str(j.exception()) for j in done if j.exception() is not None]
    results = [j.result() for j in done if j.exception() is None]
    ids = {r.job_id for r in results}
    states = Counter(r["state"] for r in a.call("jobs", limit=10_000) if r["id"] in ids)
    lost = n - states.get("succeeded", 0) - len(errors) + len(pending)
    return elapsed, lost, Counter(r.node for r in results), errors


def main() -> None:
    report = Report("api", f"the Python API: many jobs over one connection ({os.cpu_count()} cores)")
    report.extra["busy_pct_before"] = settle()
    floor = relay_trips(2000)
    report.row("same hops, no work: one request after another", 1000 / percentile(floor, 50), "trips/s",
               f"plain relay (benchmarks/relay.py), p50 {percentile(floor, 50):.3f} ms")
    for sandbox in ("auto", "none"):
        with daemons() as cluster:
            cfg = cluster.base / "exec.json"
            cfg.write_text(json.dumps({"allow_exec": True, "sandbox": sandbox}))
            a = cluster.add("a", interval_ms=200, args=["-config", str(cfg)])
            b = cluster.add("b", interval_ms=200, args=["-config", str(cfg)])
            eventually(lambda a=a: "b" in a.peer_names(), 15, what="a to list b")
            label = "bubblewrap" if "bubblewrap:" in b.status()["isolation"] else "no sandbox"
            with Client("a", a.runtime_dir) as client:
                # opens the peer link (b refuses while it sees its cores busy: other work on this machine)
                eventually(lambda: client.cpu(ONE_ITERATION, on="b").exception(timeout=30) is None, 60,
                           what="b to take a job")
                if sandbox == "auto":
                    with LoadWatch() as load, ProcessCpu({"a": a.pid, "b": b.pid}) as cpu:
                        took, lost, nodes, errors = batch(client, a, CPU_JOBS, "cpu")
                    rate = CPU_JOBS / took
                    report.row(f"cpu 1 iteration ×{CPU_JOBS}, all at once", rate, "jobs/s",
                               f"{took:.1f} s to the last result; "
                               + ", ".join(f"{n} on {k}" for k, n in nodes.most_common()) + busy_note(cpu.others(load)))
                    report.target(f"≥ {CPU_TARGET:,.0f} cpu jobs/s, none lost", rate >= CPU_TARGET and not lost
                                  and not errors, f"{rate:,.0f} jobs/s, {lost} lost, {len(errors)} failed"
                                  + (f" ({errors[0][:60]})" if errors else ""))
                took, lost, nodes, errors = batch(client, a, EXEC_JOBS, "exec")
                report.row(f"exec true ×{EXEC_JOBS} ({label})", EXEC_JOBS / took, "jobs/s",
                           f"{took:.1f} s from submit to the last result; "
                           + ", ".join(f"{n} on {k}" for k, n in nodes.most_common())
                           + (f"; {len(errors)} failed: {errors[0][:60]}" if errors else "")
                           + (f"; {lost} lost" if lost else ""))
    report.finish()


if __name__ == "__main__":
    sys.exit(main())
