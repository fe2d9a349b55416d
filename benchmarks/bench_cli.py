"""How long `vesta status` takes as a whole process, against a running daemon.

Target (issue "A CLI that starts fast"): `vesta status` as a process <= 80 ms. Most of that is Python
starting and importing, so the same run times `python -c pass` (the interpreter alone, same venv) beside it:
what is left over is vesta's own cost, imports and the control call.

One daemon (a). The installed console script (what users run), stdout a pipe as in a script: `vesta status`
(key<TAB>value lines), `vesta status --json` and `python -c pass`, taken in turn RUNS times each after one
warm-up round (so the page cache holds every file), median and best of each. vesta's bytecode is compiled
first, as installing a wheel does: with PYTHONDONTWRITEBYTECODE set and no __pycache__ (an editable install),
every run would compile vesta's modules again, some 20 ms that no installed vesta pays. The packages `vesta status
--json` loaded are checked too: no cryptography, nacl, numpy or rich.
"""

from __future__ import annotations

import compileall
import os
import statistics
import subprocess
import sys
import time

from common import ROOT, LoadWatch, Report, busy_note, daemons, settle

from tests.helpers import tool

RUNS = int(os.environ.get("VESTA_BENCH_CLI_RUNS", "20"))
TARGET_MS = 80.0
HEAVY = ("cryptography", "nacl", "numpy", "rich")
_LOADED = ("import atexit, sys\n"
           "atexit.register(lambda: print(' '.join(sorted({m.split('.')[0] for m in sys.modules}"
           f" & {set(HEAVY)!r})), file=sys.stderr))\n"
           "from vesta.cli.vesta import main\n"
           "sys.argv = ['vesta', 'status', '--json']\n"
           "main()\n")


def run_ms(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, stdin=subprocess.DEVNULL)
    took = (time.perf_counter() - start) * 1000
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return took


def main() -> None:
    report = Report("cli", f"vesta status as a process (median of {RUNS}, stdout a pipe)")
    compileall.compile_dir(ROOT / "vesta", quiet=1)
    report.extra["busy_pct_before"] = settle()
    with daemons() as cluster:
        a = cluster.add("a")
        env = a.env | {"VESTA_NAME": "a"}
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "vesta status": tool("vesta") + ["status"],
            "vesta status --json": tool("vesta") + ["status", "--json"],
        }
        for cmd in commands.values():   # warm-up: the page cache, the daemon's first answer
            run_ms(cmd, env)
        times: dict[str, list[float]] = {label: [] for label in commands}
        with LoadWatch() as load:
            for _ in range(RUNS):
                for label, cmd in commands.items():
                    times[label].append(run_ms(cmd, env))
        loaded = subprocess.run([sys.executable, "-c", _LOADED], env=env, capture_output=True, text=True,
                                timeout=60).stderr.strip().splitlines()
    heavy = loaded[-1].split() if loaded else []
    median = {label: statistics.median(t) for label, t in times.items()}
    for label, t in times.items():   # the runs are reaped children (ours); the daemon counts among the others
        report.row(label, median[label], "ms", f"best {min(t):.1f} ms" + busy_note(load.others))
    report.row("vesta status less python -c pass", median["vesta status"] - median["python -c pass"], "ms",
               "vesta's own imports and the control call")
    report.row("heavy packages loaded", " ".join(heavy) or "none", "", "by vesta status --json: " + ", ".join(HEAVY))
    report.target(f"vesta status ≤ {TARGET_MS:g} ms", median["vesta status"] <= TARGET_MS,
                  f"median {median['vesta status']:.1f} ms")
    report.target("no crypto, numpy or rich for --json", not heavy, " ".join(heavy) or "none loaded")
    report.extra.update({"runs": RUNS, "times_ms": times, "median_ms": median, "heavy_loaded": heavy})
    report.finish()


if __name__ == "__main__":
    sys.exit(main())
