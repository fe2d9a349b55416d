"""`vesta map` (the sweeps issue): 1,000 × `true` over two local daemons beside GNU parallel, and a shared --put.

Targets (sweeps issue): "1,000 × `true` through `vesta map` on two local daemons with exec on: jobs/s, with
and without the sandbox, beside GNU parallel `-j 2` running the same 1,000 locally in the same run. Target:
`vesta map` at least as many jobs/s as local GNU parallel, sandboxed." and "A sweep over 200 inputs with one
50 MiB `--put` file: the file crosses the network once per node, not once per job (bytes sent reported)."

Two real daemons on loopback, a and b, both allowing exec (the sandbox set per run: bubblewrap where it is
installed, then none). The figure is jobs / wall time of the whole `vesta map` command (its start, the sweep,
every job's record), as a user would time it; GNU parallel's is the same for `parallel -j 2 true ::: 1..1000`,
run just before each sweep. Bytes sent: the --put sweep runs on b (`--on b`: on a busy 2-core machine a
keeps the jobs otherwise, and nothing crosses), and what b received as input pieces (its counter
`input_bytes_received`) is set against 200 × 50 MiB, had every job shipped the file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from common import Report, daemons, settle

from tests.helpers import Vestad, eventually

JOBS = int(os.environ.get("VESTA_BENCH_MAP_JOBS", "1000"))
PUT_JOBS = int(os.environ.get("VESTA_BENCH_MAP_PUT_JOBS", "200"))
PUT_MIB = int(os.environ.get("VESTA_BENCH_MAP_PUT_MIB", "50"))


def gnu_parallel(n: int) -> float | None:
    """Seconds GNU parallel -j 2 takes to run ``true`` n times here (None: not installed)."""
    exe = shutil.which("parallel")
    if exe is None:
        return None
    t0 = time.perf_counter()
    subprocess.run([exe, "--will-cite", "-j", "2", "true", ":::", *map(str, range(n))], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def sweep(a: Vestad, args: list[str], timeout: float = 900) -> tuple[float, dict[str, object]]:
    """Wall seconds of one `vesta map`, and its summary."""
    t0 = time.perf_counter()
    out = a.vesta("map", "--json", *args, timeout=timeout)
    took = time.perf_counter() - t0
    last = json.loads(out.stdout.splitlines()[-1]) if out.stdout.strip() else {}
    if "sweep" not in last:
        raise RuntimeError(f"vesta map failed ({out.returncode}): {out.stderr.strip()[:300]}")
    return took, dict(last["sweep"])


def main() -> None:
    report = Report("map", f"vesta map: a sweep over two local daemons, beside GNU parallel ({os.cpu_count()} cores)")
    report.extra["busy_pct_before"] = settle()
    rates: dict[str, float] = {}
    for sandbox in ("auto", "none"):
        with daemons() as cluster:
            cfg = cluster.base / "exec.json"
            cfg.write_text(json.dumps({"allow_exec": True, "sandbox": sandbox}))
            a = cluster.add("a", interval_ms=200, args=["-config", str(cfg)])
            b = cluster.add("b", interval_ms=200, args=["-config", str(cfg)])
            eventually(lambda a=a: "b" in a.peer_names(), 15, what="a to list b")
            label = "bubblewrap" if "bubblewrap:" in b.status()["isolation"] else "no sandbox"
            sweep(a, ["--", "true", ":::", "1", "2", "3", "4"])   # opens the peer link
            local = gnu_parallel(JOBS)
            if local is not None:
                rates[f"parallel-{sandbox}"] = JOBS / local
                report.row(f"GNU parallel -j 2 true ×{JOBS}, locally", JOBS / local, "jobs/s", f"{local:.2f} s")
            took, summary = sweep(a, ["--", "true", ":::", *map(str, range(JOBS))])
            rates[sandbox] = JOBS / took
            per_node = ", ".join(f"{n} on {k}" for k, n in sorted(dict(summary["per_node"]).items()))  # type: ignore[call-overload]
            report.row(f"vesta map true ×{JOBS} ({label})", JOBS / took, "jobs/s",
                       f"{took:.2f} s for the whole command; {summary['succeeded']} succeeded, "
                       f"{summary['failed']} failed; {per_node}")
            if sandbox == "auto" and local is not None:
                report.target("vesta map sandboxed ≥ GNU parallel -j 2 locally (jobs/s)", rates["auto"] >= JOBS / local,
                              f"{rates['auto']:.0f} against {JOBS / local:.0f} jobs/s")
            if sandbox == "none":
                big = cluster.base / "big.bin"
                with open(big, "wb") as f:
                    for _ in range(PUT_MIB):
                        f.write(os.urandom(1 << 20))
                before = b.status()["counters"].get("input_bytes_received", 0)
                took, summary = sweep(a, ["--put", str(big), "--on", "b", "--", "sh", "-c", "test -s big.bin", ":::",
                                          *map(str, range(PUT_JOBS))])
                counters = b.status()["counters"]
                sent = counters.get("input_bytes_received", 0) - before
                on_b = dict(summary["per_node"]).get("b", 0)  # type: ignore[call-overload]
                naive = on_b * (PUT_MIB << 20)
                report.row(f"{PUT_JOBS} jobs with one {PUT_MIB} MiB --put: bytes sent to b", sent / (1 << 20), "MiB",
                           f"b ran {on_b} of the jobs (shipping the file with each: {naive / (1 << 20):,.0f} MiB); "
                           f"{took:.1f} s, {summary['succeeded']} succeeded", jobs_on_b=on_b, bytes=sent)
                report.target("the --put file crosses to each node once", on_b > 0 and sent == PUT_MIB << 20,
                              f"{sent / (1 << 20):.0f} MiB to b for {on_b} jobs")
    report.finish()


if __name__ == "__main__":
    sys.exit(main())
