"""piwork speed and accuracy.

Target (jobs issue): "piwork: <= 4 ns per sample per core (numpy, float32 or integer path,
preallocated blocks), estimate within 4 standard errors of pi." piwork takes the integer path
(exact, with lazily drawn low bits: see vesta/cli/piwork.py).

ns/sample/core = wall time x busy cores / samples, from 1 thread and from every core, several
repetitions each (best: what the code can do; median: what this machine gave), and the error of
one large seeded run in standard errors.
"""

from __future__ import annotations

import os
import sys

from common import LoadWatch, Report, best_median, repeat, settle

from vesta.cli.piwork import estimate_pi

TARGET_NS = 4.0
REPS = 5
SAMPLES_PER_CORE = 100_000_000   # ~0.3-0.4 s a repetition
LARGE = 2_000_000_000            # the accuracy run: one standard error is ~3.7e-5
SEED = 20240601


def main() -> None:
    cores = os.cpu_count() or 1
    report = Report("piwork", f"piwork: Monte Carlo pi ({cores} cores)")
    busy = settle()
    report.extra["busy_pct_before"] = busy

    estimate_pi(10_000_000, seed=1)     # warm-up: imports, page faults, thread start
    speeds: dict[int, float] = {}
    for threads in sorted({1, cores}):
        samples = SAMPLES_PER_CORE * threads
        with LoadWatch() as load:
            runs = repeat(lambda t=threads, n=samples: estimate_pi(n, seed=SEED, threads=t), REPS)
        ns = [r.ns_per_sample_per_core for r in runs]
        best, median = best_median(ns)
        speeds[threads] = best
        label = "1 thread" if threads == 1 else f"{threads} threads"
        busy = f"; other processes busy {load.others:.1f} cores" if load.others and load.others >= 0.1 else ""
        report.row(f"{label}: ns/sample/core", best, "ns", f"best of {REPS}; median {median:.2f}{busy}",
                   threads=threads, samples=samples, all_ns=ns, other_cores_busy=load.others)
        report.row(f"{label}: samples/s", max(r.samples_per_s for r in runs) / 1e6, "million/s", "best")
    if cores > 1:
        report.row("thread scaling", speeds[1] / speeds[cores] * cores, "x",
                   f"{cores} threads vs 1 (ideal {cores})")

    big = estimate_pi(LARGE, seed=SEED)
    sigmas = abs(big.pi_error) / big.stderr
    report.row("large run: estimate", f"{big.estimate:.8f}", "", f"{big.samples:,} samples, seed {SEED}")
    report.row("large run: error", big.pi_error, "", f"one standard error {big.stderr:.2e}")
    report.row("large run: error", sigmas, "std errors", f"{big.elapsed_s:.2f} s on {big.threads} threads")

    for threads, best in speeds.items():
        label = "1 thread" if threads == 1 else f"{threads} threads"
        report.target(f"≤ {TARGET_NS:g} ns/sample/core, {label}", best <= TARGET_NS, f"best {best:.2f} ns")
    report.target("within 4 standard errors of pi", sigmas <= 4, f"{sigmas:.2f} standard errors")
    report.finish()


if __name__ == "__main__":
    sys.exit(main())
