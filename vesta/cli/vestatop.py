"""vestatop: the live federation monitor.

One control-socket call (``snapshot``) gives the whole picture; ``render`` turns a
snapshot into a frame and is pure (snapshot and size in, renderable out), so the
layout is tested by rendering recorded snapshots. The ``Monitor`` loop polls,
redraws and reads keys; it holds no federation logic of its own.
"""

from __future__ import annotations

import math
import os
import select
import shutil
import sys
import termios
import time
import tty
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import click
from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.measure import Measurement
from rich.rule import Rule
from rich.styled import Styled
from rich.table import Table
from rich.text import Text

from vesta.cli.base import Command, version_option
from vesta.cli.common import option_json, print_json, run_command
from vesta.control import ControlClient
from vesta.errors import ConfigError, VestaError

SORTS = ("name", "cpu", "mem", "spare")   # `s` cycles through these; self always stays first
WIDE = 120            # columns from which per-core bars, core counts and memory sizes appear
BLOCK_BYTES = 64      # a cpu job iteration hashes one 64-byte block: rate x 64 = bytes/s
KEY_POLL_S = 0.25     # longest wait for a key, so a resized terminal is redrawn promptly
CALL_TIMEOUT_S = 5.0  # a wedged daemon freezes the screen for at most this long
_EIGHTHS = " ▏▎▍▌▋▊▉"
_LEVELS = "▁▂▃▄▅▆▇█"
HELP = """\
q  quit     p  pause / resume     s  sort by name, cpu, mem, spare     ?  this help

cpu         busy share of the cores the daemon may use
per core    every core of the machine (wide terminals only)
mem         used share of the machine's memory
busy/offer  cores in use out of those the node offers to the federation
jobs        jobs with chunks running on the node, as far as this daemon sees
ledger      balance with the peer in core-seconds (cs) or hours (ch); + they owe us
lending     whether the node's lending hours are open now
seen        age of the last beacon: a quiet node greys out, then disappears
flows       lender → borrower, rate of hashing; ⟲ a node's own share of its job"""


def _num(row: Mapping[str, Any], key: str, default: float = 0.0) -> float:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _load_style(pct: float) -> str:
    return "green" if pct < 50 else "yellow" if pct < 80 else "red"


