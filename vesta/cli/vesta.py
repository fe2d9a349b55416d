"""vesta: the control CLI. Every command talks to the local vestad and takes --json."""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click
from rich import box
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from vesta.cli.common import option_json, print_json, run_command, stdout_console
from vesta.control import ControlClient
from vesta.errors import ConfigError, InvalidJob, VestaError
from vesta.spec import MAX_TIMEOUT_S, ExecSpec, JobRequest


def _client(ctx: click.Context) -> ControlClient:
    return ControlClient.connect(ctx.obj.get("name"))


def _mb(mb: float) -> str:
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


def _ago(seconds: float) -> str:
    if seconds < 1:
        return "now"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    return f"{seconds / 60:.0f}m ago"


def _power(row: dict[str, Any]) -> str:
    text = str(row["power"])
    if row.get("battery_pct") is not None:
        text += f" {row['battery_pct']:.0f}%"
    return text


def peers_table(rows: list[dict[str, Any]]) -> Table:
    """The `vesta peers` table (pure: rows in, table out)."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("name", "address", "cores", "cpu%", "mem free", "offered", "spare", "power", "balance", "gpu",
                "last seen"):
        table.add_column(col, justify="right" if col in ("cores", "cpu%", "spare", "balance") else "left")
    for r in rows:
        name = r["name"] + (" (self)" if r["state"] == "self" else " (suspect)" if r["state"] == "suspect" else "")
        gpu = ", ".join(g["name"] for g in r.get("gpus", [])) or "-"
        table.add_row(
            name, r["address"], str(r["cores"]), f"{r['cpu_pct']:.0f}", _mb(r["mem_avail_mb"]),
            f"{r['offered_cores']:.1f} cores / {_mb(r['offered_mem_mb'])}", f"{r['spare_cores']:.1f}",
            _power(r) + (" (closed)" if r.get("lending") == "closed" else ""),
            "-" if r.get("balance") is None else f"{r['balance']:+.0f}", gpu,
            "-" if r["state"] == "self" else _ago(r["last_seen_s"]),
            style="dim" if r["state"] == "suspect" else None,
        )
    return table


def status_table(s: dict[str, Any]) -> Table:
    """The `vesta status` key/value table."""
    node, power, budget = s["node"], s["power"], s["budget"]
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
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
        ("uptime", _duration(s["uptime_s"])),
        ("load", f"cpu {node['cpu_pct']:.0f}% of {node['cores']} cores, "
                 f"{_mb(node['mem_avail_mb'])} free of {_mb(node['mem_total_mb'])}"),
        ("power", f"{power['mode']} ({'forced' if power['forced'] else 'auto'}), "
                  f"willingness {power['willingness'] * 100:.0f}%{battery}"),
        ("offered", f"{budget['offered_cores']:.1f} cores, {_mb(budget['offered_mem_mb'])} "
                    f"(cpu_offer_pct {budget['cpu_offer_pct']}, reserve {budget['reserve_pct']}%, "
                    f"mem cap {budget['mem_offer_mb']} MiB)"),
        ("spare now", f"{budget['spare_cores']:.1f} cores"),
        ("exec", ("allowed" + (f" for {', '.join(s['exec_allowlist'])}" if s["exec_allowlist"] else " (any command)"))
         if s["allow_exec"] else "off"),
        ("isolation", s["isolation"]),
        ("lending hours", s["lending"]["describe"]),
        ("ledger", f"lent {s['ledger']['lent']:.0f} core-s, borrowed {s['ledger']['borrowed']:.0f} core-s "
                   f"with {s['ledger']['peers']} peers (vesta ledger)"),
        ("peers", f"{s['peers']['alive']} alive, {s['peers']['suspect']} suspect"),
        ("beacons", f"{counters.get('beacons_sent', 0)} sent, {counters.get('beacons_accepted', 0)} accepted"),
        ("dropped packets", ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"),
    ]
    if node.get("gpus"):
        rows.append(("gpu", ", ".join(f"{g['name']} ({_mb(g['mem_total_mb'])})" for g in node["gpus"])))
    for k, v in rows:
        table.add_row(k, v)
    return table


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return f"{d}d {h}h {m}m" if d else f"{h}h {m}m {s}s" if h else f"{m}m {s}s"


@click.group(context_settings={"help_option_names": ["-h", "-help", "--help"]})
@click.option("-name", "--name", help="Which local vestad to talk to (default: $VESTA_NAME, or the only one).")
@click.pass_context
def cli(ctx: click.Context, name: str | None) -> None:
    """Talk to the local vestad: list peers, show status, submit work."""
    ctx.obj = {"name": name}


@cli.command()
@option_json()
@click.pass_context
def peers(ctx: click.Context, as_json: bool) -> None:
    """List this node and every peer it knows, with live load."""
    with _client(ctx) as c:
        rows = c.call("peers")
    if as_json:
        print_json(rows)
        return
    stdout_console().print(peers_table(rows))


@cli.command()
@option_json()
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show this node: identity, ports, budget, power, counters."""
    with _client(ctx) as c:
        s = c.call("status")
    if as_json:
        print_json(s)
        return
    stdout_console().print(status_table(s))


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _took(job: dict[str, Any]) -> str:
    if job.get("started") and job.get("finished"):
        return f"{job['finished'] - job['started']:.2f}s"
    return "-"


