"""What the vesta commands print, as pure functions of the daemon's answers: rows in, cells and tables out.

On a terminal they become rich tables; piped, tab-separated columns (``vesta.cli.output``). rich and the
job specs are imported inside the functions that use them: every vesta command imports this module, and
one that prints JSON or to a pipe should not pay for them.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from vesta import outcome
from vesta.cli.common import stdout_console
from vesta.errors import ConfigError

if TYPE_CHECKING:
    from rich.progress import Progress
    from rich.table import Table

    from vesta.spec import JobRequest


def mib_text(mb: float) -> str:
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


def ago(seconds: float) -> str:
    if seconds < 1:
        return "now"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    return f"{seconds / 60:.0f}m ago"


def power_text(row: dict[str, Any]) -> str:
    text = str(row["power"])
    if row.get("battery_pct") is not None:
        text += f" {row['battery_pct']:.0f}%"
    return text


PEER_COLUMNS = ("name", "address", "cores", "cpu%", "mem free", "offered", "spare", "power", "balance", "gpu",
                "last seen", "labels")
PEER_RIGHT = ("cores", "cpu%", "spare", "balance")


def peers_cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The `vesta peers` rows as cells (pure)."""
    cells = []
    for r in rows:
        name = r["name"] + (" (self)" if r["state"] == "self" else " (suspect)" if r["state"] == "suspect" else "")
        gpu = ", ".join(g["name"] for g in r.get("gpus", [])) or "-"
        cells.append([
            name, r["address"], str(r["cores"]), f"{r['cpu_pct']:.0f}", mib_text(r["mem_avail_mb"]),
            f"{r['offered_cores']:.1f} cores / {mib_text(r['offered_mem_mb'])}", f"{r['spare_cores']:.1f}",
            power_text(r) + (" (closed)" if r.get("lending") == "closed" else ""),
            "-" if r.get("balance") is None else f"{r['balance']:+.0f}", gpu,
            "-" if r["state"] == "self" else ago(r["last_seen_s"]), ",".join(r.get("labels") or []) or "-",
        ])
    return cells