class Meter:
    """A bar that fills the width its column is given: ``████▌░░░  42%``."""

    def __init__(self, pct: float, label: str, *, dim: bool = False, min_bar: int = 4) -> None:
        self.pct = min(100.0, max(0.0, pct))
        self.label = label
        self.dim = dim
        self.min_bar = min_bar

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(self.min_bar + 1 + len(self.label), options.max_width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(self.min_bar, options.max_width - 1 - len(self.label))
        eighths = round(self.pct / 100 * width * 8)
        full, part = divmod(eighths, 8)
        filled = "█" * full + (_EIGHTHS[part] if part else "")
        colour = "grey50" if self.dim else _load_style(self.pct)
        yield Text.assemble((filled, colour), ("░" * (width - len(filled)), "grey35"), " ",
                            (self.label, "grey50" if self.dim else ""), no_wrap=True)


def per_core(values: list[Any], dim: bool = False) -> Text:
    """One glyph per core, its height the core's load: ``▁▁█▃``."""
    text = Text(no_wrap=True, overflow="ellipsis")
    for v in values:
        pct = min(100.0, max(0.0, float(v))) if isinstance(v, (int, float)) else 0.0
        text.append(_LEVELS[min(7, math.ceil(pct / 100 * 8) - 1) if pct > 0 else 0],
                    "grey50" if dim else _load_style(pct))
    return text


def _ago(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def _power(row: Mapping[str, Any]) -> str:
    text = str(row.get("power") or "?")
    return text + (f" {_num(row, 'battery_pct'):.0f}%" if row.get("battery_pct") is not None else "")


def _mem_pct(row: Mapping[str, Any]) -> float:
    total = _num(row, "mem_total_mb")
    return 100.0 * (total - _num(row, "mem_avail_mb")) / total if total > 0 else 0.0


def _lending(value: Any, wide: bool) -> Text:
    """Whether the node lends now (its lending hours); "closed" is worth a colour."""
    if isinstance(value, bool):
        value = "open" if value else "closed"
    text = "-" if value is None else str(value)
    return Text(text if wide else {"open": "yes", "closed": "no"}.get(text, text),
                style="yellow" if text == "closed" else "")


def _balance(row: Mapping[str, Any], wide: bool) -> Text:
    """Ledger balance with this peer (core-seconds, + means they owe us), flagged when capped."""
    value = row.get("balance")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return Text("-" if value is None else str(value))
    text = Text(f"{value / 3600:+.1f}ch" if abs(value) >= 3600 else f"{value:+.0f}cs",
                style="green" if value >= 0 else "yellow")
    if row.get("ledger_state") == "capped":
        text.append(" capped" if wide else "!", "red")
    return text


def _sort_key(sort: str) -> Callable[[Mapping[str, Any]], Any]:
    if sort == "cpu":
        return lambda r: (-_num(r, "cpu_pct"), str(r.get("name")))
    if sort == "mem":
        return lambda r: (-_mem_pct(r), str(r.get("name")))
    if sort == "spare":
        return lambda r: (-_num(r, "spare_cores"), str(r.get("name")))
    return lambda r: str(r.get("name"))


def nodes_table(snap: Mapping[str, Any], width: int, max_rows: int, sort: str) -> Table:
    """One row per node, self first: power, cpu and mem bars, capacity, jobs, staleness."""
    rows = [r for r in snap.get("nodes") or [] if isinstance(r, dict)]
    rows = [r for r in rows if r.get("state") == "self"] + sorted(
        (r for r in rows if r.get("state") != "self"), key=_sort_key(sort))
    wide = width >= WIDE
    jobs: dict[str, set[str]] = {}
    for f in list(snap.get("flows") or []) + list(snap.get("local_work") or []):
        jobs.setdefault(str(f.get("from")), set()).add(str(f.get("job_id")))
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=True, header_style="bold",
                  padding=(0, 1), collapse_padding=not wide)
    table.add_column("node", no_wrap=True, overflow="ellipsis", max_width=16 if wide else 10)
    table.add_column("power", no_wrap=True, max_width=14)
    if wide:
        table.add_column("cores", justify="right")
        table.add_column("load", justify="right")
    table.add_column("cpu", ratio=3, no_wrap=True)
    if wide:
        table.add_column("per core", no_wrap=True, max_width=max(8, width // 5))
    table.add_column("mem", ratio=2, no_wrap=True)
    table.add_column("busy/offer" if wide else "busy", justify="right", no_wrap=True)
    table.add_column("jobs", justify="right")
    extras = [key for key in ("balance", "lending") if any(key in r for r in rows)]
    for key in extras:
        table.add_column({"balance": "ledger", "lending": "lending" if wide else "lend"}[key], justify="right",
                         no_wrap=True)
    table.add_column("seen", justify="right", no_wrap=True)
    shown = rows if len(rows) <= max_rows else rows[:max(0, max_rows - 1)]
    for r in shown:
        state = r.get("state")
        stale = state == "suspect"
        cpu, mem = _num(r, "cpu_pct"), _mem_pct(r)
        offered = _num(r, "offered_cores")
        busy = max(0.0, offered - _num(r, "spare_cores"))
        total_gib, used_gib = _num(r, "mem_total_mb") / 1024, (_num(r, "mem_total_mb") - _num(r, "mem_avail_mb")) / 1024
        mem_label = f"{used_gib:.1f}/{total_gib:.1f}G" if wide else f"{mem:3.0f}%"
        age = _ago(_num(r, "last_seen_s"))
        seen = "self" if state == "self" else f"suspect {age}" if stale and wide else age
        name = Text(str(r.get("name", "?")), style="bold cyan" if state == "self" else "bold")
        n_jobs = len(jobs.get(str(r.get("name")), ()))
        power = _power(r) if wide else _power(r).replace("battery", "batt")
        cells: list[RenderableType] = [name, power]
        if wide:
            cells += [str(int(_num(r, "cores"))), f"{_num(r, 'load1'):.2f}"]
        cells.append(Meter(cpu, f"{cpu:3.0f}%", dim=stale))
        if wide:
            cells.append(per_core(list(r.get("cpu_per_core") or []), dim=stale))
        cells += [Meter(mem, mem_label, dim=stale, min_bar=3), f"{busy:.1f}/{offered:.1f}",
                  Text(str(n_jobs), style="" if n_jobs else "grey50")]
        for key in extras:
            cells.append(_balance(r, wide) if key == "balance" else _lending(r.get(key), wide))
        cells.append(Text(seen, style="yellow" if stale else ""))
        table.add_row(*cells, style="grey50" if stale else None)
    if len(shown) < len(rows):
        table.add_row(Text(f"+{len(rows) - len(shown)} more", style="grey50"))
    return table


def flow_lines(snap: Mapping[str, Any]) -> list[Text]:
    """``b → a  cpu 2 chunks  0.70 GB/s``: lender → borrower; a node's own share as ``a ⟲ a``."""
    lines = []
    for own, flows in ((False, snap.get("flows") or []), (True, snap.get("local_work") or [])):
        for f in sorted(flows, key=lambda f: (-_num(f, "rate"), str(f.get("from")))):
            chunks = int(_num(f, "chunks"))
            text = Text(no_wrap=True, overflow="ellipsis")
            text.append(f"{f.get('from')} {'⟲' if own else '→'} {f.get('to')}", "bold magenta" if not own else "bold")
            text.append(f"  {f.get('kind', '?')} {chunks} chunk{'s' if chunks != 1 else ''}")
            if f.get("kind") == "cpu":
                text.append(f"  {_num(f, 'rate') * BLOCK_BYTES / 1e9:.2f} GB/s", "green")
                text.append(f"  {_num(f, 'done') / 1e6:.0f}M blocks", "grey50")
            text.append(f"  {f.get('job_id', '')}" + ("  (own)" if own else ""), "grey50")
            lines.append(text)
    return lines


def _event_line(ev: Mapping[str, Any]) -> Text:
    kind = str(ev.get("kind", ""))
    style = "red" if "fail" in kind or "refus" in kind or kind == "job_timed_out" else "green" \
        if kind in ("job_done", "job_succeeded", "peer_joined", "start") \
        else "yellow" if kind in ("peer_left", "peer_suspect", "stress", "hours", "job_cancelled") else ""
    return Text.assemble((_clock(_num(ev, "ts")) + " ", "grey50"), (f"{kind:<14} ", style), str(ev.get("text", "")),
                         no_wrap=True, overflow="ellipsis")


def _header(snap: Mapping[str, Any] | None, width: int, sort: str, paused: bool) -> Table:
    left = Text("vestatop", style="bold")
    if snap is not None:
        rows = [r for r in snap.get("nodes") or [] if isinstance(r, dict)]
        flows = len(snap.get("flows") or [])
        suspect = sum(1 for r in rows if r.get("state") == "suspect")
        left.append(f"  {snap.get('self', '?')}  {len(rows)} node{'s' if len(rows) != 1 else ''}")
        if suspect:
            left.append(f" ({suspect} suspect)", "yellow")
        left.append(f"  {flows} flow{'s' if flows != 1 else ''}  sort {sort}")
    if paused:
        left.append("  PAUSED", "bold yellow")
    right = Text((_clock(_num(snap, "time")) + "  ") if snap else "")
    right.append("q quit  p pause  s sort  ? help" if width >= 100 else "? help", "grey50")
    grid = Table.grid(expand=True)
    grid.add_column(no_wrap=True, overflow="ellipsis")
    grid.add_column(justify="right", no_wrap=True)
    grid.add_row(left, right)
    return grid


def render(snapshot: Mapping[str, Any] | None, width: int, height: int, *, sort: str = "name",
           paused: bool = False, error: str | None = None, show_help: bool = False) -> RenderableType:
    """One frame from one snapshot, fitted to width x height. Pure: no I/O, no clock."""
    parts: list[RenderableType] = [_header(snapshot, width, sort, paused)]
    if error is not None:
        parts.append(Text(error, style="bold white on red", no_wrap=True, overflow="ellipsis"))
    if show_help:
        return Group(*parts, Rule("help", align="left", style="grey50"), Text(HELP, overflow="ellipsis"))
    if snapshot is None:
        parts.append(Text("waiting for the first snapshot…" if error is None else "no data yet", style="grey50"))
        return Group(*parts)
    # Every line is counted: header (+ error), table head and rule, the flows and events rules; then nodes
    # (leaving flows a quarter of the room), flows, and events get what is left; at least one line each.
    room = height - len(parts) - 4
    flows = flow_lines(snapshot) or [Text("no active flows", style="grey50")]
    n_nodes = min(len(snapshot.get("nodes") or []), max(1, room - min(len(flows), max(1, room // 4)) - 1))
    table = nodes_table(snapshot, width, n_nodes, sort)
    room -= max(1, n_nodes)
    n_flows = max(1, min(len(flows), room - 1))
    if len(flows) > n_flows:
        flows = flows[:n_flows - 1] + [Text(f"+{len(flows) - n_flows + 1} more flows", style="grey50")]
    room -= n_flows
    events = [_event_line(e) for e in snapshot.get("events") or [] if isinstance(e, dict)]
    body: RenderableType = Group(table, Rule("flows", align="left", style="grey50"), *flows,
                                 Rule("events", align="left", style="grey50"), *(events[-room:] if room > 0 else []))
    parts.append(Styled(body, "dim") if error is not None else body)
    return Group(*parts)


class Keys:
    """Single key presses from a terminal, without blocking; the terminal is restored on exit."""

    def __init__(self, stream: Any = None) -> None:
        stream = sys.stdin if stream is None else stream
        try:
            self.fd: int | None = stream.fileno() if stream.isatty() else None
        except (AttributeError, ValueError, OSError):   # no stdin at all, or a closed one
            self.fd = None
        self.saved: list[Any] | None = None

    def __enter__(self) -> Keys:
        if self.fd is not None:
            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None and self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def read(self, timeout: float) -> str:
        if self.fd is None:
            time.sleep(timeout)
            return ""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        return os.read(self.fd, 64).decode(errors="ignore") if ready else ""


class Monitor:
    """The loop: poll the daemon every interval, redraw, react to keys; reconnect when it comes back."""

    def __init__(self, name: str | None, interval: float,
                 connect: Callable[[str | None], ControlClient] | None = None) -> None:
        self.name = name
        self.interval = interval
        self.connect = connect or (lambda n: ControlClient.connect(n, timeout=CALL_TIMEOUT_S))
        self.client: ControlClient | None = None
        self.snapshot: dict[str, Any] | None = None
        self.error: str | None = None
        self.sort = SORTS[0]
        self.paused = False
        self.show_help = False

    def poll(self) -> None:
        try:
            if self.client is None:
                self.client = self.connect(self.name)
            snap = self.client.call("snapshot")
        except (VestaError, OSError, ValueError) as exc:   # ValueError: a garbled reply
            if self.client is not None:
                self.client.close()
                self.client = None
            who = self.name or (self.snapshot or {}).get("self") or ""
            self.error = (f"disconnected from vestad {who}".rstrip() + f" — retrying every {self.interval:g}s "
                          f"(last error: {exc})")
            return
        self.snapshot = snap if isinstance(snap, dict) else None
        self.error = None

    def key(self, keys: str) -> bool:
        """Apply key presses; False means quit."""
        for k in keys:
            if k in "qQ":
                return False
            if k in "pP":
                self.paused = not self.paused
            elif k in "sS":
                self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]
            elif k in "?hH":
                self.show_help = not self.show_help
            elif k == "\x1b":
                self.show_help = False
        return True

    def frame(self, width: int, height: int) -> RenderableType:
        return render(self.snapshot, width, height, sort=self.sort, paused=self.paused, error=self.error,
                      show_help=self.show_help)

    def run(self, console: Console) -> None:
        next_poll = 0.0
        try:
            with Keys() as keys, Live(console=console, screen=True, auto_refresh=False) as live:
                while True:
                    if not self.paused and time.monotonic() >= next_poll:
                        next_poll = time.monotonic() + self.interval
                        self.poll()
                    size = console.size
                    live.update(self.frame(size.width, size.height), refresh=True)
                    wait = min(KEY_POLL_S, next_poll - time.monotonic()) if not self.paused else KEY_POLL_S
                    if not self.key(keys.read(wait)):
                        return
        except KeyboardInterrupt:
            return
        finally:
            if self.client is not None:
                self.client.close()


def frame_size() -> tuple[int, int]:
    """COLUMNS/LINES if set, else the terminal's size, else 120x40 (a pipe)."""
    size = shutil.get_terminal_size((120, 40))
    return max(40, size.columns), max(10, size.lines)


def run(name: str | None, interval: float, once: bool, as_json: bool) -> int:
    if not 0.1 <= interval <= 3600:
        raise ConfigError("--interval must be from 0.1 to 3600 seconds")
    if once or as_json or not sys.stdout.isatty():
        with ControlClient.connect(name, timeout=CALL_TIMEOUT_S) as client:
            snap = client.call("snapshot")
        if as_json:
            print_json(snap)
        else:
            width, height = frame_size()
            Console(width=width, height=height, highlight=False).print(render(snap, width, height))
        return 0
    Monitor(name, interval).run(Console(highlight=False))
    return 0


@click.command(cls=Command)
@version_option("vestatop", hidden_verbose=True)
@click.option("-name", "--name", help="Which local vestad to watch (default: $VESTA_NAME, or the only one).")
@click.option("-interval", "--interval", type=float, default=1.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("-once", "--once", is_flag=True, help="Print one frame and exit (also what a pipe gets).")
@option_json()
def cli(name: str | None, interval: float, once: bool, as_json: bool) -> int:
    """Live view of the federation: nodes, CPU and memory bars, flows of work, events.

    Keys: q quit, p pause, s sort, ? help.
    """
    return run(name, interval, once, as_json)


def main() -> NoReturn:
    run_command(cli, "vestatop")


if __name__ == "__main__":
    main()
