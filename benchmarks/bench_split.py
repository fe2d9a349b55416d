"""Split speed-up: one cpu job on two one-core daemons against the same job on one.

Target (jobs issue): "split: two daemons each limited to one core (`taskset`), `vesta cpu 400`
split across both >= 1.8 x faster than on one."

a is pinned to cpu 0 and b to cpu 1 (taskset), both lending their whole core
(``{"cpu_offer_pct": 100, "reserve_pct": 0}``), so each behaves as a one-core machine. Once they
see each other and both are idle (a's own core below 30 % busy, b advertising a spare core as a
sees it), a runs ``cpu 400`` on itself alone (``on="a"``), then split (the default), from one
control-socket client. VESTA_BENCH_QUICK=1 runs 100M iterations instead (about 4x quicker).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any

from common import LoadWatch, ProcessCpu, Report, busy_note, daemons, settle

from tests.helpers import Vestad, eventually

QUICK = os.environ.get("VESTA_BENCH_QUICK", "") not in ("", "0")
MILLIONS = 100 if QUICK else 400
TARGET = 1.8
IDLE_CPU_PCT = 30.0
JOB_TIMEOUT = 600.0
ATTEMPTS = 3          # a run disturbed by other processes (>= NOISY_CORES busy) is run again
NOISY_CORES = 0.25


def wait_idle(a: Vestad) -> None:
    """Both cores quiet: a's own load low, b advertising a spare core (as a sees it)."""
    eventually(lambda: a.status()["node"]["cpu_pct"] < IDLE_CPU_PCT, 60, 0.2, what="a's core to go idle")
    eventually(lambda: next(p for p in a.peers() if p["name"] == "b")["spare_cores"] >= 0.5, 60, 0.2,
               what="b to advertise a spare core")


def run(a: Vestad, **args: Any) -> tuple[float, dict[str, Any]]:
    with a.client() as client:
        client.sock.settimeout(JOB_TIMEOUT)
        t0 = time.perf_counter()
        result = client.call("cpu", millions=MILLIONS, **args)
        return time.perf_counter() - t0, result


def measure(a: Vestad, pids: dict[str, int], **args: Any) -> tuple[float, dict[str, Any], ProcessCpu, str]:
    """Time one job; again (up to ATTEMPTS) while other processes took a share of the cores.

    The first undisturbed run counts; if every run was disturbed, the fastest (the least disturbed).
    """
    runs: list[tuple[float, dict[str, Any], ProcessCpu, float | None]] = []
    for _ in range(ATTEMPTS):
        wait_idle(a)
        with LoadWatch() as load, ProcessCpu(pids) as cpu:
            seconds, result = run(a, **args)
        runs.append((seconds, result, cpu, cpu.others(load)))
        if runs[-1][3] is None or runs[-1][3] < NOISY_CORES:
            break
        settle()
    chosen = runs[-1] if runs[-1][3] is None or runs[-1][3] < NOISY_CORES else min(runs, key=lambda r: r[0])
    seconds, result, cpu, others = chosen
    note = busy_note(others)
    if len(runs) > 1:
        note += f"; {len(runs)} runs (other processes busy): " + ", ".join(
            f"{r[0]:.2f} s ({r[3] or 0:.1f} cores)" for r in runs)
    return seconds, result, cpu, note


def main() -> None:
    if not shutil.which("taskset") or (os.cpu_count() or 1) < 2:
        report = Report("split", "split: cpu job on two one-core daemons vs one")
        report.target(f"split ≥ {TARGET:g} x one node", None, "needs taskset and 2 cores")
        report.finish()
        return
    report = Report("split", f"split: cpu {MILLIONS} on two one-core daemons (taskset) vs one"
                    + (" [quick]" if QUICK else ""))
    report.extra["busy_pct_before"] = settle()
    with daemons() as cluster:
        cfg = cluster.base / "lend.json"
        cfg.write_text(json.dumps({"cpu_offer_pct": 100, "reserve_pct": 0}))
        a = cluster.add("a", cpus="0", args=["-config", str(cfg)])
        b = cluster.add("b", cpus="1", args=["-config", str(cfg)])
        eventually(lambda: "b" in a.peer_names() and "a" in b.peer_names(), 15, what="a and b to see each other")
        wait_idle(a)
        with a.client() as client:   # opens the a->b link, so the split run does not pay for the handshake
            client.call("cpu", millions=0.000001, on="b")

        pids = {"a": a.pid, "b": b.pid}
        one_s, one, cpu1, note1 = measure(a, pids, on="a")
        two_s, two, cpu2, note2 = measure(a, pids)

        nodes = {p["node"] for p in two["parts"]}
        speedup = one_s / two_s if two_s else 0.0
        report.row("one node (a): time", one_s, "s", f"{MILLIONS}M iterations, {one['chunks']} chunks; "
                   f"{one['rate'] / 1e6:.1f} M it/s; daemons busy {cpu1.cores:.2f} cores" + note1)
        report.row("split (a + b): time", two_s, "s", f"{two['chunks']} chunks on {', '.join(sorted(nodes))}; "
                   f"{two['rate'] / 1e6:.1f} M it/s; daemons busy {cpu2.cores:.2f} cores" + note2)
        report.row("speed-up", speedup, "x", f"ideal 2; target ≥ {TARGET:g}")
        for p in two["parts"]:
            report.row(f"split share: {p['node']}", p["share_pct"], "%",
                       f"{p['chunks']} chunks, {p['iterations'] / 1e6:.0f}M iterations, "
                       f"{p['rate'] / 1e6:.1f} M it/s while busy")
        if two["replaced"]:
            report.row("split: chunks re-placed", len(two["replaced"]), "", str(two["replaced"][0])[:80])
        report.target("split ran on both a and b", nodes == {"a", "b"}, ", ".join(sorted(nodes)))
        report.target(f"split ≥ {TARGET:g} x one node", speedup >= TARGET and nodes == {"a", "b"},
                      f"{speedup:.2f} x")
        report.extra.update({"millions": MILLIONS, "quick": QUICK, "one_node": {"seconds": one_s, "result": one},
                             "split": {"seconds": two_s, "result": two}})
    report.finish()


if __name__ == "__main__":
    sys.exit(main())
