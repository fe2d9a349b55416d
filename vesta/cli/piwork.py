"""piwork: a standalone Monte Carlo estimate of pi, reproducible from a seed, on every core.

How it counts (DESIGN.md "piwork"): the samples are cut into fixed blocks of
``BLOCK`` samples. Block ``i`` draws from its own SFC64 generator seeded with
``SeedSequence(seed, spawn_key=(i,))``, so a block's hits depend only on the
seed and its index: threads take blocks from a shared counter in any order and
the total is bit-identical for every thread count. Within a block, work goes
in chunks of ``CHUNK`` samples through preallocated per-thread buffers, and
numpy releases the GIL inside each kernel, so the threads run in parallel.

Each sample is a point (X, Y) of [0, 2**32)**2, a hit when X*X + Y*Y < 2**64
(the quarter disk, pi/4 of the square), decided in exact integer arithmetic:
no float rounding, so no bias beyond the lattice's own ~2**-32. The random
bits are drawn lazily, because generating them is the expensive part:

- first only the top 7 bits of each coordinate, 16 bits a sample (four
  samples per 64-bit word). They name a cell of a 128 x 128 grid; with cell
  corner (x, y), every point of the cell is inside when the far corner is,
  (x+1)**2 + (y+1)**2 <= 128**2, which holds whenever x*x + y*y <= ``_BAND``
  (as x + y <= 254), and outside when x*x + y*y >= 128**2. This is uint16
  arithmetic on the whole chunk.
- the ~2.4 % of samples in between (cells the circle may cross) draw their
  low 25 bits per coordinate and are tested exactly in uint64
  (X*X <= 2**64 - 1 - Y*Y cannot overflow).

The result is exactly the count a full 32-bit draw per coordinate would give
(tests/test_piwork.py checks the kernel against that reference), at about
2 ns a sample here instead of ~3.5 for float32 on 64 random bits a sample.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

import click
import numpy as np
from numpy.typing import NDArray

from vesta.cli.base import version_option
from vesta.cli.common import EXIT_USAGE, fail, option_json, print_json, run_command, stdout_console

PROG = "piwork"
BLOCK = 1 << 20          # samples per independently seeded block: the unit of reproducibility and of work sharing
CHUNK = 1 << 19          # samples per vectorized pass (~3.5 MiB of buffers a thread): each chunk takes ~20
                         # numpy calls, and every call is a GIL hand-off between threads; smaller chunks scale
                         # worse across threads, bigger ones fall out of cache (measured: bench_piwork.py)
MAX_MILLIONS = 1e6       # 1e12 samples: hours on a desktop
MAX_THREADS = 1024
PROGRESS_EVERY_S = 0.1   # how often the caller's progress callback runs

# The cell grid (see the module docstring). Coordinates are 32 bits: CELL_BITS of cell, _LOW_BITS below it.
CELL_BITS = 7
_CELL_MAX = (1 << CELL_BITS) - 1                  # 127
_CELL_R2 = 1 << (2 * CELL_BITS)                   # 128**2: the radius squared, in cells
_BAND = _CELL_R2 - (2 * (2 * _CELL_MAX) + 2)      # 15874: x*x + y*y <= _BAND puts the far corner inside too
_BAND_WIDTH = _CELL_R2 - _BAND - 1                # cells with _BAND < x*x + y*y < _CELL_R2 need the low bits
_LOW_BITS = 32 - CELL_BITS
_LOW_MASK = (1 << _LOW_BITS) - 1


@dataclass(frozen=True)
class PiResult:
    """One run: what was counted, the estimate and how fast it went."""

    samples: int
    hits: int                # samples inside the quarter disk
    estimate: float          # 4 * hits / samples
    stderr: float            # standard error of the estimate: 4 * sqrt(p (1 - p) / n)
    elapsed_s: float
    threads: int             # worker threads that ran (never more than there are blocks)
    seed: int
    hostname: str
    samples_per_s: float
    ns_per_sample_per_core: float  # elapsed * busy cores / samples

    @property
    def pi_error(self) -> float:
        return self.estimate - math.pi

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "pi_error": self.pi_error}



def usable_cores() -> int:
    """Cores this process may run on (a taskset or cgroup may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1

def block_generator(seed: int, block: int) -> np.random.SFC64:
    """The generator for one block: a function of (seed, block index) only."""
    return np.random.SFC64(np.random.SeedSequence(seed, spawn_key=(block,)))


class Counter:
    """One thread's preallocated buffers and the in-circle count (exact: see the module docstring)."""

    def __init__(self, chunk: int = CHUNK) -> None:
        self.chunk = chunk
        self.cells = np.empty(2 * chunk, dtype=np.uint16)   # x cells, then y cells; squared in place
        self.flag = np.empty(chunk, dtype=np.bool_)

    def count(self, gen: np.random.BitGenerator, n: int) -> int:
        """Hits among the next ``n`` samples drawn from ``gen``."""
        assert 0 < n <= self.chunk
        # 16 bits a sample: x cell in bits 0-6, y cell in bits 9-15 (bits 7-8 unused).
        codes = gen.random_raw(-(-n // 4)).view(np.uint16)[:n]
        cells, flag = self.cells[: 2 * n], self.flag[:n]
        x, y = cells[:n], cells[n:]
        np.bitwise_and(codes, _CELL_MAX, out=x)
        np.right_shift(codes, 16 - CELL_BITS, out=y)
        np.multiply(cells, cells, out=cells)
        r2 = np.add(x, y, out=x)                           # x*x + y*y in cells, at most 2 * 127**2
        np.less_equal(r2, _BAND, out=flag)
        hits = int(np.count_nonzero(flag))                 # whole cell inside
        np.subtract(r2, _BAND + 1, out=r2)                 # wraps below the band: one compare finds it
        np.less(r2, _BAND_WIDTH, out=flag)
        band = np.flatnonzero(flag)
        if len(band):
            hits += self._refine(gen, codes[band])
        return hits

    @staticmethod
    def _refine(gen: np.random.BitGenerator, codes: NDArray[np.uint16]) -> int:
        """Hits among samples whose cell the circle may cross: draw the low bits, test exactly."""
        k = len(codes)
        xy = np.empty(2 * k, dtype=np.uint64)               # X, then Y: 32-bit coordinates
        np.bitwise_and(codes, _CELL_MAX, out=xy[:k])
        np.right_shift(codes, 16 - CELL_BITS, out=xy[k:])
        xy <<= _LOW_BITS
        low = gen.random_raw(k).view(np.uint32)             # k words, 2k halves: X's low bits, then Y's
        low &= _LOW_MASK
        xy |= low
        xy *= xy                                            # < 2**64: exact
        np.invert(xy[k:], out=xy[k:])                       # 2**64 - 1 - Y*Y
        return int(np.count_nonzero(xy[:k] <= xy[k:]))      # X*X + Y*Y < 2**64

    def block(self, seed: int, index: int, samples: int, stop: threading.Event | None = None) -> int:
        """Hits in block ``index`` (its first ``samples`` samples; fewer than BLOCK only for the last one)."""
        gen = block_generator(seed, index)
        hits = 0
        done = 0
        while done < samples:
            if stop is not None and stop.is_set():
                return hits
            n = min(self.chunk, samples - done)
            hits += self.count(gen, n)
            done += n
        return hits


def estimate_pi(samples: int, seed: int | None = None, threads: int | None = None,
                progress: Callable[[int], None] | None = None) -> PiResult:
    """Count ``samples`` random points of [0, 1)**2 inside the quarter disk, on ``threads`` threads.

    The same ``seed`` gives the same hits whatever ``threads`` is; ``seed=None`` draws one
    (it is in the result, so the run can be repeated). ``progress`` is called from this
    thread with the number of samples done so far, about every PROGRESS_EVERY_S.
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if seed is None:
        seed = secrets.randbits(32)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    blocks = -(-samples // BLOCK)
    workers = max(1, min(threads or usable_cores(), blocks))

    lock = threading.Lock()
    stop = threading.Event()
    state = {"next": 0, "hits": 0, "done": 0}
    errors: list[BaseException] = []

    def work() -> None:
        counter = Counter()
        try:
            while not stop.is_set():
                with lock:
                    index = state["next"]
                    state["next"] += 1
                if index >= blocks:
                    return
                n = min(BLOCK, samples - index * BLOCK)
                hits = counter.block(seed, index, n, stop)
                with lock:
                    state["hits"] += hits
                    state["done"] += n
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread, which re-raises it
            errors.append(exc)
            stop.set()

    start = time.perf_counter()
    pool = [threading.Thread(target=work, name=f"piwork-{i}", daemon=True) for i in range(workers)]
    for t in pool:
        t.start()
    try:
        for t in pool:
            while t.is_alive():
                t.join(PROGRESS_EVERY_S if progress else None)
                if progress is not None:
                    progress(state["done"])
    finally:
        stop.set()  # on KeyboardInterrupt the workers stop after their current chunk
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]

    hits = state["hits"]
    p = hits / samples
    return PiResult(
        samples=samples, hits=hits, estimate=4.0 * p, stderr=4.0 * math.sqrt(p * (1.0 - p) / samples),
        elapsed_s=elapsed, threads=workers, seed=seed, hostname=socket.gethostname(),
        samples_per_s=samples / elapsed if elapsed > 0 else 0.0,
        ns_per_sample_per_core=elapsed * min(workers, usable_cores()) / samples * 1e9,
    )


# ---------------------------------------------------------------- CLI

def _count(n: float) -> str:
    for unit, size in (("billion", 1e9), ("million", 1e6)):
        if n >= size:
            return f" ({n / size:.4g} {unit})"
    return ""


def _rate(per_s: float) -> str:
    return f"{per_s / 1e6:,.1f} million/s" if per_s >= 1e6 else f"{per_s:,.0f}/s"


def format_result(r: PiResult, millions: str | None = None) -> str:
    """The text report (pure: result in, lines out)."""
    sigmas = abs(r.pi_error) / r.stderr if r.stderr > 0 else math.inf
    repeat = f"  (repeat: piwork {millions} --seed {r.seed})" if millions else ""
    return "\n".join([
        f"pi ≈ {r.estimate:.8f}   error {r.pi_error:+.8f} = {sigmas:.1f} standard errors of {r.stderr:.8f}",
        f"samples  {r.samples:,}{_count(r.samples)}, {r.hits:,} inside the circle",
        f"host     {r.hostname}, {r.threads} thread{'s' if r.threads != 1 else ''}",
        f"time     {r.elapsed_s:.3f} s, {_rate(r.samples_per_s)}, {r.ns_per_sample_per_core:.2f} ns/sample/core",
        f"seed     {r.seed}{repeat}",
    ])


def _run_with_progress(samples: int, seed: int | None, threads: int) -> PiResult:
    """A transient rich progress line, shown only once a run has taken a moment."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("piwork"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                   console=stdout_console(), transient=True)
    task = bar.add_task("samples", total=samples)
    started = time.monotonic()

    def update(done: int) -> None:
        if not bar.live.is_started and time.monotonic() - started > 0.3:
            bar.start()
        bar.update(task, completed=done)

    try:
        return estimate_pi(samples, seed, threads, progress=update)
    finally:
        bar.stop()


@click.command(context_settings={"help_option_names": ["-h", "-help", "--help"]})
@version_option("piwork", hidden_verbose=True)
@click.argument("millions", metavar="N", type=str)
@click.option("-seed", "--seed", type=click.IntRange(0, 2**64 - 1), default=None,
              help="Seed for a reproducible run (the same hits for any thread count). Default: a random one, printed.")
@click.option("-threads", "--threads", type=click.IntRange(1, MAX_THREADS), default=None,
              help="Worker threads (default: all cores; each uses ~4 MiB).")
@option_json()
def cli(millions: str, seed: int | None, threads: int | None, as_json: bool) -> None:
    """Estimate pi by Monte Carlo with N million samples (N may be a fraction: 0.5)."""
    samples = parse_millions(millions)
    threads = threads or usable_cores()
    if as_json or not sys.stdout.isatty():
        result = estimate_pi(samples, seed, threads)
    else:
        result = _run_with_progress(samples, seed, threads)
    if as_json:
        print_json(result.to_json())
    else:
        click.echo(format_result(result, millions if seed is None else None))


def parse_millions(text: str) -> int:
    """N (millions, possibly fractional) as a sample count; a click.BadParameter when out of range."""
    try:
        millions = float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a number", param_hint="N") from None
    if not math.isfinite(millions) or millions <= 0 or millions > MAX_MILLIONS:
        raise click.BadParameter(_out_of_range(text), param_hint="N")
    samples = round(millions * 1e6)
    if samples < 1:
        raise click.BadParameter(f"{text} million is less than one sample", param_hint="N")
    return samples


def _out_of_range(text: str) -> str:
    return f"{text} is out of range: N is millions of samples, more than 0 and at most {MAX_MILLIONS:,.0f}"


_NEGATIVE = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_TAKES_VALUE = {"-seed", "--seed", "-threads", "--threads"}


def main() -> NoReturn:
    # click reads a negative N ("piwork -3") as an unknown flag; say what is really wrong.
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if _NEGATIVE.fullmatch(arg) and (i == 0 or argv[i - 1] not in _TAKES_VALUE):
            fail(PROG, f"Invalid value for N: {_out_of_range(arg)} (see `{PROG} -h`)", EXIT_USAGE)
    run_command(cli, PROG)


if __name__ == "__main__":
    main()
