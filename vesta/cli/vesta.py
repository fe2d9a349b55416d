"""vesta: the control CLI. Every command talks to the local vestad and takes --json.

Start-up time is most of what a command like ``vesta status`` costs, so this module imports only what every
command needs: click and the control client. What one command needs (job specs, sweeps, files, rich) is
imported inside it; tests/test_imports.py checks that the control-only commands stay light.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from vesta import outcome
from vesta.cli import output
from vesta.cli.base import Group, shared, shared_options, version_option
from vesta.cli.common import print_json, run_command
from vesta.cli.tables import (
    LEDGER_COLUMNS,
    PEER_COLUMNS,
    PEER_RIGHT,
    PLACEMENT_COLUMNS,
    ProgressLine,
    gc_rows,
    job_exit_code,
    jobs_cells,
    ledger_cells,
    peers_cells,
    placement_cells,
    rate_text,
    reason_cell,
    rerun_request,
    status_rows,
    took,
    what,
    when,
)
from vesta.control import ControlClient
from vesta.errors import ConfigError, InvalidJob, VestaError
from vesta.paths import default_key_file

if TYPE_CHECKING:
    from vesta.spec import JobRequest

F = TypeVar("F", bound=Callable[..., Any])


def _client(ctx: click.Context, *, job: bool = False) -> ControlClient:
    """The connection to this user's vestad. A job's request is answered when the job ends (a queued one may
    wait for hours, silent): it has no time limit; a daemon that dies closes the connection anyway."""
    return ControlClient.connect(shared(ctx).name, timeout=None if job else 30.0)


def _json(ctx: click.Context) -> bool:
    return shared(ctx).json


def _header(ctx: click.Context) -> bool:
    return shared(ctx).header


@click.group(cls=Group)
@version_option("vesta", hidden_verbose=True)
@shared_options
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Talk to the local vestad: list peers, show status, submit work.

    --name, --json and --no-header may come before or after the command.
    """
    shared(ctx)