def peers_table(rows: list[dict[str, Any]]) -> Table:
    """The `vesta peers` table as a terminal shows it (pure: rows in, table out)."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in PEER_COLUMNS:
        table.add_column(col, justify="right" if col in PEER_RIGHT else "left")
    for r, cells in zip(rows, peers_cells(rows), strict=True):
        table.add_row(*cells, style="dim" if r["state"] == "suspect" else None)
    return table


def status_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """The `vesta status` key/value lines (pure)."""
    node, power, budget = s["node"], s["power"], s["budget"]
    battery = f", battery {power['battery_pct']:.0f}% {power['battery_status'] or ''}".rstrip() \
        if power["battery_pct"] is not None else ""
    counters = s["counters"]
    dropped = {k.removeprefix("dropped_"): v for k, v in counters.items() if k.startswith("dropped_")}
    rows = [
        ("name", s["name"]),
        ("fingerprint", s["fingerprint"]),
        ("federation key id", f"{s['key_id']}  (must match on every node)"),
        ("version", f"{s['version']}  pid {s['pid']}"),
        ("peer port (TCP)", f"{s['bind']}:{s['port']}"),
        ("discovery (UDP)", f"{s['dport']}, beacon every {s['beacon_interval_ms']} ms"
         + (f", seeds {', '.join(s['seeds'])}" if s["seeds"] else "")),
        ("control socket", s["socket"]),
        ("state dir", s["state_dir"]),
        ("uptime", duration(s["uptime_s"])),
        ("load", f"cpu {node['cpu_pct']:.0f}% of {node['cores']} cores, "
                 f"{mib_text(node['mem_avail_mb'])} free of {mib_text(node['mem_total_mb'])}"),
        ("power", f"{power['mode']} ({'forced' if power['forced'] else 'auto'}), "
                  f"willingness {power['willingness'] * 100:.0f}%{battery}"),
        ("offered", f"{budget['offered_cores']:.1f} cores, {mib_text(budget['offered_mem_mb'])} "
                    f"(cpu_offer_pct {budget['cpu_offer_pct']}, reserve {budget['reserve_pct']}%, "
                    f"mem cap {budget['mem_offer_mb']} MiB)"),
        ("spare now", f"{budget['spare_cores']:.1f} cores"),
        ("exec", ("allowed" + (f" for {', '.join(s['exec_allowlist'])}" if s["exec_allowlist"] else " (any command)"))
         if s["allow_exec"] else "off"),
        *([("exec WARNING", f"{', '.join(s['exec_code_runners'])} run code from their arguments or input files: "
                            "every key holder may run any program here")] if s.get("exec_code_runners") else []),
        ("isolation", s["isolation"]),
        ("lending hours", s["lending"]["describe"]),
        ("ledger", f"lent {s['ledger']['lent']:.0f} core-s, borrowed {s['ledger']['borrowed']:.0f} core-s "
                   f"with {s['ledger']['peers']} peers (vesta ledger)"),
        ("peers", f"{s['peers']['alive']} alive, {s['peers']['suspect']} suspect"),
        ("beacons", f"{counters.get('beacons_sent', 0)} sent, {counters.get('beacons_accepted', 0)} accepted"),
        ("dropped packets", ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"),
    ]
    if node.get("gpus"):
        rows.append(("gpu", ", ".join(f"{g['name']} ({mib_text(g['mem_total_mb'])})" for g in node["gpus"])))
    return rows


def duration(seconds: float) -> str:
    seconds = int(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return f"{d}d {h}h {m}m" if d else f"{h}h {m}m {s}s" if h else f"{m}m {s}s"

def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def took(job: dict[str, Any]) -> str:
    if job.get("started") and job.get("finished"):
        return f"{job['finished'] - job['started']:.2f}s"
    return "-"


def what(kind: str, args: dict[str, Any]) -> str:
    if kind == "cpu":
        return f"cpu {args.get('iterations', 0) / 1e6:g}M" if "iterations" in args and "count" not in args \
            else f"cpu units {args.get('start', 0)}+{args.get('count', 0)}"
    if kind == "mem":
        return f"mem {args.get('mib')} MiB {args.get('ms')} ms"
    if kind == "sweep":
        counts = {k: v for k, v in (args.get("counts") or {}).items() if v}
        return (f"map {' '.join(args.get('template', []))[:40]}: {args.get('total', 0)} jobs"
                + (" (" + ", ".join(f"{v} {k}" for k, v in counts.items()) + ")" if counts else ""))
    return "exec " + " ".join(args.get("argv", []))[:60]


def reason_cell(row: dict[str, Any], said: str) -> str:
    reason = str(row.get("reason") or "")
    return "" if reason == said or (said == outcome.TIMED_OUT and reason.startswith("timed out")) else reason


JOB_COLUMNS = ("job", "what", "ran on", "created", "took", "outcome", "reason")
HOSTED_COLUMNS = ("run", "job", "for", "what", "started", "took", "outcome", "cpu s", "reason")


def jobs_cells(rows: list[dict[str, Any]], hosted: bool) -> tuple[tuple[str, ...], list[list[str]]]:
    """`vesta jobs` as columns and cells (pure); a gathered listing (--all) starts with the keeping node."""
    gathered = any("node" in r for r in rows)
    cols = HOSTED_COLUMNS if hosted else JOB_COLUMNS
    cells = []
    for r in rows:
        node = [f"{r.get('node', '')} {str(r.get('node_id', ''))[:8]}".strip()] if gathered else []
        if r.get("state") == "unreachable":
            row = {c: "-" for c in cols} | {"outcome": "unreachable", "reason": str(r.get("reason", ""))}
            cells.append(node + [row[c] for c in cols])
            continue
        described = what(str(r.get("kind")), r.get("args") or {})
        said = outcome.of_job(r)
        if hosted:
            cells.append(node + [str(r["id"]), str(r["job_id"]), str(r["peer"]), described, when(r["started"]), took(r),
                                 said, f"{r.get('cpu_s') or 0:.2f}", reason_cell(r, said)])
        else:
            cells.append(node + [str(r["id"]), described, ", ".join(r.get("ran_on") or []) or "-", when(r["created"]),
                                 took(r), said, reason_cell(r, said)])
    return (("node",) if gathered else ()) + cols, cells

def ledger_table(data: dict[str, Any]) -> Table:
    """The `vesta ledger` table (pure)."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in LEDGER_COLUMNS:
        table.add_column(col, justify="left" if col in ("peer", "state") else "right")
    for cells in ledger_cells(data):
        table.add_row(*cells)
    return table