def _what(kind: str, args: dict[str, Any]) -> str:
    if kind == "cpu":
        return f"cpu {args.get('iterations', 0) / 1e6:g}M" if "iterations" in args and "count" not in args \
            else f"cpu units {args.get('start', 0)}+{args.get('count', 0)}"
    if kind == "mem":
        return f"mem {args.get('mib')} MiB {args.get('ms')} ms"
    return "exec " + " ".join(args.get("argv", []))[:60]


def jobs_table(rows: list[dict[str, Any]], hosted: bool) -> Table:
    """`vesta jobs` (pure)."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    gathered = any("node" in r for r in rows)
    cols = ("run", "job", "for", "what", "started", "took", "state", "cpu s", "exit", "reason") if hosted else \
        ("job", "what", "created", "took", "state", "exit", "reason")
    for col in (("node",) if gathered else ()) + cols:
        table.add_column(col)
    for r in rows:
        node = (str(r.get("node", "")),) if gathered else ()
        if r.get("state") == "unreachable":
            cells = {c: "-" for c in cols} | {"state": "unreachable", "reason": str(r.get("reason", ""))}
            table.add_row(*node, *(cells[c] for c in cols))
            continue
        what = _what(str(r.get("kind")), r.get("args") or {})
        code = "-" if r.get("exit_code") is None else str(r["exit_code"])
        if hosted:
            table.add_row(*node, str(r["id"]), str(r["job_id"]), str(r["peer"]), what, _when(r["started"]), _took(r),
                          str(r["state"]), f"{r.get('cpu_s') or 0:.2f}", code, str(r.get("reason") or ""))
        else:
            table.add_row(*node, str(r["id"]), what, _when(r["created"]), _took(r), str(r["state"]), code,
                          str(r.get("reason") or ""))
    return table


def ledger_table(data: dict[str, Any]) -> Table:
    """The `vesta ledger` table (pure)."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("peer", "lent", "borrowed", "balance", "cap", "state"):
        table.add_column(col, justify="left" if col in ("peer", "state") else "right")
    for r in data["peers"]:
        table.add_row(f"{r['name']} ({r['fingerprint'][:8]})", f"{r['lent']:.1f}", f"{r['borrowed']:.1f}",
                      f"{r['balance']:+.1f}", f"{r['cap']:.0f}", r["state"])
    return table


@cli.command()
@click.option("--state", "-state", "state",
              help="Only jobs in this state: queued, running, succeeded, failed, cancelled.")
@click.option("--limit", "-limit", default=20, show_default=True, help="How many, newest first.")
@click.option("--hosted", "-hosted", is_flag=True, help="What this node ran for others instead.")
@click.option("--all", "-all", "everyone", is_flag=True, help="Gather the records of every reachable member.")
@option_json()
@click.pass_context
def jobs(ctx: click.Context, state: str | None, limit: int, hosted: bool, everyone: bool, as_json: bool) -> None:
    """Jobs submitted on this node (or, with --hosted, runs it did for peers), newest first."""
    with _client(ctx) as c:
        rows = c.call("jobs", state=state, limit=limit, hosted=hosted, all=everyone)
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("no runs hosted for peers yet" if hosted else "no jobs yet")
        return
    stdout_console().print(jobs_table(rows, hosted))


