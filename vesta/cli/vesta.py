"""vesta: the control CLI. Every command talks to the local vestad and takes --json."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any, NoReturn

import click
from rich import box
from rich.table import Table

from vesta.cli.common import option_json, print_json, run_command, stdout_console
from vesta.control import ControlClient
from vesta.errors import ConfigError


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
    for col in ("name", "address", "cores", "cpu%", "mem free", "offered", "spare", "power", "gpu", "last seen"):
        table.add_column(col, justify="right" if col in ("cores", "cpu%", "spare") else "left")
    for r in rows:
        name = r["name"] + (" (self)" if r["state"] == "self" else " (suspect)" if r["state"] == "suspect" else "")
        gpu = ", ".join(g["name"] for g in r.get("gpus", [])) or "-"
        table.add_row(
            name, r["address"], str(r["cores"]), f"{r['cpu_pct']:.0f}", _mb(r["mem_avail_mb"]),
            f"{r['offered_cores']:.1f} cores / {_mb(r['offered_mem_mb'])}", f"{r['spare_cores']:.1f}",
            _power(r), gpu, "-" if r["state"] == "self" else _ago(r["last_seen_s"]),
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


def main() -> NoReturn:
    run_command(cli, "vesta")


if __name__ == "__main__":
    main()