LEDGER_COLUMNS = ("peer", "lent", "borrowed", "balance", "cap", "state")


def ledger_cells(data: dict[str, Any]) -> list[list[str]]:
    return [[f"{r['name']} ({r['fingerprint'][:8]})", f"{r['lent']:.1f}", f"{r['borrowed']:.1f}",
             f"{r['balance']:+.1f}", f"{r['cap']:.0f}", r["state"]] for r in data["peers"]]


PLACEMENT_COLUMNS = ("node", "chosen", "slots", "why not")


def placement_cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    """A job's placement decision, "why not there?" (pure): each node, chosen or not, its slots in use
    and in all when the job was placed, and why not."""
    return [[r["node"], "yes" if r["chosen"] else "no", f"{r['used']}/{r['slots']}", r["why"] or "-"]
            for r in rows]

class ProgressLine:
    """A transient rich progress line, only on a terminal and never with --json."""

    def __init__(self, total: float, label: str, show: bool) -> None:
        self.show = show and sys.stdout.isatty()
        self.total = total
        self.label = label
        self.bar: Progress | None = None
        self.task: Any = None

    def __enter__(self) -> ProgressLine:
        if self.show:
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                TimeElapsedColumn(), transient=True, console=stdout_console())
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.total)
        return self

    def event(self, ev: dict[str, Any]) -> None:
        if self.bar is None:
            return
        if ev.get("type") == "start" and ev.get("nodes"):
            self.bar.update(self.task, description=f"{self.label} on {', '.join(ev['nodes'])}")
        elif ev.get("type") == "progress":
            self.bar.update(self.task, completed=ev.get("done", 0))
        elif ev.get("type") == "replaced":
            self.bar.console.print(f"[yellow]chunk {ev['chunk']} moved off {ev['node']}: {ev['why']}[/]")

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def rate_text(it_per_s: float) -> str:
    return f"{it_per_s / 1e6:.1f} M it/s ({it_per_s * 64 / 1e9:.2f} GB/s)"


def job_exit_code(job: dict[str, Any]) -> int:
    """What `vesta wait` exits with for one job: its exit code, 128+N for signal N, 1 if it failed without
    one, 0 if it succeeded."""
    code = job.get("exit_code")
    if isinstance(code, int) and code != 0:
        return code
    signal = (job.get("result") or {}).get("signal") if isinstance(job.get("result"), dict) else None
    if signal:
        return 128 + int(signal)
    return 0 if job["state"] == "succeeded" else 1


def rerun_request(job: dict[str, Any]) -> JobRequest:
    """The request that submits a recorded job again, as it was submitted (pure): a job's args in the records
    are its request (JobRequest.to_wire)."""
    from vesta.spec import JobRequest

    request = JobRequest.from_wire(job["kind"], job.get("args") or {})
    inputs = getattr(request.spec, "inputs", ())
    if inputs:
        names = " ".join(f"--put {i.path}" for i in inputs)
        argv = " ".join(getattr(request.spec, "argv", ()))
        raise ConfigError(f"{job['id']} shipped files ({', '.join(i.path for i in inputs)}), and a node keeps them "
                          f"only while the job runs: submit it again from the files with "
                          f"vesta exec {names} -- {argv}")
    return request


def bytes_text(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


def gc_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """`vesta gc`: what retention removed (or, dry, would remove)."""
    verb = "would remove" if r["dry_run"] else "removed"
    rows = [("records", f"{verb} {r['jobs']} job(s) that ended over {r['keep_days']:g} days ago "
                        f"({bytes_text(r['log_bytes'])} of output) and {r['hosted']} hosted run(s)"),
            ("artifacts", f"{verb} the files of {r['artifact_jobs']} job(s), {bytes_text(r['artifact_bytes'])}"),
            ("artifacts on disk", f"{bytes_text(r['artifacts_before'])} -> {bytes_text(r['artifacts_after'])} "
                                  f"(keep_artifacts_mb {r['keep_artifacts_bytes'] >> 20})")]
    if r.get("unprunable_bytes"):
        rows.append(("kept", f"{bytes_text(r['unprunable_bytes'])} of files of jobs still queued or running"))
    if r["dry_run"]:
        rows.append(("dry run", "nothing was changed; run `vesta gc` to remove it"))
    return rows
