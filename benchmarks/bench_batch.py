"""Batch efficiency: 16 x `cpu 20 --no-split` submitted at once to two one-core daemons.

Target (issue 15): makespan <= 1.15 x (16 x one job's time / 2). Before placement counted work in
flight (slots held from placement to the chunk's end, this node's included), 15 of the 16 ran on the
submitting node and the batch took 1.95 x.

a is pinned to cpu 0 and b to cpu 1 (taskset), both lending their whole core. One job's time is the
best of three runs of the same job alone (on a, through one control client); then 16 client threads
submit at once through a's control socket. VESTA_BENCH_QUICK=1 runs 8 jobs instead of 16.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from collections import Counter
from typing import Any

from common import LoadWatch, ProcessCpu, Report, busy_note, daemons, settle

from tests.helpers import Vestad, eventually

QUICK = os.environ.get("VESTA_BENCH_QUICK", "") not in ("", "0")
JOBS = 8 if QUICK else 16
MILLIONS = 20
TARGET = 1.15
JOB_TIMEOUT = 300.0


def wait_idle(a: Vestad) -> None:
    eventually(lambda: a.status()["node"]["cpu_pct"] < 30.0, 60, 0.2, what="a's core to go idle")
    eventually(lambda: next(p for p in a.peers() if p["name"] == "b")["spare_cores"] >= 0.5, 60, 0.2,
               what="b to advertise a spare core")


def one_job(a: Vestad) -> float:
    with a.client() as client:
        client.sock.settimeout(JOB_TIMEOUT)
        t0 = time.perf_counter()
        client.call("cpu", millions=MILLIONS, split=False, on="a")
        return time.perf_counter() - t0


def batch(a: Vestad) -> tuple[float, list[dict[str, Any]]]:
    """Every job submitted at once, each from its own client; the makespan and the results."""
    clients = [a.client() for _ in range(JOBS)]
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    go = threading.Barrier(JOBS + 1)

    def submit(client: Any) -> None:
        client.sock.settimeout(JOB_TIMEOUT)
        go.wait()
        try:
            results.append(client.call("cpu", millions=MILLIONS, split=False))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(JOB_TIMEOUT)
    makespan = time.perf_counter() - t0
    for c in clients:
        c.close()
    if errors:
        raise errors[0]
    return makespan, results


def main() -> None:
    title = f"batch: {JOBS} x cpu {MILLIONS} --no-split at once on two one-core daemons" + (" [quick]" if QUICK else "")
    report = Report("batch", title)
    if not shutil.which("taskset") or (os.cpu_count() or 1) < 2:
        report.target(f"makespan ≤ {TARGET:g} x ideal", None, "needs taskset and 2 cores")
        report.finish()
        return
    report.extra["busy_pct_before"] = settle()
    with daemons() as cluster:
        cfg = cluster.base / "lend.json"
        cfg.write_text(json.dumps({"cpu_offer_pct": 100, "reserve_pct": 0}))
        a = cluster.add("a", cpus="0", args=["-config", str(cfg)])
        b = cluster.add("b", cpus="1", args=["-config", str(cfg)])
        eventually(lambda: "b" in a.peer_names() and "a" in b.peer_names(), 15, what="a and b to see each other")
        wait_idle(a)
        with a.client() as client:   # opens the a->b link, so the batch does not pay for the handshake
            client.call("cpu", millions=0.000001, on="b")
        singles = []
        for _ in range(3):
            wait_idle(a)
            singles.append(one_job(a))
        single = min(singles)
        wait_idle(a)
        with LoadWatch() as load, ProcessCpu({"a": a.pid, "b": b.pid}) as cpu:
            makespan, results = batch(a)
        ideal = JOBS * single / 2
        ratio = makespan / ideal if ideal else 0.0
        spread = Counter(p["node"] for r in results for p in r["parts"])
        report.row("one job alone", single, "s", "best of " + ", ".join(f"{s:.2f}" for s in singles))
        report.row("batch makespan", makespan, "s", f"{len(results)} jobs; daemons busy {cpu.cores:.2f} cores"
                   + busy_note(cpu.others(load)))
        report.row("ideal (jobs x one / 2)", ideal, "s")
        report.row("makespan / ideal", ratio, "x", f"target ≤ {TARGET:g}")
        report.row("jobs per node", ", ".join(f"{n}: {k}" for n, k in sorted(spread.items())))
        report.target("the batch ran on both a and b", set(spread) == {"a", "b"}, str(dict(spread)))
        report.target(f"makespan ≤ {TARGET:g} x ideal", ratio <= TARGET, f"{ratio:.2f} x")
        report.extra.update({"jobs": JOBS, "millions": MILLIONS, "single_s": singles, "makespan_s": makespan,
                             "ratio": ratio, "spread": dict(spread)})
    report.finish()


if __name__ == "__main__":
    sys.exit(main())
