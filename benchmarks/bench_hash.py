"""CPU hashing against OpenSSL, measured in the same run.

Target (jobs issue): "cpu hashing: per-core rate >= 0.90 x `openssl speed -bytes 16384 sha256`
measured in the same run; two threads >= 1.8 x one."

It measures OpenSSL's own single-core SHA-256 rate, then each workload from one thread and
from two, against it:

* ``hashlib`` (the baseline): hashlib.sha256 over 1 MiB buffers (DESIGN.md: the GIL is released
  for large buffers), one digest per buffer, one Python thread per thread counted;
* ``hash_units`` (the daemon's real cpu workload): ``vesta.workloads.hash_units`` over a job far
  larger than the measurement, with its own ``threads=`` pool, stopped through its ``cancel``
  event; bytes = iterations (counted by its ``progress`` callback) x 64.

A workload is any ``run(threads, stop) -> bytes hashed`` that hashes on ``threads`` threads until
``stop`` is set; ``to_measure()`` lists them and every one is measured and checked the same way.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from common import LoadWatch, Report, settle

from vesta import workloads

HashFn = Callable[[threading.Event], int]          # one thread's loop: hash until stop, bytes hashed
Workload = Callable[[int, threading.Event], int]   # (threads, stop) -> bytes hashed by all of them

SECONDS = 2.0
MIB = 1 << 20
PER_CORE_VS_OPENSSL = 0.90
TWO_VS_ONE = 1.8


def measure(workload: Workload, threads: int, seconds: float = SECONDS) -> dict[str, float]:
    """Run ``workload`` on ``threads`` threads for about ``seconds``; total and per-thread MB/s (1 MB = 1e6 bytes)."""
    stop = threading.Event()
    done: list[int] = [0]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            done[0] = workload(threads, stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the measuring thread
            errors.append(exc)

    driver = threading.Thread(target=run, daemon=True)
    start = time.perf_counter()
    driver.start()
    time.sleep(seconds)
    stop.set()
    driver.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    total = done[0] / elapsed / 1e6
    return {"threads": threads, "seconds": elapsed, "bytes": done[0], "mb_s": total,
            "mb_s_per_thread": total / threads}


def per_thread(hash_fn: HashFn) -> Workload:
    """A workload running ``hash_fn`` in ``threads`` plain Python threads."""
    def workload(threads: int, stop: threading.Event) -> int:
        done: list[int] = [0] * threads
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                done[i] = hash_fn(stop)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        pool = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        if errors:
            raise errors[0]
        return sum(done)
    return workload


def hashlib_sha256(buffer_bytes: int = MIB) -> HashFn:
    """hashlib.sha256 over a deterministic buffer of its own, one digest per buffer (DESIGN.md "cpu workload")."""
    def hash_fn(stop: threading.Event) -> int:
        buf = (bytes(range(256)) * (buffer_bytes // 256 + 1))[:buffer_bytes]
        hashed = 0
        while not stop.is_set():
            hashlib.sha256(buf).digest()
            hashed += buffer_bytes
        return hashed
    return hash_fn


def hash_units_workload(threads: int, stop: threading.Event) -> int:
    """The daemon's cpu workload: ``workloads.hash_units`` with its own thread pool, until ``stop``.

    The job is far larger than any measurement (10,000 units = 64 GiB), so it is always stopped
    through ``cancel``; each finished segment reports its iterations (64 bytes each) to ``progress``.
    """
    units = 10_000
    counted: list[int] = [0]
    lock = threading.Lock()

    def progress(n: int) -> None:
        with lock:                      # called from every worker thread, once per 1 MiB segment
            counted[0] += n

    try:
        workloads.hash_units("bench-hash", units * workloads.UNIT, 0, units, threads=threads,
                            cancel=stop, progress=progress)
    except workloads.Cancelled:
        pass
    else:
        raise RuntimeError("hash_units finished a 64 GiB job before the measurement ended")
    return counted[0] * workloads.BLOCK


def to_measure() -> dict[str, Workload]:
    """What to measure, by short name: the plain-hashlib baseline and the daemon's own cpu workload."""
    return {
        "hashlib": per_thread(hashlib_sha256()),    # hashlib.sha256 over 1 MiB buffers, one thread each
        "hash_units": hash_units_workload,          # vesta.workloads.hash_units(threads=N)
    }


def openssl_sha256_mb_s(seconds: int = int(SECONDS)) -> tuple[float | None, str]:
    """``openssl speed -bytes 16384 sha256`` in MB/s (one core), or None and why not."""
    exe = shutil.which("openssl")
    if exe is None:
        return None, "openssl not installed"
    try:
        out = subprocess.run([exe, "speed", "-bytes", "16384", "-seconds", str(seconds), "sha256"],
                             capture_output=True, text=True, timeout=seconds * 10 + 30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"openssl speed failed: {exc}"
    # The last table line: "sha256    1527529.47k" (thousands of bytes per second).
    for line in reversed(out.stdout.splitlines()):
        m = re.match(r"\s*sha256\s+([\d.]+)k\s*$", line)
        if m:
            return float(m.group(1)) / 1000, "openssl speed -bytes 16384 sha256, 1 core"
    return None, f"could not parse openssl speed output (exit {out.returncode})"


def main() -> None:
    report = Report("hash", "cpu hashing: SHA-256 rate vs OpenSSL (hashlib: hashlib.sha256 over 1 MiB buffers; "
                            "hash_units: the daemon's cpu workload, vesta.workloads.hash_units)")
    report.extra["busy_pct_before"] = settle()

    with LoadWatch() as load:
        openssl, how = openssl_sha256_mb_s()
    report.row("openssl sha256", openssl, "MB/s", how + _busy(load))
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, fn in to_measure().items():
        measure(fn, 1, 0.2)   # warm-up
        with LoadWatch() as load1:
            one = measure(fn, 1)
        with LoadWatch() as load2:
            two = measure(fn, 2)
        results[name] = {"1": one, "2": two}
        ratio = two["mb_s"] / one["mb_s"] if one["mb_s"] else 0.0
        vs = one["mb_s"] / openssl if openssl else None
        report.row(f"{name}: 1 thread", one["mb_s"], "MB/s",
                   (f"{vs:.2f} x openssl" if vs is not None else "") + _busy(load1))
        report.row(f"{name}: 2 threads", two["mb_s"], "MB/s",
                   f"{two['mb_s_per_thread']:,.0f} MB/s per thread" + _busy(load2))
        report.row(f"{name}: 2 threads / 1", ratio, "x", f"target ≥ {TWO_VS_ONE}")
        if name == "hash_units":   # the daemon's unit of work: one iteration = one 64-byte block
            report.row(f"{name}: iterations/s", one["mb_s"] / workloads.BLOCK, "million/s",
                       f"1 thread; {two['mb_s'] / workloads.BLOCK:.1f} million/s on 2 threads")
        report.target(f"{name} per core ≥ {PER_CORE_VS_OPENSSL} x openssl", None if vs is None else
                      vs >= PER_CORE_VS_OPENSSL, f"{vs:.2f} x" if vs is not None else how)
        report.target(f"{name} 2 threads ≥ {TWO_VS_ONE} x 1", ratio >= TWO_VS_ONE, f"{ratio:.2f} x")
    report.extra["openssl_mb_s"] = openssl
    report.extra["workloads"] = results
    report.finish()


def _busy(load: LoadWatch) -> str:
    return f"; other processes busy {load.others:.1f} cores" if load.others and load.others >= 0.1 else ""


if __name__ == "__main__":
    sys.exit(main())