def placement_table(rows: list[dict[str, Any]]) -> Table | None:
    """A job's placement decision, "why not there?": each node, chosen or not and why (None: not on record)."""
    if not rows:
        return None
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="why not there?", title_justify="left")
    for col in ("node", "chosen", "slots", "why not"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["node"], "yes" if r["chosen"] else "no", f"{r['used']}/{r['slots']}", r["why"] or "-")
    return table


@cli.command()
@click.argument("job_id")
@option_json()
@click.pass_context
def show(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """The whole record of one job: who, what, when, where each part ran, how it ended."""
    with _client(ctx) as c:
        job = c.call("show", job_id=job_id)
    if as_json:
        print_json(job)
        return
    con = stdout_console()
    con.print(f"[bold]{job['id']}[/]  {_what(job['kind'], job.get('args') or {})}  [bold]{job['state']}[/]"
              + (f"  exit {job['exit_code']}" if job.get("exit_code") is not None else ""))
    con.print(f"submitted by {job['submitter']} ({job['submitter_fp'][:8]}) at {_when(job['created'])}; "
              f"started {_when(job.get('started'))}, finished {_when(job.get('finished'))}")
    if job.get("reason"):
        con.print(f"reason: {job['reason']}")
    inputs = (job.get("args") or {}).get("inputs") or []
    if inputs:
        con.print("inputs: " + ", ".join(f"{i[0]} ({i[1]:,} bytes)" for i in inputs))
    parts = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("chunk", "attempt", "node", "started", "took", "state", "cpu s", "reason"):
        parts.add_column(col)
    for p in job.get("parts", []):
        parts.add_row(str(p["chunk"]), str(p["attempt"]), p["node"], _when(p["started"]), _took(p), p["state"],
                      f"{p.get('cpu_s') or 0:.2f}", p.get("reason") or "")
    con.print(parts)
    placed = placement_table(job.get("placement") or [])
    if placed is not None:
        con.print(placed)
    for f in job.get("artifacts", []):
        con.print(f"artifact {f['path']}: {f['size']:,} bytes, {f['state']}"
                  + (f" ({f['reason']})" if f.get("reason") else f", sha256 {f['sha256'][:16]}"))
    if job.get("log_bytes"):
        con.print(f"output: {job['log_bytes']} bytes" + (" (truncated)" if job.get("log_truncated") else "")
                  + f"; see vesta logs {job['id']}")


@cli.command()
@click.argument("job_id")
@click.option("--timeout", "-timeout", type=float, help="Give up after this many seconds (exit 124).")
@option_json()
@click.pass_context
def wait(ctx: click.Context, job_id: str, timeout: float | None, as_json: bool) -> None:
    """Wait until a job ends; exit with its exit code (1 if it failed without one, 0 if it succeeded)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with _client(ctx) as c:
        while True:
            job = c.call("show", job_id=job_id)
            if job["state"] not in ("queued", "running"):
                break
            if deadline is not None and time.monotonic() > deadline:
                click.echo(f"vesta: {job_id} is still {job['state']} after {timeout:g}s", err=True)
                ctx.exit(124)
            time.sleep(0.2)
    if as_json:
        print_json(job)
    else:
        click.echo(f"{job_id} {job['state']}" + (f", exit {job['exit_code']}" if job.get("exit_code") is not None
                                                else "") + (f": {job['reason']}" if job.get("reason") else ""))
    code = job.get("exit_code")
    ctx.exit(code if isinstance(code, int) else 0 if job["state"] == "succeeded" else 1)


@cli.command()
@click.argument("job_id")
@click.option("--follow", "-f", "follow", is_flag=True, help="Keep printing new output until the job ends.")
@click.pass_context
def logs(ctx: click.Context, job_id: str, follow: bool) -> None:
    """The stored stdout and stderr of an exec job, in the order they were written."""
    after = 0
    with _client(ctx) as c:
        while True:
            r = c.call("logs", job_id=job_id, after=after)
            sys.stdout.buffer.write(bytes(r["data"]))
            sys.stdout.buffer.flush()
            after = r["next"]
            if not follow or r["state"] not in ("queued", "running"):
                if follow and r["data"]:
                    continue   # drain what came in with the final state
                return
            time.sleep(0.5)


@cli.command()
@option_json()
@click.pass_context
def ledger(ctx: click.Context, as_json: bool) -> None:
    """What this node lent to and borrowed from each peer (core-seconds), and each peer's borrow cap."""
    with _client(ctx) as c:
        data = c.call("ledger")
    if as_json:
        print_json(data)
        return
    con = stdout_console()
    if not data["peers"]:
        con.print("no exchanges yet")
    else:
        con.print(ledger_table(data))
    con.print(f"core-seconds; balance = lent - borrowed. A peer may borrow up to {data['max_borrow_ratio']:g} x "
              f"max({data['goodwill_core_s']:g}, what it lent here); "
              f"amounts halve every {data['half_life_days']:g} days.")


@cli.command()
@click.argument("node")
@click.option("-c", "--count", default=1, show_default=True, help="How many pings.")
@option_json()
@click.pass_context
def ping(ctx: click.Context, node: str, count: int, as_json: bool) -> None:
    """Check the encrypted TCP link to NODE and measure its round trip."""
    if not 1 <= count <= 1000:
        raise ConfigError("--count must be from 1 to 1000")
    results = []
    with _client(ctx) as c:
        for i in range(count):
            results.append(c.call("ping", node=node))
            if not as_json:
                r = results[-1]
                click.echo(f"{r['node']} ({r['address']}, {r['fingerprint'][:8]}): rtt {r['rtt_ms']:.2f} ms")
            if i + 1 < count:
                time.sleep(0.2)
    if as_json:
        print_json(results if count > 1 else results[0])


@cli.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the key to this file (mode 0600) instead of printing it.")
@option_json()
def keygen(output: Path | None, as_json: bool) -> None:
    """Make a new random federation key (share it with your peers, privately)."""
    key = secrets.token_urlsafe(32)
    if output is not None:
        try:
            fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigError(f"{output} already exists: choose another file or delete it first") from None
        except OSError as exc:
            raise ConfigError(f"cannot write {output}: {exc.strerror}") from None
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        if as_json:
            print_json({"key_file": str(output)})
        else:
            click.echo(f"wrote a new federation key to {output}; start vestad with -key-file {output}")
        return
    print_json({"key": key}) if as_json else click.echo(key)


class _Progress:
    """A transient rich progress line, only on a terminal and never with --json."""

    def __init__(self, total: float, label: str, show: bool) -> None:
        self.show = show and sys.stdout.isatty()
        self.total = total
        self.label = label
        self.bar: Progress | None = None
        self.task: Any = None

    def __enter__(self) -> _Progress:
        if self.show:
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


def _rate(it_per_s: float) -> str:
    return f"{it_per_s / 1e6:.1f} M it/s ({it_per_s * 64 / 1e9:.2f} GB/s)"


@cli.command()
@click.argument("millions", type=float)
@click.option("--on", "-on", "on", help="Run on this node only (name or fingerprint prefix).")
@click.option("--no-split", "-no-split", "no_split", is_flag=True, help="Keep the job on one node.")
@option_json()
@click.pass_context
def cpu(ctx: click.Context, millions: float, on: str | None, no_split: bool, as_json: bool) -> None:
    """Hash MILLIONS million SHA-256 blocks, routed to the nodes with spare capacity."""
    request = JobRequest.from_wire("cpu", {"millions": millions, "on": on, "split": not no_split})
    with _client(ctx) as c, _Progress(millions * 1e6, f"cpu {millions:g}M", not as_json) as bar:
        r = c.call("cpu", on_event=bar.event, **request.to_wire())
    if as_json:
        print_json(r)
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("node", "host", "chunks", "iterations", "share", "busy", "rate"):
        table.add_column(col, justify="left" if col in ("node", "host") else "right")
    for p in r["parts"]:
        table.add_row(p["node"], p["hostname"], str(p["chunks"]), f"{p['iterations'] / 1e6:.1f}M",
                      f"{p['share_pct']:.0f}%", f"{p['busy_s']:.2f}s", _rate(p["rate"]))
    con = stdout_console()
    con.print(table)
    con.print(f"job {r['job_id']}: {r['iterations'] / 1e6:g}M iterations in {r['elapsed_s']:.2f}s, "
              f"{_rate(r['rate'])}, {r['chunks']} chunks")
    con.print(f"digest {r['digest']}")


@cli.command()
@click.argument("mib", type=int)
@click.argument("ms", type=int)
@click.option("--on", "-on", "on", help="Run on this node only.")
@option_json()
@click.pass_context
def mem(ctx: click.Context, mib: int, ms: int, on: str | None, as_json: bool) -> None:
    """Allocate MIB MiB on the node with room for it, hold it MS milliseconds, release it."""
    request = JobRequest.from_wire("mem", {"mib": mib, "ms": ms, "on": on})
    with _client(ctx) as c:
        r = c.call("mem", **request.to_wire())
    if as_json:
        print_json(r)
        return
    click.echo(f"held {r['mib']} MiB for {r['ms']} ms on {r['node']} ({r['hostname']}); "
               f"job {r['job_id']} took {r['elapsed_s']:.2f}s")


@cli.command()
@click.argument("cores", type=int)
@click.argument("secs", type=float)
@option_json()
@click.pass_context
def stress(ctx: click.Context, cores: int, secs: float, as_json: bool) -> None:
    """Keep CORES cores of this machine busy for SECS seconds (0 = all), so new work spills to peers."""
    with _client(ctx) as c:
        r = c.call("stress", cores=cores, secs=secs)
    if as_json:
        print_json(r)
    else:
        click.echo(f"stressing {r['cores']} cores for {r['secs']:g}s (vesta stop-stress ends it)")


@cli.command("stop-stress")
@option_json()
@click.pass_context
def stop_stress(ctx: click.Context, as_json: bool) -> None:
    """End a running `vesta stress` early."""
    with _client(ctx) as c:
        r = c.call("stop-stress")
    if as_json:
        print_json(r)
    else:
        click.echo("stress stopped" if r["stopped"] else "no stress was running")


@cli.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--timeout", "-timeout", type=float, help="Stop the command after this many seconds.")
@click.option("--on", "-on", "on", help="Run on this node only.")
@click.option("--detach", "-detach", is_flag=True, help="Print the job id at once; see vesta wait, logs, show.")
@click.option("--mem", "-mem", "mem", type=int, help="Memory limit in MiB (address space; default: the node's offer).")
@click.option("--put", "-put", "puts", multiple=True, metavar="FILE",
              help="Ship this file into the job's working directory (repeat for more).")
@click.option("--queue", "-queue", is_flag=True,
              help="If no node can take it now, wait in the queue instead of failing.")
@click.option("--retries", "-retries", type=int, default=0, show_default=True,
              help="Run it again elsewhere this many times if its node dies or the link drops.")
@option_json()
@click.argument("argv", nargs=-1, type=click.UNPROCESSED, required=True)
@click.pass_context
def exec_(ctx: click.Context, timeout: float | None, on: str | None, detach: bool, mem: int | None,
          puts: tuple[str, ...], queue: bool, retries: int, as_json: bool, argv: tuple[str, ...]) -> None:
    """Run a command on the best node that allows exec: vesta exec [--timeout S] -- CMD ARGS...

    Its output streams back live and vesta exits with its exit code (128+N if killed by signal N).
    Files it leaves in $VESTA_OUTPUT come back to this node: see vesta artifacts JOB.
    """
    if timeout is not None and timeout <= 0:   # 0 in a spec is the node's default, not a time
        raise InvalidJob(f"--timeout must be from 1 to {MAX_TIMEOUT_S} seconds")
    if mem is not None and mem <= 0:
        raise InvalidJob("--mem must be a positive number of MiB")
    files = []
    for put in puts:
        path = os.path.abspath(put)
        if not os.path.isfile(path):
            raise ConfigError(f"--put {put}: " + ("not a regular file (ship a directory as an archive: tar czf)"
                                                  if os.path.exists(path) else "no such file"))
        files.append(path)
    captured: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
    said: set[str] = set()

    def event(ev: dict[str, Any]) -> None:
        if ev.get("type") == "queued" and not as_json and ev.get("why") not in said:
            said.add(ev.get("why", ""))
            click.echo(f"vesta: {ev['job_id']} queued: {ev.get('why', '')}", err=True)
        if ev.get("type") != "output":
            return
        data = bytes(ev["data"])
        if as_json:
            captured[ev["stream"]] += data
            return
        out = sys.stdout.buffer if ev["stream"] == "stdout" else sys.stderr.buffer
        out.write(data)
        out.flush()

    request = JobRequest(ExecSpec(argv, timeout_s=timeout or 0.0, mem_mib=mem or 0), on=on, retries=retries,
                         queue=queue, puts=tuple(files))
    request.validate()
    if detach:
        with _client(ctx) as c:
            r = c.call("exec", detach=True, **request.to_wire())
        print_json(r) if as_json else click.echo(r["job_id"])
        return
    with _client(ctx) as c:
        try:
            r = c.call("exec", on_event=event, **request.to_wire())
        except KeyboardInterrupt:
            if queue and said:
                click.echo("vesta: the job stays queued; see vesta jobs, or vesta cancel JOB", err=True)
            raise
    code = r["exit_code"] if r["exit_code"] is not None else 128 + (r["signal"] or 0)
    if as_json:
        print_json(r | {k: v.decode("utf-8", "replace") for k, v in captured.items()})
        ctx.exit(code)
    if r["reason"]:
        click.echo(f"vesta: {' '.join(argv)} on {r['node']}: {r['reason']}", err=True)
    elif sys.stderr.isatty():  # where it ran, for a person watching; scripts get the program's output only
        click.echo(f"vesta: ran on {r['node']} ({r['hostname']}) in {r['run_s']:.2f}s, exit {code}", err=True)
    stored = [f for f in r.get("artifacts") or [] if f["state"] == "stored"]
    for f in r.get("artifacts") or []:
        if f["state"] != "stored":
            click.echo(f"vesta: artifact {f['path']} not kept: {f['reason']}", err=True)
    if stored and sys.stderr.isatty():
        click.echo(f"vesta: {len(stored)} artifact(s) in {r['artifacts_dir']} (vesta artifacts {r['job_id']})",
                   err=True)
    ctx.exit(code)


@cli.command()
@click.argument("job_id")
@click.option("-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path),
              help="Copy the stored files into this directory, checking each one's SHA-256.")
@option_json()
@click.pass_context
def artifacts(ctx: click.Context, job_id: str, out: Path | None, as_json: bool) -> None:
    """The files an exec job left in $VESTA_OUTPUT: list them, or copy them out with -o DIR."""
    with _client(ctx) as c:
        r = c.call("artifacts", job_id=job_id)
    files = r["files"]
    copied: list[str] = []
    if out is not None:
        copied = copy_artifacts(Path(r["dir"]), [f for f in files if f["state"] == "stored"], out)
    if as_json:
        print_json(r | ({"copied_to": str(out), "copied": copied} if out is not None else {}))
        return
    if not files:
        click.echo(f"{job_id} has no artifacts (state {r['state']})")
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("path", "size", "sha256", "state", "from", "reason"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for f in files:
        table.add_row(f["path"], f"{f['size']:,}", f["sha256"][:16], f["state"], f.get("node") or "", f["reason"])
    stdout_console().print(table)
    if out is not None:
        click.echo(f"copied {len(copied)} file(s) to {out}, SHA-256 checked")
    elif any(f["state"] == "stored" for f in files):
        click.echo(f"stored in {r['dir']}; copy them out with: vesta artifacts {job_id} -o DIR")


def copy_artifacts(src: Path, files: list[dict[str, Any]], out: Path) -> list[str]:
    """Copy stored artifacts to ``out``, refusing to overwrite, each checked against its recorded SHA-256."""
    for f in files:
        if os.path.lexists(out / f["path"]):
            raise ConfigError(f"{out / f['path']} exists: choose another -o directory or remove it")
    done = []
    for f in files:
        dest = out / f["path"]
        h = hashlib.sha256()
        tmp = dest.with_name(dest.name + ".vesta-partial")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(src / f["path"], "rb") as fin, open(tmp, "xb") as fout:
                while piece := fin.read(1 << 20):
                    h.update(piece)
                    fout.write(piece)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise VestaError(f"cannot copy {f['path']}: {exc.strerror or exc}") from None
        if h.hexdigest() != f["sha256"]:
            tmp.unlink(missing_ok=True)
            raise VestaError(f"stored artifact {f['path']} no longer matches its SHA-256 (changed or damaged on "
                             f"disk in {src}): not copied")
        tmp.replace(dest)
        done.append(f["path"])
    return done


@cli.command()
@click.argument("job_id")
@option_json()
@click.pass_context
def cancel(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Stop a running job everywhere it runs."""
    with _client(ctx) as c:
        r = c.call("cancel", job_id=job_id)
    if as_json:
        print_json(r)
    else:
        click.echo(f"cancelled {r['cancelled']}")


def main() -> NoReturn:
    run_command(cli, "vesta")


if __name__ == "__main__":
    main()
