"""What every benchmark shares: timing, a quiet-machine check, a results table, targets and the JSON file.

A benchmark builds a ``Report``, adds measured ``row``s and ``target``s (PASS/FAIL, never an
exception: a missed target is a result, not a crash) and calls ``finish()``, which prints the
table and writes ``bench-results/<name>.json`` at the repository root. Run them all with
``scripts/bench`` (or one: ``scripts/bench piwork``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results"
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
sys.path.insert(0, str(ROOT))   # tests.helpers: real vestad processes

from tests.helpers import Cluster, short_tmpdir  # noqa: E402


@contextlib.contextmanager
def daemons() -> Iterator[Cluster]:
    """Real vestad processes (``tests.helpers.Cluster``) under a short temporary directory
    (``cluster.base``); every one is stopped and the directory removed afterwards."""
    cluster = Cluster(short_tmpdir("vb"))
    try:
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(cluster.base, ignore_errors=True)


def repeat(fn: Callable[[], Any], times: int) -> list[Any]:
    """``fn()`` ``times`` times, the results in order (fn measures itself: timings are its business)."""
    return [fn() for _ in range(times)]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def best_median(values: list[float], lower_is_better: bool = True) -> tuple[float, float]:
    return (min(values) if lower_is_better else max(values)), statistics.median(values)


def cpu_busy_pct(interval: float = 0.5) -> float | None:
    """How busy the CPUs were over ``interval`` (from /proc/stat), or None where there is no /proc/stat."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
        return sum(fields), idle
    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return 100.0 * (1 - (idle1 - idle0) / total) if total > 0 else 0.0


def _busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (from /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class LoadWatch:
    """How many cores *other* processes kept busy while a measurement ran (``others``; None off Linux).

    On a shared machine this says whether a slow number is the code or the neighbours.
    """

    def __init__(self) -> None:
        self.others: float | None = None

    def __enter__(self) -> LoadWatch:
        self._busy, self._own, self._wall = _busy_seconds(), _own_seconds(), time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, wall = _busy_seconds(), time.monotonic() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            return
        self.others = max(0.0, (busy - self._busy - (_own_seconds() - self._own)) / wall)


class ProcessCpu:
    """CPU seconds some processes (``{label: pid}``, e.g. the daemons a benchmark started) used in a block.

    ``used[label]`` counts the process and the children it reaped (exec'd jobs). ``LoadWatch``
    counts such processes among the *others* (they are not waited for); ``others(load, wall)``
    gives what was left of that once they are taken out.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        import psutil

        self._procs = {label: psutil.Process(pid) for label, pid in pids.items()}
        self.used: dict[str, float] = {}
        self.wall = 0.0

    def _cpu(self) -> dict[str, float]:
        return {label: sum(p.cpu_times()[:4]) for label, p in self._procs.items()}   # user, system, children

    def __enter__(self) -> ProcessCpu:
        self._start, self._wall = self._cpu(), time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._cpu()
        self.wall = time.monotonic() - self._wall
        self.used = {label: end[label] - self._start[label] for label in end}

    @property
    def cores(self) -> float:
        """Cores these processes kept busy on average."""
        return sum(self.used.values()) / self.wall if self.wall > 0 else 0.0

    def others(self, load: LoadWatch) -> float | None:
        """``load.others`` less these processes (both measured over the same block)."""
        return None if load.others is None else max(0.0, load.others - self.cores)


def busy_note(others: float | None) -> str:
    """"; other processes busy N cores" where that is worth saying, else ""."""
    return f"; other processes busy {others:.1f} cores" if others is not None and others >= 0.1 else ""


def settle(max_wait_s: float = 20.0, busy_below_pct: float = 10.0) -> float | None:
    """Wait (a bounded time) for other work on the machine to finish; the last busy % seen.

    Timings taken while something else runs are pessimistic: say so rather than hide it.
    """
    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy_pct()
    while busy is not None and busy >= busy_below_pct and time.monotonic() < deadline:
        busy = cpu_busy_pct()
    if busy is not None and busy >= busy_below_pct:
        console.print(f"[yellow]note: the machine is {busy:.0f}% busy with other work; timings will be pessimistic")
    return busy


def machine() -> dict[str, Any]:
    import numpy as np

    return {
        "hostname": socket.gethostname(), "cpus": os.cpu_count(), "platform": platform.platform(),
        "processor": _cpu_model(), "python": platform.python_version(), "numpy": np.__version__,
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass
class Report:
    """One benchmark's measurements and targets."""

    name: str
    title: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def row(self, metric: str, value: float | str | None, unit: str = "", note: str = "", **data: Any) -> None:
        self.rows.append({"metric": metric, "value": value, "unit": unit, "note": note, **data})

    def target(self, name: str, ok: bool | None, detail: str = "") -> None:
        """Record a target: True PASS, False FAIL, None n/a (could not be measured here)."""
        self.targets.append({"target": name, "result": {True: "PASS", False: "FAIL", None: "n/a"}[ok],
                             "detail": detail})

    def table(self) -> Table:
        table = Table(title=self.title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_column("unit")
        table.add_column("note")
        for r in self.rows:
            table.add_row(r["metric"], _fmt(r["value"]), r["unit"], r["note"])
        for t in self.targets:
            colour = {"PASS": "green", "FAIL": "red"}.get(t["result"], "yellow")
            table.add_row(f"target: {t['target']}", f"[{colour}]{t['result']}[/]", "", t["detail"])
        return table

    def finish(self) -> Path:
        console.print(self.table())
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{self.name}.json"
        data = {"bench": self.name, "title": self.title, "started": self.started,
                "elapsed_s": time.time() - self.started, "machine": machine(), "rows": self.rows,
                "targets": self.targets, **self.extra}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        tmp.replace(path)
        console.print(f"[dim]wrote {path.relative_to(ROOT)}[/]")
        return path


def _fmt(value: float | str | None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
