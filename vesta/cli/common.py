"""What every entry point shares: logging set-up, error-to-exit-code mapping, output."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import click

from vesta import errors
from vesta.cli.base import usage_message
from vesta.errors import VestaError

if TYPE_CHECKING:   # rich costs tens of milliseconds at start-up: imported where something is drawn
    from rich.console import Console

EXIT_OK = 0
EXIT_ERROR = 1      # the daemon or a peer said no, something failed at run time
EXIT_USAGE = 2      # bad flag, config file or value
EXIT_NO_DAEMON = 3  # nothing to talk to

# Every class of errors.VestaError's tree, and the exit code of the CLI that meets it (the nearest class
# listed wins; tests/test_errors.py checks that every class is here).
EXIT_CODES: dict[type[VestaError], int] = {
    errors.VestaError: EXIT_ERROR,
    errors.ConfigError: EXIT_USAGE,
    errors.IdentityError: EXIT_USAGE,
    errors.InvalidJob: EXIT_USAGE,
    errors.InputError: EXIT_ERROR,
    errors.RecordsVersionError: EXIT_USAGE,
    errors.ProtocolError: EXIT_ERROR,
    errors.FrameTooLarge: EXIT_ERROR,
    errors.AuthError: EXIT_ERROR,
    errors.Dropped: EXIT_ERROR,
    errors.PeerUnavailable: EXIT_ERROR,
    errors.DaemonNotRunning: EXIT_NO_DAEMON,
    errors.Refused: EXIT_ERROR,
    errors.NotFound: EXIT_ERROR,
    errors.JobFailed: EXIT_ERROR,
    errors.NotNow: EXIT_ERROR,
    errors.JobCancelled: EXIT_ERROR,
    errors.RecordsError: EXIT_ERROR,
    errors.StateFull: EXIT_ERROR,
    errors.TransitionError: EXIT_ERROR,
    errors.UnknownRecord: EXIT_ERROR,
    errors.Cancelled: EXIT_ERROR,
    errors.RemoteError: EXIT_ERROR,
}


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    import logging  # the daemons' and vestatop's: a vesta command logs nothing and starts faster without it

    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="%H:%M:%S"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def fail(prog: str, message: str, code: int) -> NoReturn:
    click.echo(f"{prog}: error: {message}", err=True)
    sys.exit(code)


def exit_code(exc: VestaError) -> int:
    """The exit code of the nearest class of ``exc`` in EXIT_CODES (a remote error: the daemon's class)."""
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return EXIT_ERROR


def run_command(cmd: click.Command, prog: str, argv: Sequence[str] | None = None) -> NoReturn:
    """Run a click command so that every user error is one line and a known exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        # Without standalone mode click returns ctx.exit(N)'s code instead of exiting.
        rc = cmd.main(args=args, prog_name=prog, standalone_mode=False)
    except click.UsageError as exc:
        fail(prog, usage_message(prog, exc), EXIT_USAGE)
    except click.exceptions.Abort:
        fail(prog, "aborted", 130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except VestaError as exc:
        fail(prog, str(exc), exit_code(exc))
    except KeyboardInterrupt:
        fail(prog, "interrupted", 130)
    except BrokenPipeError:
        sys.exit(EXIT_OK)
    sys.exit(rc if isinstance(rc, int) else EXIT_OK)


def stdout_console() -> Console:
    """Rich output for a terminal (colour unless NO_COLOR); in a pipe no colour and no padding to a width."""
    from rich.console import Console

    from vesta.cli.output import no_color

    return Console(highlight=False, no_color=no_color(), soft_wrap=not sys.stdout.isatty())


def print_json(data: Any) -> None:
    import json

    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def option_json() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--json", "-json", "as_json", is_flag=True, help="Print machine-readable JSON.")
