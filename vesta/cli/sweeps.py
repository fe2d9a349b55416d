"""`vesta map` on this side: the command line read into a ``SweepSpec``, and a sweep followed as it runs.

The sweep itself runs in the daemon (``vesta.sweep``); what is here reads ``:::`` and ``::::`` inputs, the
joblog of a ``--resume``, and prints what the daemon streams: each job's stdout as it ends (in input order
with ``--keep-order``), one JSON object per job with ``--json``, and, when stderr is a terminal, a progress
bar with done, failed and running counts, the time left, and how many jobs each node ran.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import click
import msgpack
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from vesta.cli import output
from vesta.cli.output import no_color
from vesta.cli.tables import reason_cell, took, when
from vesta.control import ControlClient
from vesta.errors import InvalidJob, PeerUnavailable
from vesta.sweepspec import MAX_SWEEP_BYTES, Halt, SweepSpec, read_joblog, resume_seqs

MARKERS = (":::", "::::")


def split_inputs(words: tuple[str, ...]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """``CMD ARGS... ::: A B :::: FILE``: the command template and its input sources (a ``::::`` file's lines,
    ``-`` standard input's). InvalidJob (exit 2) for a command without inputs or a file that cannot be read."""
    first = next((i for i, w in enumerate(words) if w in MARKERS), None)
    if first is None:
        raise InvalidJob("map needs inputs: end the command with ::: A B C (or :::: FILE, one input a line)")
    template = words[:first]
    if not template:
        raise InvalidJob("map needs a command before its inputs: vesta map -- CMD ARGS... ::: A B C")
    sources: list[tuple[str, ...]] = []
    marker = ""
    for word in words[first:]:
        if word in MARKERS:
            marker = word
            if word == ":::":
                sources.append(())
            continue
        if marker == ":::":
            sources[-1] += (word,)
        else:
            sources.append(tuple(_lines(word)))
    if marker == "::::" and words[-1] == "::::":
        raise InvalidJob(":::: needs a file name (one input a line; - for standard input)")
    for i, source in enumerate(sources, 1):
        if not source:
            raise InvalidJob(f"input source {i} is empty: nothing to run (give ::: at least one argument)")
    return template, sources


def _lines(name: str) -> list[str]:
    try:
        if name == "-":
            text = sys.stdin.read()
        else:
            with open(name, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
    except OSError as exc:
        raise InvalidJob(f":::: {name}: cannot read it ({exc.strerror or exc}); give a readable file, "
                         "one input a line") from None
    return [line for line in text.splitlines() if line]


def build_spec(words: tuple[str, ...], *, jobs: int, on: str | None, need: list[str], timeout: float | None,
               mem: int | None, retries: int, halt: str | None, puts: tuple[str, ...], put_each: tuple[str, ...],
               results: str | None, joblog: str | None, resume: bool, resume_failed: bool) -> SweepSpec | None:
    """The sweep ``vesta map`` asks for, checked (InvalidJob names the problem); None when a ``--resume``
    finds every job done already."""
    template, sources = split_inputs(words)
    if timeout is not None and timeout <= 0:
        raise InvalidJob("--timeout must be a positive number of seconds")
    if mem is not None and mem <= 0:
        raise InvalidJob("--mem must be a positive number of MiB")
    if jobs < 0:
        raise InvalidJob("-j must be a positive number of jobs in flight (or 0: as many as the federation takes)")
    if (resume or resume_failed) and not joblog:
        raise InvalidJob("--resume and --resume-failed read the joblog: give it with --joblog FILE")
    files = []
    for put in puts:
        path = os.path.abspath(put)
        if not os.path.isfile(path):
            raise InvalidJob(f"--put {put}: " + ("not a regular file (ship a directory as an archive: tar czf)"
                                                 if os.path.exists(path) else "no such file"))
        files.append(path)
    spec = SweepSpec(template=template, sources=tuple(sources), jobs=jobs, on=on, need=tuple(need),
                     timeout_s=timeout or 0.0, mem_mib=mem or 0, retries=retries, halt=Halt.parse(halt),
                     puts=tuple(files), put_each=put_each, results=os.path.abspath(results) if results else "",
                     joblog=os.path.abspath(joblog) if joblog else "", cwd=os.getcwd())
    spec.validate()
    if (resume or resume_failed) and joblog and os.path.exists(joblog):
        with open(joblog, encoding="utf-8", errors="replace") as f:
            logged = read_joblog(f)
        seqs = resume_seqs(spec.total, logged, failed_too=resume_failed)
        if not seqs:
            return None
        spec = spec.with_(seqs=seqs, joblog_from=os.path.getsize(joblog))
    return spec


class SweepView:
    """What a followed sweep prints: its jobs' output (or JSON), and the progress bar on a terminal."""

    def __init__(self, *, as_json: bool, keep_order: bool) -> None:
        self.as_json = as_json
        self.keep_order = keep_order
        self.held: dict[int, dict[str, Any]] = {}
        self.order: list[int] = []       # the numbers this sweep runs, in order (for --keep-order)
        self.next_at = 0
        self.bar: Progress | None = None
        self.task: Any = None
        self.show_bar = sys.stderr.isatty() and not as_json

    def __enter__(self) -> SweepView:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind in ("sweep-start", "sweep-progress"):
            self._progress(ev)
        elif kind == "sweep-job" and isinstance(ev.get("sweep"), dict):
            self._progress(ev["sweep"])
        if kind != "sweep-job":
            return
        if self.keep_order:
            self.held[int(ev["seq"])] = ev
            self._release()
        else:
            self._print(ev)

    def order_is(self, seqs: list[int]) -> None:
        self.order = seqs

    def _release(self) -> None:
        while self.next_at < len(self.order) and self.order[self.next_at] in self.held:
            self._print(self.held.pop(self.order[self.next_at]))
            self.next_at += 1

    def flush(self) -> None:
        """What --keep-order still holds (jobs before them never ran: a halted or cancelled sweep)."""
        for seq in sorted(self.held):
            self._print(self.held.pop(seq))

    def _print(self, ev: dict[str, Any]) -> None:
        if self.as_json:
            body = {k: ev.get(k) for k in ("seq", "job_id", "node", "exit_code", "signal", "outcome", "reason",
                                           "command", "start", "runtime")}
            body |= {s: bytes(ev.get(s) or b"").decode("utf-8", "replace") for s in ("stdout", "stderr")}
            self._out(lambda: click.echo(json.dumps(body, sort_keys=True)))
            return

        def write() -> None:
            sys.stdout.buffer.write(bytes(ev.get("stdout") or b""))
            sys.stdout.buffer.flush()
            sys.stderr.buffer.write(bytes(ev.get("stderr") or b""))
            sys.stderr.buffer.flush()
            if not ev.get("ok") and ev.get("reason"):
                click.echo(f"vesta: job {ev['seq']} ({ev['command'][:60]}) on {ev.get('node') or '-'}: {ev['reason']}",
                           err=True)
        self._out(write)

    def _out(self, write: Any) -> None:
        if self.bar is not None:
            self.bar.stop()   # the output goes above the bar, which is drawn again after it
            write()
            self.bar.start()
        else:
            write()

    def _progress(self, ev: dict[str, Any]) -> None:
        if not self.show_bar:
            return
        if self.bar is None:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[counts]}"), TimeRemainingColumn(),
                                console=Console(stderr=True, no_color=no_color()), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(str(ev.get("sweep_id", "sweep")), total=ev.get("total") or 0, counts="")
        nodes = ", ".join(f"{n} {c}" for n, c in sorted((ev.get("per_node") or {}).items()))
        counts = f"done {ev.get('succeeded', 0)}  failed {ev.get('failed', 0)}  running {ev.get('running', 0)}" + (
            f"  [{nodes}]" if nodes else "")
        self.bar.update(self.task, completed=ev.get("done", 0), total=ev.get("total") or 0, counts=counts)


def follow(client: ControlClient, op: str, view: SweepView, deadline: float | None = None,
           **args: Any) -> dict[str, Any]:
    """Send ``op`` (map or sweep) and print the sweep's events until it ends; its summary. With ``deadline``
    (monotonic), PeerUnavailable when it passes first, as when the socket's own timeout runs out (a sweep that
    sends nothing meanwhile)."""
    def event(ev: dict[str, Any]) -> None:
        view.event(ev)
        if deadline is not None and time.monotonic() > deadline:
            raise PeerUnavailable("the sweep was still running at the deadline")

    with view:
        summary: dict[str, Any] = client.call(op, on_event=event, **args)
        view.flush()
    return summary


def said(summary: dict[str, Any]) -> str:
    """The last line a followed sweep prints (stderr, a terminal only)."""
    left = summary["total"] - summary["done"]
    return (f"vesta: sweep {summary['sweep_id']} {summary['state']}: {summary['succeeded']} succeeded, "
            f"{summary['failed']} failed" + (f", {left} not run" if left else "")
            + (f" ({summary['reason']})" if summary.get("reason") else "")
            + (f"; ran on {', '.join(f'{n} {c}' for n, c in sorted(summary['per_node'].items()))}"
               if summary.get("per_node") else ""))



def run_map(connect: Callable[[], ControlClient], spec: SweepSpec | None, *, as_json: bool, detach: bool,
            keep_order: bool, nothing: str) -> int:
    """`vesta map`: submit the sweep and follow it (or, with ``detach``, print its id); the exit status."""
    if spec is not None and (size := len(msgpack.packb(spec.to_wire()))) > MAX_SWEEP_BYTES:
        raise InvalidJob(f"the inputs take {size / (1 << 20):.1f} MiB, more than one request carries "
                         f"({MAX_SWEEP_BYTES >> 20} MiB): split the sweep, or ship the data with --put")
    if spec is None:
        click.echo(f"vesta: nothing to run: {nothing}", err=True)
        return 0
    if detach:
        with connect() as c:
            r = c.call("map", spec=spec.to_wire(), detach=True)
        click.echo(json.dumps({"sweep": r}, sort_keys=True)) if as_json else click.echo(r["sweep_id"])
        return 0
    view = SweepView(as_json=as_json, keep_order=keep_order)
    view.order_is(spec.to_run())
    with connect() as c:
        summary = follow(c, "map", view, spec=spec.to_wire())
    return sweep_end(summary, as_json)


def wait_sweep(connect: Callable[[], ControlClient], sweep_id: str, timeout: float | None, *, as_json: bool) -> int:
    """`vesta wait SWEEP`: follow the sweep again (its progress, and the output of jobs that end from now on); the
    exit status, 124 when ``timeout`` passes first."""
    try:
        with connect() as c:
            if timeout is not None:
                c.sock.settimeout(max(timeout, 0.1))
            summary = follow(c, "sweep", SweepView(as_json=as_json, keep_order=False), sweep_id=sweep_id,
                             deadline=None if timeout is None else time.monotonic() + timeout)
    except PeerUnavailable:   # the deadline passed (or the socket's timeout, nothing heard meanwhile)
        click.echo(f"vesta: sweep {sweep_id} still running after {timeout:g}s", err=True)
        return 124
    return sweep_end(summary, as_json)


def sweep_end(summary: dict[str, Any], as_json: bool) -> int:
    """The last word of a followed sweep: JSON, or a line on stderr (a terminal, or when something failed)."""
    if as_json:
        click.echo(json.dumps({"sweep": summary}, sort_keys=True))
    elif sys.stderr.isatty() or summary["failed"] or summary["state"] != "succeeded":
        click.echo(said(summary), err=True)
    return int(summary["exit_code"])


def show_sweep(sweep: dict[str, Any], *, header: bool) -> None:
    """`vesta show SWEEP`: the sweep and each of its jobs."""
    args = sweep.get("args") or {}
    counts = ", ".join(f"{v} {k}" for k, v in sweep["counts"].items() if v) or "no jobs yet"
    output.line(f"[bold]{sweep['id']}[/]  map {' '.join(args.get('template') or [])}  [bold]{sweep['state']}[/]")
    output.line(f"submitted by {sweep['submitter']} at {when(sweep['created'])}; finished {when(sweep.get('finished'))}"
                f"; jobs: {counts}")
    if sweep.get("reason"):
        output.line(f"reason: {sweep['reason']}")
    cells = [[str(j["sweep_seq"]), j["id"], " ".join(j.get("argv") or [])[:50], j.get("node") or "-",
              took(j), j["outcome"], reason_cell(j, j["outcome"])] for j in sweep["jobs"]]
    output.table(("seq", "job", "command", "node", "took", "outcome", "reason"), cells, header=header)
