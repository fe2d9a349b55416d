"""An idle daemon's footprint: CPU, memory, and numpy left unloaded.

Target (jobs issue): "idle daemon: <= 1 % of one core and <= 60 MiB RSS (numpy must not be
imported by the daemon until a workload needs it)."

One daemon (a) with the default 1000 ms beacon interval and one peer (b), so a has a peer table
to maintain and beacons to check. Both run as users run them (no -v: debug logging is not the
idle cost). Once a lists b, 3 s to settle, then a's CPU time (user + system, psutil) over 10 s of
wall time, its RSS and USS, and whether any numpy file is mapped into it (/proc/PID/maps).

Lending exec, a keeps warm runners ready (warm_runners: auto): their processes (a's descendants) are
measured over the same window, CPU and memory (RSS and PSS: most of their pages are shared), and the
CPU target holds for the daemon and its runners together (warm sandboxes issue).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil
from common import LoadWatch, Report, busy_note, daemons, settle

from tests.helpers import Vestad, eventually

INTERVAL_MS = 1000              # vestad's default beacon interval
SETTLE_S = 3.0
MEASURE_S = float(os.environ.get("VESTA_BENCH_IDLE_SECONDS", "10"))
CPU_PCT_MAX = 1.0
RSS_MIB_MAX = 60.0
RUNNER_RSS_MIB_MAX = 5.0        # each idle warm runner (warm sandboxes issue)
MIB = 1024 * 1024


class QuietVestad(Vestad):
    """A vestad started as a user would: without the helper's -v (debug logging of every beacon)."""

    def command(self) -> list[str]:
        return [arg for arg in super().command() if arg != "-v"]


def schedstat_s(pid: int) -> float | None:
    """CPU seconds of every thread of ``pid`` from /proc/PID/task/*/schedstat (ns), or None.

    psutil's user/system times come in 10 ms ticks: 0.1 % of a core over 10 s. The scheduler's
    own count is exact; a thread that ended during the window is missed (the daemon keeps its own).
    """
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    except OSError:
        return None
    return total / 1e9


def numpy_mapped(pid: int) -> list[str]:
    """Files of numpy mapped into the process (its shared objects appear once imported)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return []
    return sorted({line.split()[-1] for line in maps.splitlines() if "numpy" in line and "/" in line})


def main() -> None:
    report = Report("idle", f"idle daemon: CPU and memory ({INTERVAL_MS} ms beacons, one peer, exec allowed)")
    report.extra["busy_pct_before"] = settle()
    with daemons() as cluster:
        base = cluster.base
        nodes: list[Vestad] = []
        for name in ("a", "b"):
            # Lending exec, as most nodes will: its orphan reaper wakes every 0.2 s.
            node = QuietVestad(name, cluster.key, cluster.dport, base / name, cluster.runtime_dir,
                               args=["-allow-exec"], interval_ms=INTERVAL_MS)
            cluster.nodes.append(node)
            nodes.append(node.start())
        a, b = nodes
        eventually(lambda: "b" in a.peer_names() and "a" in b.peer_names(), 15, what="a and b to see each other")
        time.sleep(SETTLE_S)

        proc = psutil.Process(a.pid)
        eventually(lambda: a.status()["warm_runners"].get("ready", 0) >= a.status()["warm_runners"].get("base", 1),
                   15, what="a's warm runners to be ready")
        runners = proc.children(recursive=True)
        runner_cpu0 = sum(schedstat_s(r.pid) or 0.0 for r in runners)
        before, sched0 = proc.cpu_times(), schedstat_s(a.pid)
        with LoadWatch() as load:
            t0 = time.monotonic()
            time.sleep(MEASURE_S)
            wall = time.monotonic() - t0
        after, sched1 = proc.cpu_times(), schedstat_s(a.pid)
        alive = [r for r in runners if r.is_running()]
        runner_cpu = sum(schedstat_s(r.pid) or 0.0 for r in alive) - runner_cpu0
        runner_rss = sum(r.memory_info().rss for r in alive) / MIB
        runner_pss = sum(getattr(r.memory_full_info(), "pss", 0) for r in alive) / MIB
        warm = a.status()["warm_runners"]
        ticks_s = (after.user - before.user) + (after.system - before.system)
        exact = sched0 is not None and sched1 is not None and sched1 >= sched0
        cpu_s = sched1 - sched0 if sched0 is not None and sched1 is not None and exact else ticks_s
        cpu_pct = 100.0 * cpu_s / wall
        mem = proc.memory_full_info() if hasattr(proc, "memory_full_info") else proc.memory_info()
        rss = mem.rss / MIB
        uss = getattr(mem, "uss", None)
        threads = proc.num_threads()
        numpy = numpy_mapped(a.pid)
        peers = len(a.peers())
        others = None if load.others is None else max(0.0, load.others - cpu_s / wall)

        report.row("CPU", cpu_pct, "% of one core",
                   (f"{cpu_s * 1000:.1f} ms (schedstat) " if exact else "") + f"over {wall:.1f} s; psutil: "
                   f"user {after.user - before.user:.2f} s + system {after.system - before.system:.2f} s"
                   + busy_note(others))
        report.row("RSS", rss, "MiB", "resident set")
        report.row("warm runners", warm.get("ready", 0), "", f"{len(alive)} processes; built {warm.get('built', 0)}")
        report.row("runners CPU", 100.0 * runner_cpu / wall, "% of one core",
                   f"{runner_cpu * 1000:.2f} ms over the window")
        report.row("runners RSS", runner_rss, "MiB",
                   f"all their processes; PSS {runner_pss:.2f} MiB (shared pages split)")
        report.row("RSS daemon + runners", rss + runner_rss, "MiB", "")
        report.row("USS", None if uss is None else uss / MIB, "MiB", "pages only this process holds")
        report.row("threads", threads, "", "")
        report.row("peers in table", peers, "", "")
        report.row("numpy loaded", "yes" if numpy else "no", "", numpy[0] if numpy else "no numpy file mapped")
        report.target(f"CPU ≤ {CPU_PCT_MAX:g} % of one core", cpu_pct <= CPU_PCT_MAX, f"{cpu_pct:.2f} %")
        total_pct = cpu_pct + 100.0 * runner_cpu / wall
        report.target(f"CPU with warm runners ≤ {CPU_PCT_MAX:g} % of one core", total_pct <= CPU_PCT_MAX,
                      f"{total_pct:.2f} %")
        per_runner = runner_rss / max(1, warm.get("ready", 0))
        report.target(f"each idle runner ≤ {RUNNER_RSS_MIB_MAX:g} MiB RSS", per_runner <= RUNNER_RSS_MIB_MAX,
                      f"{per_runner:.2f} MiB (PSS {runner_pss / max(1, warm.get('ready', 0)):.2f} MiB)")
        report.target(f"RSS ≤ {RSS_MIB_MAX:g} MiB", rss <= RSS_MIB_MAX, f"{rss:.1f} MiB")
        report.target("numpy not imported while idle", not numpy, f"{len(numpy)} numpy files mapped")
        report.extra.update({"warm_runners": warm, "runner_cpu_s": runner_cpu, "runner_rss_mib": runner_rss,
                             "runner_pss_mib": runner_pss})
        report.extra.update({"cpu_s": cpu_s, "cpu_ticks_s": ticks_s, "wall_s": wall, "rss_bytes": mem.rss,
                             "uss_bytes": None if uss is None else uss, "numpy_files": numpy})
    report.finish()


if __name__ == "__main__":
    sys.exit(main())
