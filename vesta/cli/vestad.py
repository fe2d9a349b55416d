"""vestad: the daemon. Parses flags into a Config and hands it to ``run()``."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import click

from vesta import proctree
from vesta.cli.base import Command, version_option
from vesta.cli.common import run_command, setup_logging
from vesta.config import Config, hide_key_from_proc, load
from vesta.daemon import Daemon
from vesta.errors import ConfigError

log = logging.getLogger("vesta.vestad")

_INT_FLAGS = ("port", "dport", "advertise_spare_ms")


async def run(cfg: Config) -> None:
    """Run one daemon until SIGINT or SIGTERM, then stop it cleanly."""
    # Handlers first: the control socket answers while start-up finishes, so a client may already
    # have seen the daemon (and a supervisor may signal it) before Daemon.start returns.
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if cfg.allow_exec:   # what a job leaves behind, and a sandbox's init, come to us: counted and reaped
        proctree.become_subreaper()
    daemon = await Daemon.start(cfg)
    try:
        await stop.wait()
        log.info("signal received, stopping")
    finally:
        await daemon.stop()


def _to_int(flag: str, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"-{flag.replace('_', '-')} must be a whole number (got {value!r})") from None


def _print_data(name: str) -> Callable[[click.Context, click.Parameter, bool], None]:
    def show(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if not value or ctx.resilient_parsing:
            return
        text = resources.files("vesta").joinpath("data", name).read_text()
        if name.endswith(".service"):
            exe = Path(sys.argv[0]) if Path(sys.argv[0]).name == "vestad" else Path(sys.executable).parent / "vestad"
            text = text.replace("@VESTAD@", str(exe.absolute()))
        click.echo(text, nl=False)
        ctx.exit(0)
    return show


@click.command(cls=Command)
@version_option("vestad")
@click.option("--print-config-example", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_data("config.example.json"),
              help="Print an example config file, every field explained, and exit.")
@click.option("--print-systemd-unit", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_data("vestad.service"), help="Print a systemd user unit for vestad, and exit.")
@click.option("-name", "--name", help="Node name shown to peers (default: host name). Sanitized to [A-Za-z0-9_.-].")
@click.option("-key", "--key", help="Federation key. Visible in `ps`: prefer -key-file or VESTA_KEY.")
@click.option("-key-file", "--key-file", "key_file",
              help="Read the federation key from this file, mode 0600 (default: ~/.config/vesta/federation.key).")
@click.option("-port", "--port", help="TCP port of the peer protocol (default 7777; 0 = any free port).")
@click.option("-dport", "--dport", help="UDP discovery port, the same on every node (default 7778).")
@click.option("-bind", "--bind", help="Listen address for TCP (default 0.0.0.0).")
@click.option("-advertise", "--advertise", help="Address peers should dial (default: the beacon's source).")
@click.option("-allow-exec", "--allow-exec", "allow_exec", is_flag=True, default=None,
              help="Let peers run commands here (off by default).")
@click.option("-power", "--power", help="auto (follow the battery), grid, solar or battery.")
@click.option("-seed", "--seed", "seeds", multiple=True,
              help="host:port of a peer beyond broadcast reach (repeat or comma-separate).")
@click.option("-advertise-spare", "--advertise-spare", "advertise_spare_ms",
              help="Beacon interval in milliseconds (default 1000).")
@click.option("-config", "--config",
              help="JSON config file (default: ~/.config/vesta/vestad.json when it exists; "
                   "see --print-config-example).")
@click.option("-state-dir", "--state-dir", "state_dir", help="Where identity, ledger and records live.")
@click.option("-label", "--label", "labels", multiple=True, help="A tag shown to peers (repeatable).")
@click.option("-metrics", "--metrics", "metrics", metavar="ADDR:PORT",
              help="Serve Prometheus metrics here (e.g. 127.0.0.1:9464; unauthenticated). Off by default.")
@click.option("-sys-root", "--sys-root", "sys_root", hidden=True)
@click.option("-proc-root", "--proc-root", "proc_root", hidden=True)
@click.option("-v", "--verbose", count=True, help="Log every packet decision (debug).")
@click.option("-q", "--quiet", is_flag=True, help="Log warnings and errors only.")
def cli(verbose: int, quiet: bool, **flags: Any) -> None:
    """Vesta daemon: one per machine. Finds peers, lends spare capacity, runs jobs."""
    setup_logging(verbose, quiet)
    for name in _INT_FLAGS:
        flags[name] = _to_int(name, flags[name])
    flags["seeds"] = ",".join(flags["seeds"]) or None
    flags["labels"] = ",".join(flags["labels"]) or None
    cfg = load(flags)
    hide_key_from_proc()   # a job running as another user could read it in /proc/PID/cmdline
    if flags.get("key"):
        log.warning("the key given with -key is visible to other users in `ps`; prefer -key-file or VESTA_KEY")
    try:
        import uvloop  # a faster event loop where it is installed (a job's dispatch is mostly loop work)
    except ImportError:
        asyncio.run(run(cfg))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run(cfg))


def main() -> NoReturn:
    run_command(cli, "vestad")


if __name__ == "__main__":
    main()
