"""Warm sandboxes: a remote `exec -- true`, sandboxed, with limits and the job user, in about a millisecond.

Targets (warm sandboxes issue): remote ``exec -- true`` p50 <= 2.0 ms in bubblewrap with limits and the job
user, <= 1.5 ms with ``sandbox: none``; p99 <= 5 ms; 200 back-to-back runs on one slot keep the same p50 (the
refill keeps up).

Three real daemons on 127.0.0.1, 200 ms beacons: a (the submitter), b (exec in bubblewrap when installed) and
n (exec with ``sandbox: none``), both lending exec with their default ``warm_runners: auto``. One persistent
control-socket client on a runs ``EXEC_JOBS`` x ``exec -- true`` on b, back to back, then on n, timing each
call (request written to reply read). The first runs open the peer link and are not counted. "Same p50"
compares the p50 of the last quarter of the runs with that of the first quarter (within 25 % or 0.3 ms).
Then 50 runs 50 ms apart on b and on n: the latency of
one job on an idle node, whose runner was rebuilt in the gap. For the record, the same runs on a node
with ``warm_runners: 0`` (cold: every run sets its sandbox up) and,
as the floor, a local ``subprocess.run(["true"])`` in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from common import LoadWatch, Report, busy_note, daemons, settle

from tests.helpers import eventually
from vesta.control import ControlClient, RemoteError

EXEC_JOBS = int(os.environ.get("VESTA_BENCH_WARM_EXECS", "200"))
COLD_JOBS = 50
SPACED_JOBS, SPACED_GAP_S = 50, 0.05
WARMUP = 20
P50_BWRAP_MS, P50_NONE_MS, P99_MS = 2.0, 1.5, 5.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def runs(client: ControlClient, node: str, n: int, gap_s: float = 0.0) -> tuple[list[float], list[str]]:
    times: list[float] = []
    errors: list[str] = []
    for _ in range(n):
        time.sleep(gap_s)
        t0 = time.perf_counter()
        try:
            result: dict[str, Any] = client.call("exec", argv=["true"], on=node)
        except RemoteError as exc:
            errors.append(str(exc))
            continue
        times.append((time.perf_counter() - t0) * 1000)
        if result["node"] != node or result["exit_code"] != 0:
            errors.append(f"ran on {result['node']} with exit {result['exit_code']}: {result.get('reason')}")
    return times, errors


def main() -> None:
    report = Report("warm", f"warm sandboxes: remote exec -- true, back to back on one node ({os.cpu_count()} cores)")
    report.extra["busy_pct_before"] = settle()
    spawn = []
    for _ in range(200):
        t0 = time.perf_counter()
        subprocess.run(["true"], check=True)
        spawn.append((time.perf_counter() - t0) * 1000)
    report.row("local subprocess.run(['true']): p50", percentile(spawn, 50), "ms", "the floor: a spawn, no isolation")
    with daemons() as cluster:
        base = cluster.base
        configs = {"b": {"sandbox": "auto"}, "n": {"sandbox": "none"}, "c": {"sandbox": "auto", "warm_runners": "0"}}
        nodes = {}
        for name, cfg in configs.items():
            (base / f"{name}.json").write_text(json.dumps(cfg))
            args = ["-allow-exec", "-config", str(base / f"{name}.json")]
            nodes[name] = cluster.add(name, interval_ms=200, args=args)
        a = cluster.add("a", interval_ms=200)
        eventually(lambda: set(nodes) <= a.peer_names(), 15, what="a to list b, n and c")
        isolation = nodes["b"].status()["isolation"]
        sandboxed = "bubblewrap:" in isolation
        report.extra["isolation_b"] = isolation
        with a.client() as client:
            for name in nodes:
                eventually(lambda name=name: next(p for p in a.peers() if p["name"] == name)["spare_cores"] >= 0.5, 30,
                           what=f"{name} to advertise a spare core")
                runs(client, name, WARMUP)
            results = {}
            for name, n in (("b", EXEC_JOBS), ("n", EXEC_JOBS), ("c", COLD_JOBS)):
                time.sleep(2.0)   # the pools refill and shrink back after the warm-up
                with LoadWatch() as load:
                    times, errors = runs(client, name, n)
                results[name] = (times, errors, load)
            spaced = {}
            for name in ("b", "n"):   # one job at a time on an idle node: its runner was rebuilt in the gap
                spaced[name], _ = runs(client, name, SPACED_JOBS, gap_s=SPACED_GAP_S)
            warm = {name: nodes[name].status()["warm_runners"] for name in ("b", "n")}
        report.extra["warm_runners"] = warm
        labels = {"b": "bubblewrap, limits, job user" if sandboxed else "NO bubblewrap here (sandbox auto)",
                  "n": "sandbox none, limits, job user", "c": "cold: warm_runners 0, " +
                  ("bubblewrap" if sandboxed else "no sandbox")}
        for name, (times, errors, load) in results.items():
            if not times:
                report.row(f"{name} ({labels[name]}): completed", 0, f"of {len(errors)}", errors[0][:80])
                continue
            q = max(1, len(times) // 4)
            report.row(f"{name} ({labels[name]}) ×{len(times)}: p50", percentile(times, 50), "ms",
                       f"p90 {percentile(times, 90):.2f}, max {max(times):.2f}" + busy_note(load.others))
            report.row(f"{name}: p99", percentile(times, 99), "ms", f"first quarter p50 "
                       f"{percentile(times[:q], 50):.2f}, last quarter {percentile(times[-q:], 50):.2f}")
            if errors:
                report.row(f"{name}: failed", len(errors), f"of {len(times) + len(errors)}", errors[0][:80])
            report.extra[f"{name}_ms"] = times
        for name in ("b", "n"):
            if spaced[name]:
                report.row(f"{name} ({labels[name]}), {SPACED_GAP_S * 1000:.0f} ms apart ×{len(spaced[name])}: p50",
                           percentile(spaced[name], 50), "ms", f"p99 {percentile(spaced[name], 99):.2f}: a job on an "
                           "idle node, its runner rebuilt before the next")
        for name in ("b", "n"):
            w = warm[name]
            report.row(f"{name}: runners taken / missed", w.get("taken", 0), f"/ {w.get('missed', 0)}",
                       f"kept {w.get('kept')} (base {w.get('base')}), built {w.get('built')}")
        for name, target in (("b", P50_BWRAP_MS), ("n", P50_NONE_MS)):
            times, errors, _ = results[name]
            if not times:
                report.target(f"{name} p50 ≤ {target:g} ms", False, "no run completed")
                continue
            p50, p99 = percentile(times, 50), percentile(times, 99)
            q = max(1, len(times) // 4)
            first, last = percentile(times[:q], 50), percentile(times[-q:], 50)
            what = "bubblewrap" if name == "b" else "sandbox none"
            report.target(f"exec p50 ≤ {target:g} ms ({what})", p50 <= target and not errors and
                          (name == "n" or sandboxed), f"{p50:.2f} ms")
            report.target(f"exec p99 ≤ {P99_MS:g} ms ({what})", p99 <= P99_MS, f"{p99:.2f} ms")
            report.target(f"{EXEC_JOBS} back to back keep the p50 ({what})",
                          last <= max(first * 1.25, first + 0.3), f"first {first:.2f} ms, last {last:.2f} ms")
    report.finish()


if __name__ == "__main__":
    sys.exit(main())