def _complete_nodes(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Node names from the running daemon, for shell completion (nothing when none answers)."""
    try:
        with ControlClient.connect(shared(ctx).name, timeout=2.0) as c:
            return [r["name"] for r in c.call("peers") if str(r["name"]).startswith(incomplete)]
    except (VestaError, OSError):
        return []


def _complete_jobs(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Job ids from the running daemon's records, newest first, for shell completion."""
    try:
        with ControlClient.connect(shared(ctx).name, timeout=2.0) as c:
            return [r["id"] for r in c.call("jobs", limit=200) if str(r["id"]).startswith(incomplete)]
    except (VestaError, OSError):
        return []


def _job_argument(nargs: int = 1) -> Callable[[F], F]:
    return click.argument("job_ids" if nargs != 1 else "job_id", metavar="JOB..." if nargs != 1 else "JOB",
                          nargs=nargs, required=True, shell_complete=_complete_jobs)


def _on_option() -> Callable[[F], F]:
    on = click.option("--on", "-on", "on", metavar="NODE", shell_complete=_complete_nodes,
                      help="Run on this node only (name or fingerprint prefix).")
    need = click.option("--need", "-need", "need", multiple=True, metavar="LABEL[,LABEL...]",
                        help="Only nodes with every one of these labels (see vesta peers), e.g. arch:aarch64,gpu.")

    def both(f: F) -> F:
        return on(need(f))
    return both


def _labels(need: tuple[str, ...]) -> list[str]:
    """--need a,b --need c: the labels, in order, once each."""
    return list(dict.fromkeys(label.strip() for given in need for label in given.split(",") if label.strip()))


@cli.command()
@shared_options
@click.pass_context
def peers(ctx: click.Context) -> None:
    """List this node and every peer it knows, with live load."""
    with _client(ctx) as c:
        rows = c.call("peers")
    if _json(ctx):
        print_json(rows)
        return
    output.table(PEER_COLUMNS, peers_cells(rows), header=_header(ctx), right=PEER_RIGHT,
                 dim_rows=[i for i, r in enumerate(rows) if r["state"] == "suspect"])


@cli.command()
@shared_options
@click.pass_context
def status(ctx: click.Context) -> None:
    """Show this node: identity, ports, budget, power, counters."""
    with _client(ctx) as c:
        s = c.call("status")
    if _json(ctx):
        print_json(s)
        return
    output.pairs(status_rows(s))


@cli.command()
@click.option("--state", "-state", "state",
              type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"]),
              help="Only jobs in this state.")
@click.option("--limit", "-limit", default=20, show_default=True, help="How many, newest first.")
@click.option("--hosted", "-hosted", is_flag=True, help="What this node ran for others instead.")
@click.option("--all", "-all", "everyone", is_flag=True, help="Gather the records of every reachable member.")
@shared_options
@click.pass_context
def jobs(ctx: click.Context, state: str | None, limit: int, hosted: bool, everyone: bool) -> None:
    """Jobs submitted on this node (or, with --hosted, runs it did for peers), newest first."""
    with _client(ctx) as c:
        rows = c.call("jobs", state=state, limit=limit, hosted=hosted, all=everyone)
    if _json(ctx):
        print_json([r | {"outcome": outcome.of_job(r)} if r.get("state") != "unreachable" else r for r in rows])
        return
    if not rows and output.on_terminal():
        click.echo("no runs hosted for peers yet" if hosted else "no jobs yet", err=True)
        return
    cols, cells = jobs_cells(rows, hosted)
    output.table(cols, cells, header=_header(ctx))


@cli.command()
@_job_argument()
@shared_options
@click.pass_context
def show(ctx: click.Context, job_id: str) -> None:
    """The whole record of one job: who, what, when, where each part ran, how it ended."""
    with _client(ctx) as c:
        job = c.call("show", job_id=job_id)
    if job.get("kind") == "sweep":
        from vesta.cli.sweeps import show_sweep

        print_json(job) if _json(ctx) else show_sweep(job, header=_header(ctx))
        return
    if _json(ctx):
        print_json(job | {"outcome": outcome.of_job(job)})
        return
    said = outcome.of_job(job)
    output.line(f"[bold]{job['id']}[/]  {what(job['kind'], job.get('args') or {})}  [bold]{said}[/]")
    output.line(f"submitted by {job['submitter']} ({job['submitter_fp'][:8]}) at {when(job['created'])}; "
                f"started {when(job.get('started'))}, finished {when(job.get('finished'))}")
    if reason_cell(job, said):
        output.line(f"reason: {job['reason']}")
    if job.get("rerun_of"):
        output.line(f"rerun of {job['rerun_of']}")
    if job.get("reruns"):
        output.line("rerun as " + ", ".join(job["reruns"]))
    inputs = (job.get("args") or {}).get("inputs") or []
    if inputs:
        output.line("inputs: " + ", ".join(f"{i[0]} ({i[1]:,} bytes)" for i in inputs))
    parts = [[str(p["chunk"]), str(p["attempt"]), p["node"], when(p["started"]), took(p), outcome.of_job(p),
              f"{p.get('cpu_s') or 0:.2f}", reason_cell(p, outcome.of_job(p))] for p in job.get("parts", [])]
    output.table(("chunk", "attempt", "node", "started", "took", "outcome", "cpu s", "reason"), parts,
                 header=_header(ctx))
    placed = placement_cells(job.get("placement") or [])
    if placed:
        output.line("why not there?")
        output.table(PLACEMENT_COLUMNS, placed, header=_header(ctx))
    for f in job.get("artifacts", []):
        output.line(f"artifact {f['path']}: {f['size']:,} bytes, {f['state']}"
                    + (f" ({f['reason']})" if f.get("reason") else f", sha256 {f['sha256'][:16]}"))
    if job.get("log_bytes"):
        output.line(f"output: {job['log_bytes']} bytes" + (" (truncated)" if job.get("log_truncated") else "")
                    + f"; see vesta logs {job['id']}")


@cli.command()
@_job_argument(nargs=-1)
@click.option("--timeout", "-timeout", type=float, help="Give up after this many seconds (exit 124).")
@shared_options
@click.pass_context
def wait(ctx: click.Context, job_ids: tuple[str, ...], timeout: float | None) -> None:
    """Wait until every JOB ends; exit with the worst of their exit codes (124 if --timeout passes first)."""
    from vesta.sweepspec import is_sweep_id

    if any(is_sweep_id(j) for j in job_ids):
        if len(job_ids) != 1:
            raise ConfigError("wait follows one sweep at a time: vesta wait SWEEP")
        from vesta.cli.sweeps import wait_sweep

        ctx.exit(wait_sweep(lambda: _client(ctx, job=True), job_ids[0], timeout, as_json=_json(ctx)))
    deadline = None if timeout is None else time.monotonic() + timeout
    ended: dict[str, dict[str, Any]] = {}
    with _client(ctx) as c:
        while True:
            for job_id in job_ids:
                if job_id in ended:
                    continue
                job = c.call("show", job_id=job_id)
                if job["state"] not in ("queued", "running"):
                    ended[job_id] = job
                    if not _json(ctx):
                        said = outcome.of_job(job)
                        reason = reason_cell(job, said)
                        click.echo(f"{job_id} {said}" + (f": {reason}" if reason else ""))
            if len(ended) == len(set(job_ids)):
                break
            if deadline is not None and time.monotonic() > deadline:
                waiting = [j for j in job_ids if j not in ended]
                if _json(ctx):
                    print_json([ended[j] | {"outcome": outcome.of_job(ended[j])} for j in job_ids if j in ended])
                click.echo(f"vesta: {', '.join(waiting)} still not finished after {timeout:g}s "
                           f"(still running or queued)", err=True)
                ctx.exit(124)
            time.sleep(0.2)
    if _json(ctx):
        done = [ended[j] | {"outcome": outcome.of_job(ended[j])} for j in job_ids]
        print_json(done[0] if len(job_ids) == 1 else done)
    ctx.exit(max(job_exit_code(j) for j in ended.values()))


@cli.command("map", context_settings={"allow_interspersed_args": False})
@click.option("-j", "--jobs", "-jobs", "jobs", type=int, default=0,
              help="Jobs in flight at most (default: as many as the federation takes now).")
@_on_option()
@click.option("--timeout", "-timeout", type=float, help="Stop each job after this many seconds.")
@click.option("--mem", "-mem", "mem", type=int, help="Memory limit of each job in MiB.")
@click.option("--retries", "-retries", type=int, default=0, show_default=True,
              help="Run a failed job again this many times, on another node where one can take it.")
@click.option("--halt", "-halt", "halt", metavar="now,fail=N|soon,fail=N%",
              help="Stop after N (or N% of all) jobs failed: now cancels the running ones, soon lets them end.")
@click.option("--put", "-put", "puts", multiple=True, metavar="FILE",
              help="Ship this file with every job (sent once per node, not once per job).")
@click.option("--put-each", "-put-each", "put_each", multiple=True, metavar="TEMPLATE",
              help="Ship each job's own file, e.g. --put-each {} (replacement strings work).")
@click.option("--results", "-results", "results", type=click.Path(file_okay=False), metavar="DIR",
              help="Write DIR/SEQ/stdout, stderr, exit, node and the job's artifacts.")
@click.option("--joblog", "-joblog", "joblog", type=click.Path(dir_okay=False), metavar="FILE",
              help="Log each job in GNU parallel's joblog format.")
@click.option("--resume", "-resume", is_flag=True, help="Skip the jobs the joblog shows done.")
@click.option("--resume-failed", "-resume-failed", "resume_failed", is_flag=True,
              help="Run again the jobs the joblog shows failed, and those not in it.")
@click.option("--keep-order", "-k", "keep_order", is_flag=True,
              help="Print each job's output in input order (not as each ends).")
@click.option("--detach", "-detach", is_flag=True, help="Print the sweep's id at once; see vesta wait, show, cancel.")
@shared_options
@click.argument("words", nargs=-1, type=click.UNPROCESSED, required=True, metavar="-- CMD [ARGS]... ::: A B C")
@click.pass_context
def map_(ctx: click.Context, jobs: int, on: str | None, need: tuple[str, ...], timeout: float | None,
         mem: int | None, retries: int, halt: str | None, puts: tuple[str, ...], put_each: tuple[str, ...],
         results: str | None, joblog: str | None, resume: bool, resume_failed: bool, keep_order: bool,
         detach: bool, words: tuple[str, ...]) -> None:
    """Run a command over many inputs, the way GNU parallel does: vesta map [OPTIONS] -- CMD ARGS... ::: A B C

    `::: A B C` lists inputs (several lists: every combination); `:::: FILE` reads one input a line (- is
    standard input). In the command, {} is the input, {1} {2} one list's, {.} without extension, {/}
    basename, {//} dirname, {/.} basename without extension, {#} the job's number; with none of them the
    inputs are appended.

    The sweep runs in the daemon: killing vesta map does not stop it (vesta wait SWEEP follows it again,
    vesta cancel SWEEP stops it). Exit status: 0 when every job succeeded, else the number that failed (at
    most 101).
    """
    from vesta.cli.sweeps import build_spec, run_map

    spec = build_spec(words, jobs=jobs, on=on, need=_labels(need), timeout=timeout, mem=mem, retries=retries,
                      halt=halt, puts=puts, put_each=put_each, results=results, joblog=joblog, resume=resume,
                      resume_failed=resume_failed)
    ctx.exit(run_map(lambda: _client(ctx, job=not detach), spec, as_json=_json(ctx), detach=detach,
                     keep_order=keep_order, nothing=f"{joblog} shows every job "
                     + ("succeeded" if resume_failed else "done")))


@cli.command()
@_job_argument()
@click.option("--follow", "-f", "follow", is_flag=True, help="Keep printing new output until the job ends.")
@shared_options
@click.pass_context
def logs(ctx: click.Context, job_id: str, follow: bool) -> None:
    """The stored stdout and stderr of an exec job, in the order they were written."""
    after = 0
    collected = bytearray()
    with _client(ctx) as c:
        job = c.call("show", job_id=job_id)
        if job["kind"] != "exec":
            raise VestaError(f"{job_id} is a {job['kind']} job: only exec jobs have output; "
                             f"its result is in `vesta show {job_id}`")
        while True:
            r = c.call("logs", job_id=job_id, after=after)
            if _json(ctx):
                collected += bytes(r["data"])
            else:
                sys.stdout.buffer.write(bytes(r["data"]))
                sys.stdout.buffer.flush()
            after = r["next"]
            if not follow or r["state"] not in ("queued", "running"):
                if follow and r["data"]:
                    continue   # drain what came in with the final state
                break
            time.sleep(0.5)
    if _json(ctx):
        print_json({"job_id": job_id, "state": r["state"], "output": collected.decode("utf-8", "replace"),
                    "bytes": len(collected)})


@cli.command()
@shared_options
@click.pass_context
def ledger(ctx: click.Context) -> None:
    """What this node lent to and borrowed from each peer (core-seconds), and each peer's borrow cap."""
    with _client(ctx) as c:
        data = c.call("ledger")
    if _json(ctx):
        print_json(data)
        return
    if data["peers"] or not output.on_terminal():
        output.table(LEDGER_COLUMNS, ledger_cells(data), header=_header(ctx),
                     right=("lent", "borrowed", "balance", "cap"))
    else:
        click.echo("no exchanges yet")
    note = (f"core-seconds; balance = lent - borrowed. A peer may borrow up to {data['max_borrow_ratio']:g} x "
            f"max({data['goodwill_core_s']:g}, what it lent here); "
            f"amounts halve every {data['half_life_days']:g} days.")
    click.echo(note, err=not output.on_terminal())   # a pipe gets the table alone


@cli.command()
@click.argument("node", shell_complete=_complete_nodes)
@click.option("-c", "--count", "-count", default=1, show_default=True, help="How many pings.")
@shared_options
@click.pass_context
def ping(ctx: click.Context, node: str, count: int) -> None:
    """Check the encrypted TCP link to NODE and measure its round trip."""
    if not 1 <= count <= 1000:
        raise ConfigError("--count must be from 1 to 1000")
    results = []
    as_json = _json(ctx)
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
@click.option("-o", "--output", "-output", "output_path", type=click.Path(dir_okay=False, path_type=Path),
              help=f"Write the key to this file (mode 0600; its directory is made, 0700) instead of printing it. "
                   f"vestad reads {default_key_file()} by default.")
@shared_options
@click.pass_context
def keygen(ctx: click.Context, output_path: Path | None) -> None:
    """Make a new random federation key (share it with your peers, privately)."""
    import secrets

    from vesta.cli.files import write_key_file

    key = secrets.token_urlsafe(32)
    if output_path is not None:
        write_key_file(output_path, key)
        if _json(ctx):
            print_json({"key_file": str(output_path)})
        elif output_path.expanduser().resolve() == default_key_file().resolve():
            click.echo(f"wrote a new federation key to {output_path}; vestad reads it from there by default")
        else:
            click.echo(f"wrote a new federation key to {output_path}; start vestad with --key-file {output_path}")
        return
    print_json({"key": key}) if _json(ctx) else click.echo(key)


@cli.command()
@click.argument("millions", type=float)
@_on_option()
@click.option("--no-split", "-no-split", "no_split", is_flag=True, help="Keep the job on one node.")
@shared_options
@click.pass_context
def cpu(ctx: click.Context, millions: float, on: str | None, need: tuple[str, ...], no_split: bool) -> None:
    """Hash MILLIONS million SHA-256 blocks, routed to the nodes with spare capacity."""
    from vesta.spec import JobRequest

    as_json = _json(ctx)
    request = JobRequest.from_wire("cpu", {"millions": millions, "on": on, "split": not no_split,
                                           "need": _labels(need)})
    with _client(ctx, job=True) as c, ProgressLine(millions * 1e6, f"cpu {millions:g}M", not as_json) as bar:
        r = c.call("cpu", on_event=bar.event, **request.to_control())
    if as_json:
        print_json(r)
        return
    cells = [[p["node"], p["hostname"], str(p["chunks"]), f"{p['iterations'] / 1e6:.1f}M", f"{p['share_pct']:.0f}%",
              f"{p['busy_s']:.2f}s", rate_text(p["rate"])] for p in r["parts"]]
    output.table(("node", "host", "chunks", "iterations", "share", "busy", "rate"), cells, header=_header(ctx),
                 right=("chunks", "iterations", "share", "busy", "rate"))
    click.echo(f"job {r['job_id']}: {r['iterations'] / 1e6:g}M iterations in {r['elapsed_s']:.2f}s, "
               f"{rate_text(r['rate'])}, {r['chunks']} chunks")
    click.echo(f"digest {r['digest']}")


@cli.command()
@click.argument("mib", type=int)
@click.argument("ms", type=int)
@_on_option()
@shared_options
@click.pass_context
def mem(ctx: click.Context, mib: int, ms: int, on: str | None, need: tuple[str, ...]) -> None:
    """Allocate MIB MiB on the node with room for it, hold it MS milliseconds, release it."""
    from vesta.spec import JobRequest

    request = JobRequest.from_wire("mem", {"mib": mib, "ms": ms, "on": on, "need": _labels(need)})
    with _client(ctx, job=True) as c:
        r = c.call("mem", **request.to_control())
    if _json(ctx):
        print_json(r)
        return
    click.echo(f"held {r['mib']} MiB for {r['ms']} ms on {r['node']} ({r['hostname']}); "
               f"job {r['job_id']} took {r['elapsed_s']:.2f}s")


@cli.command()
@click.argument("cores", type=int)
@click.argument("secs", type=float)
@shared_options
@click.pass_context
def stress(ctx: click.Context, cores: int, secs: float) -> None:
    """Keep CORES cores of this machine busy for SECS seconds (0 = all), so new work spills to peers."""
    with _client(ctx) as c:
        r = c.call("stress", cores=cores, secs=secs)
    if _json(ctx):
        print_json(r)
    else:
        click.echo(f"stressing {r['cores']} cores for {r['secs']:g}s (vesta stop-stress ends it)")


@cli.command("stop-stress")
@shared_options
@click.pass_context
def stop_stress(ctx: click.Context) -> None:
    """End a running `vesta stress` early."""
    with _client(ctx) as c:
        r = c.call("stop-stress")
    if _json(ctx):
        print_json(r)
    else:
        click.echo("stress stopped" if r["stopped"] else "no stress was running")


@cli.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("--timeout", "-timeout", type=float, help="Stop the command after this many seconds.")
@_on_option()
@click.option("--detach", "-detach", is_flag=True, help="Print the job id at once; see vesta wait, logs, show.")
@click.option("--mem", "-mem", "mem", type=int, help="Memory limit in MiB (address space; default: the node's offer).")
@click.option("--put", "-put", "puts", multiple=True, metavar="FILE",
              help="Ship this file into the job's working directory (repeat for more).")
@click.option("--queue", "-queue", is_flag=True,
              help="If no node can take it now, wait in the queue instead of failing.")
@click.option("--retries", "-retries", type=int, default=0, show_default=True,
              help="Run it again elsewhere this many times if its node dies or the link drops.")
@click.option("--no-stdin", "no_stdin", is_flag=True,
              help="Do not send standard input (it is sent, up to 256 MiB, when it is not a terminal).")
@shared_options
@click.argument("argv", nargs=-1, type=click.UNPROCESSED, required=True, metavar="-- CMD [ARGS]...")
@click.pass_context
def exec_(ctx: click.Context, timeout: float | None, on: str | None, need: tuple[str, ...], detach: bool,
          mem: int | None,
          puts: tuple[str, ...], queue: bool, retries: int, no_stdin: bool, argv: tuple[str, ...]) -> None:
    """Run a command on the best node that allows exec: vesta exec [OPTIONS] -- CMD ARGS...

    `--` ends vesta's options: everything after it is the command. A flag vesta does not know before
    `--` is an error, never the command.

    Its output streams back live and vesta exits with its exit code (128+N if killed by signal N).
    Standard input, when it is not a terminal, is read to its end and shipped with the job (--no-stdin: not).
    Files it leaves in $VESTA_OUTPUT come back to this node: see vesta artifacts JOB.
    """
    from vesta.cli.files import STDIN_NAME, stdin_file
    from vesta.spec import MAX_TIMEOUT_S, ExecSpec, JobRequest

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
    with stdin_file(not no_stdin and not sys.stdin.isatty()) as piped:
        request = JobRequest(ExecSpec(argv, timeout_s=timeout or 0.0, mem_mib=mem or 0,
                                      stdin=STDIN_NAME if piped else ""),
                             on=on, need=tuple(_labels(need)), retries=retries, queue=queue,
                             puts=tuple(files) + ((piped,) if piped else ()))
        request.validate()
        _exec(ctx, request, detach, queue, argv)


def _exec(ctx: click.Context, request: JobRequest, detach: bool, queue: bool, argv: tuple[str, ...]) -> None:
    as_json = _json(ctx)
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

    if detach:
        with _client(ctx) as c:
            r = c.call("exec", detach=True, **request.to_control())
        print_json(r) if as_json else click.echo(r["job_id"])
        return
    with _client(ctx, job=True) as c:
        try:
            r = c.call("exec", on_event=event, **request.to_control())
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
@_job_argument()
@click.option("-o", "--output", "-output", "out", type=click.Path(file_okay=False, path_type=Path),
              help="Copy the stored files into this directory, checking each one's SHA-256.")
@shared_options
@click.pass_context
def artifacts(ctx: click.Context, job_id: str, out: Path | None) -> None:
    """The files an exec job left in $VESTA_OUTPUT: list them, or copy them out with -o DIR."""
    with _client(ctx) as c:
        r = c.call("artifacts", job_id=job_id)
    files = r["files"]
    copied: list[str] = []
    if out is not None:
        from vesta.cli.files import copy_artifacts

        copied = copy_artifacts(Path(r["dir"]), [f for f in files if f["state"] == "stored"], out)
    if _json(ctx):
        print_json(r | ({"copied_to": str(out), "copied": copied} if out is not None else {}))
        return
    if not files:
        click.echo(f"{job_id} has no artifacts (state {r['state']})", err=not output.on_terminal())
        return
    cells = [[f["path"], f"{f['size']:,}", f["sha256"][:16], f["state"], f.get("node") or "", f["reason"]]
             for f in files]
    output.table(("path", "size", "sha256", "state", "from", "reason"), cells, header=_header(ctx), right=("size",))
    if out is not None:
        click.echo(f"copied {len(copied)} file(s) to {out}, SHA-256 checked")
    elif any(f["state"] == "stored" for f in files):
        click.echo(f"stored in {r['dir']}; copy them out with: vesta artifacts {job_id} -o DIR",
                   err=not output.on_terminal())


@cli.command()
@click.option("--dry-run", "-dry-run", "dry_run", is_flag=True, help="Say what would be removed; change nothing.")
@shared_options
@click.pass_context
def gc(ctx: click.Context, dry_run: bool) -> None:
    """Apply the retention settings now: remove records older than keep_days and the oldest artifacts
    beyond keep_artifacts_mb (vestad also does it once a day). Never a queued or running job's."""
    with _client(ctx, job=True) as c:   # a first run over years of records may take a while
        r = c.call("gc", dry_run=dry_run)
    if _json(ctx):
        print_json(r)
        return
    output.pairs(gc_rows(r))


@cli.command()
@_job_argument()
@shared_options
@click.pass_context
def cancel(ctx: click.Context, job_id: str) -> None:
    """Stop a running job everywhere it runs."""
    with _client(ctx) as c:
        r = c.call("cancel", job_id=job_id)
    if _json(ctx):
        print_json(r)
    else:
        click.echo(f"cancelled {r['cancelled']}")


@cli.command()
@_job_argument()
@click.option("--detach", "-detach", is_flag=True, help="Print the new job's id at once (exec jobs only).")
@shared_options
@click.pass_context
def rerun(ctx: click.Context, job_id: str, detach: bool) -> None:
    """Submit JOB again: the same command, options and size; the two records name each other.

    The output streams as with the original command, and vesta exits as it would.
    """
    as_json = _json(ctx)
    with _client(ctx) as c:
        old = c.call("show", job_id=job_id)
    request = rerun_request(old)
    op = request.kind
    if detach and op != "exec":
        raise ConfigError(f"--detach works for exec jobs; {job_id} is a {op} job")
    linked: list[str] = []

    def link(new_id: str) -> None:
        if linked:
            return
        linked.append(new_id)
        with _client(ctx) as side:   # the first connection is busy with the job itself
            side.call("link-rerun", job_id=new_id, rerun_of=job_id)
        if not as_json:
            click.echo(f"vesta: {new_id} reruns {job_id}", err=True)

    def event(ev: dict[str, Any]) -> None:
        if ev.get("job_id"):
            link(str(ev["job_id"]))
        if ev.get("type") == "output" and not as_json:
            out = sys.stdout.buffer if ev["stream"] == "stdout" else sys.stderr.buffer
            out.write(bytes(ev["data"]))
            out.flush()

    with _client(ctx, job=True) as c:
        r = c.call(op, on_event=event, **request.to_control(), **({"detach": True} if detach else {}))
    link(str(r["job_id"]))
    if as_json:
        print_json(r | {"rerun_of": job_id})
    elif detach:
        click.echo(r["job_id"])
    elif op == "exec":
        if r.get("reason"):
            click.echo(f"vesta: {request.spec.describe()} on {r['node']}: {r['reason']}", err=True)
    else:
        click.echo(f"{r['job_id']} {outcome.of_result(r)}" + (f"; digest {r['digest']}" if r.get("digest") else ""))
    if op == "exec" and not detach:
        ctx.exit(r["exit_code"] if r["exit_code"] is not None else 128 + (r["signal"] or 0))


def main() -> NoReturn:
    run_command(cli, "vesta")


if __name__ == "__main__":
    main()
