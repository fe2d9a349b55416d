"""Built-in workloads: cpu hashing, memory holding, local stress, and a host's runs of cpu and mem chunks.

**cpu.** One iteration is one SHA-256 compression of a 64-byte block. A job
of N iterations is cut into *units* of ``UNIT`` iterations (the last one
shorter); a unit is hashed as 1 MiB segments of a deterministic buffer, each
segment prefixed by one block naming (job, unit, segment), and the unit's
digest is SHA-256 over its segment digests. The job's digest is SHA-256 over
its unit digests in order. So a digest depends only on (job id, unit index,
size): any node can re-check any unit, and the job digest is the same however
the units were spread over nodes and threads. ``hashlib`` releases the GIL
for large buffers, so one thread per granted core uses every core.

**mem.** Allocate, touch every page (so it is really resident), hold, free.

Work runs in threads; every loop checks its stop switch (``Cancel``) so cancel
takes effect within one segment (about a millisecond).
"""

from __future__ import annotations

import asyncio
import hashlib
import mmap
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vesta import proto
from vesta.errors import Cancelled, Refused
from vesta.proto import CPU_UNIT
from vesta.spec import CpuSpec, MemSpec

__all__ = ["Cancelled"]


class Cancel(Protocol):
    """A run's stop switch as the work sees it (``tasks.StopFlag``, or a ``threading.Event``)."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...

HOSTNAME = socket.gethostname()
INLINE_ITERATIONS = 4096  # a cpu chunk this small (256 KiB, ~0.2 ms) is hashed on the event loop, not in a thread

BLOCK = 64                         # bytes per iteration (one SHA-256 compression)
SEGMENT_BLOCKS = 16384             # 1 MiB per hashlib call: large enough to release the GIL
UNIT = CPU_UNIT                    # iterations per unit (64 MiB hashed, ~0.05-0.5 s on one core)
PAGE = 4096


def units_for(iterations: int) -> int:
    return -(-iterations // UNIT)


def unit_size(iterations: int, index: int) -> int:
    return max(0, min(UNIT, iterations - index * UNIT))


def _unit_seed(job_id: str, index: int, size: int) -> bytes:
    return hashlib.sha256(f"vesta-cpu-v1|{job_id}|{index}|{size}".encode()).digest()


def unit_digest(job_id: str, index: int, size: int, *, cancel: Cancel | None = None,
                progress: Callable[[int], None] | None = None) -> bytes:
    """Hash one unit of ``size`` iterations; the result depends only on the arguments."""
    seed = _unit_seed(job_id, index, size)
    # no bigger than the unit needs: a 1 MiB buffer for a 1-iteration unit was most of a tiny job's work on its host
    buf = memoryview(seed * (min(size, SEGMENT_BLOCKS) * BLOCK // len(seed)))
    outer = hashlib.sha256()
    done, segment = 0, 0
    while done < size:
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        n = min(SEGMENT_BLOCKS, size - done)
        # the first block names the segment; the remaining n-1 blocks come from the shared buffer
        h = hashlib.sha256(seed + segment.to_bytes(32, "big"))
        if n > 1:
            h.update(buf[: (n - 1) * BLOCK])
        outer.update(h.digest())
        done += n
        segment += 1
        if progress is not None:
            progress(n)
    return outer.digest()


def job_digest(unit_digests: list[bytes]) -> str:
    """The digest of a whole cpu job from its unit digests, in unit order."""
    return hashlib.sha256(b"".join(unit_digests)).hexdigest()


@dataclass(frozen=True, slots=True)
class CpuResult:
    digests: list[bytes]     # one per unit, in order
    iterations: int
    elapsed_s: float
    cpu_s: float             # thread CPU time actually used


def hash_units(job_id: str, iterations: int, start: int, count: int, *, threads: int = 1,
               cancel: Cancel | None = None,
               progress: Callable[[int], None] | None = None) -> CpuResult:
    """Hash units [start, start+count) of a job of ``iterations`` with ``threads`` threads (blocking)."""
    indexes = list(range(start, start + count))
    digests: dict[int, bytes] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    cpu_total = [0.0]
    t0 = time.perf_counter()

    def worker() -> None:
        c0 = time.thread_time()
        try:
            while True:
                with lock:
                    if not indexes or errors:
                        return
                    index = indexes.pop(0)
                d = unit_digest(job_id, index, unit_size(iterations, index), cancel=cancel, progress=progress)
                with lock:
                    digests[index] = d
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            with lock:
                errors.append(exc)
        finally:
            with lock:
                cpu_total[0] += time.thread_time() - c0

    n_threads = max(1, min(threads, count))
    if n_threads == 1:
        worker()   # already on a worker thread (or the caller's): no thread to start and join
    else:
        pool = [threading.Thread(target=worker, name=f"cpu-{job_id}-{i}", daemon=True) for i in range(n_threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    if errors:
        raise errors[0]
    done = sum(unit_size(iterations, i) for i in range(start, start + count))
    return CpuResult([digests[i] for i in range(start, start + count)], done,
                     time.perf_counter() - t0, cpu_total[0])


def measure_hash_rate(seconds: float = 0.2) -> float:
    """Iterations per second of one core, for advertising in beacons."""
    t0 = time.perf_counter()
    c0 = time.thread_time()
    done = 0
    index = 0
    while time.perf_counter() - t0 < seconds:
        unit_digest("rate-probe", index, SEGMENT_BLOCKS * 8)
        done += SEGMENT_BLOCKS * 8
        index += 1
    spent = max(time.thread_time() - c0, 1e-6)
    return done / spent


@dataclass(frozen=True, slots=True)
class MemResult:
    mib: int
    held_s: float
    touch_s: float
    resident_mib: float


def hold_memory(mib: int, ms: int, cancel: Cancel | None = None) -> MemResult:
    """Allocate ``mib`` MiB, write every page, hold it ``ms`` ms (or until cancelled), free it."""
    size = mib * 1024 * 1024
    t0 = time.perf_counter()
    area = mmap.mmap(-1, max(size, PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        ones = b"\x01" * len(range(0, size, PAGE))
        area[0:size:PAGE] = ones          # one write per page: the kernel must back each with RAM
        touch = time.perf_counter() - t0
        resident = sum(area[0:size:PAGE]) * PAGE / 1024 / 1024
        deadline = time.monotonic() + ms / 1000
        while (left := deadline - time.monotonic()) > 0:
            if cancel is not None and cancel.wait(min(left, 0.05)):
                raise Cancelled()
            if cancel is None:
                time.sleep(min(left, 0.05))
        return MemResult(mib, time.perf_counter() - t0 - touch, touch, resident)
    finally:
        area.close()


class Stress:
    """Pin cores of this machine with busy threads (so that new work spills to peers)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.cores = 0

    @property
    def active(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def start(self, cores: int, seconds: float) -> None:
        self.stop()
        self._stop = threading.Event()
        stop = self._stop
        self.cores = cores
        until = time.monotonic() + seconds

        def burn() -> None:
            data = b"\x00" * (SEGMENT_BLOCKS * BLOCK)
            while not stop.is_set() and time.monotonic() < until:
                hashlib.sha256(data).digest()

        self._threads = [threading.Thread(target=burn, name=f"stress-{i}", daemon=True) for i in range(cores)]
        for t in self._threads:
            t.start()

    def stop(self) -> bool:
        was = self.active
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        self._threads = []
        return was


def is_inline(offer: proto.Offer) -> bool:
    """A cpu chunk of one small unit: it hashes in microseconds, so it runs on the event loop."""
    return (isinstance(offer.spec, CpuSpec) and offer.count == 1
            and unit_size(offer.spec.iterations, offer.start) <= INLINE_ITERATIONS)


def run_inline(offer: proto.Offer, cancel: Cancel, node: str,
               progress: Callable[[int], None]) -> proto.Result | None:
    """Run a tiny cpu chunk right here (None if it is not one, see ``is_inline``).

    On the loop it skips two thread hand-offs (to_thread, then hash_units' own worker), which cost
    ~0.5 ms of a 1-iteration job (benchmarks/bench_dispatch.py)."""
    if not is_inline(offer):
        return None
    t0 = time.perf_counter()
    c0 = time.thread_time()
    assert isinstance(offer.spec, CpuSpec)
    size = unit_size(offer.spec.iterations, offer.start)
    try:
        digest = unit_digest(offer.job_id, offer.start, size, cancel=cancel, progress=progress)
    except Cancelled:
        return proto.Result(rid=offer.rid, ok=False, node=node, hostname=HOSTNAME,
                            elapsed_s=time.perf_counter() - t0, error="cancelled")
    return proto.Result(rid=offer.rid, ok=True, node=node, hostname=HOSTNAME, digests=(digest,),
                        iterations=size, elapsed_s=time.perf_counter() - t0, cpu_s=time.thread_time() - c0)


async def run_builtin(offer: proto.Offer, cancel: Cancel, node: str,
                      progress: Callable[[int], None]) -> proto.Result:
    """Run a cpu or mem chunk in a worker thread and describe how it ended."""
    quick = run_inline(offer, cancel, node, progress)
    if quick is not None:
        return quick
    t0 = time.perf_counter()
    try:
        if isinstance(offer.spec, CpuSpec):
            r = await asyncio.to_thread(hash_units, offer.job_id, offer.spec.iterations, offer.start,
                                        offer.count, threads=1, cancel=cancel, progress=progress)
            return proto.Result(rid=offer.rid, ok=True, node=node, hostname=HOSTNAME, digests=tuple(r.digests),
                                iterations=r.iterations, elapsed_s=r.elapsed_s, cpu_s=r.cpu_s)
        if isinstance(offer.spec, MemSpec):
            m = await asyncio.to_thread(hold_memory, offer.spec.mib, offer.spec.ms, cancel)
            return proto.Result(rid=offer.rid, ok=True, node=node, hostname=HOSTNAME,
                                elapsed_s=m.held_s + m.touch_s, cpu_s=m.touch_s)
    except Cancelled:
        return proto.Result(rid=offer.rid, ok=False, node=node, hostname=HOSTNAME,
                            elapsed_s=time.perf_counter() - t0, error="cancelled")
    except MemoryError:
        return proto.Result(rid=offer.rid, ok=False, node=node, hostname=HOSTNAME,
                            elapsed_s=time.perf_counter() - t0, error="out of memory")
    raise Refused(f"{node} cannot run {offer.kind} jobs here", reason="policy")
