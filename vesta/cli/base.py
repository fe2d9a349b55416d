"""click, used the way a Unix user expects it, for all four tools.

- GNU long options (``--name``) with the seed's single-dash spellings (``-name``) as aliases.
- A negative number is an argument, never an unknown flag (``vesta cpu -5`` says what is wrong with -5).
- The options every ``vesta`` command shares (``--name``, ``--json``, ``--no-header``) are taken before
  or after the subcommand: ``vesta --json peers`` and ``vesta peers -name desk`` mean the same.
- ``--version`` on every tool (``-v`` adds the Python and crypto library versions).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import click

import vesta

F = TypeVar("F", bound=Callable[..., Any])

HELP = {"help_option_names": ["-h", "-help", "--help"]}
NEGATIVE = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _known_flags(cmd: click.Command, ctx: click.Context) -> set[str]:
    known: set[str] = set()
    for param in cmd.get_params(ctx):
        known.update(getattr(param, "opts", []))
        known.update(getattr(param, "secondary_opts", []))
    return known


class Command(click.Command):
    """A command whose unknown flags are errors (with a suggestion) and whose negative numbers are arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings: dict[str, Any] = dict(HELP)
        settings.update(kwargs.pop("context_settings", None) or {})
        kwargs["context_settings"] = settings
        super().__init__(*args, **kwargs)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        bad = unknown_flag(self, ctx, args)
        if bad is not None:
            import difflib

            close = difflib.get_close_matches(bad.split("=", 1)[0], sorted(_known_flags(self, ctx)), n=1)
            raise click.NoSuchOption(bad, possibilities=close, ctx=ctx)
        # What is left that looks like a flag is a negative number: click passes it on as an argument.
        ctx.ignore_unknown_options = True
        return super().parse_args(ctx, args)


def unknown_flag(cmd: click.Command, ctx: click.Context, args: Sequence[str]) -> str | None:
    """The first argument that looks like a flag ``cmd`` does not have (a negative number is not one)."""
    known = _known_flags(cmd, ctx)
    takes_value = {o for p in cmd.get_params(ctx) if isinstance(p, click.Option) and not p.is_flag and not p.count
                   for o in p.opts + p.secondary_opts}
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--":
            return None
        if not arg.startswith("-") or len(arg) == 1:
            if not ctx.allow_interspersed_args:
                return None      # the rest belongs to the command being run
            continue
        if NEGATIVE.fullmatch(arg):
            continue
        flag = arg.split("=", 1)[0]
        if flag in known:
            skip = flag in takes_value and "=" not in arg
            continue
        if not arg.startswith("--") and f"-{arg[1]}" in known:   # -c3, -fq
            skip = f"-{arg[1]}" in takes_value and len(arg) == 2
            continue
        return arg
    return None


class Group(click.Group):
    """The ``vesta`` group: subcommands are :class:`Command`; errors name the subcommand."""

    command_class = Command

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings: dict[str, Any] = dict(HELP)
        settings.update(kwargs.pop("context_settings", None) or {})
        kwargs["context_settings"] = settings
        super().__init__(*args, **kwargs)


# ---- the options every vesta command shares, accepted before or after the subcommand


@dataclass
class Shared:
    name: str | None = None
    json: bool = False
    header: bool = True


def shared(ctx: click.Context) -> Shared:
    root = ctx.find_root()
    if not isinstance(root.obj, Shared):
        root.obj = Shared()
    return root.obj


def _set(field: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is None or value is False:
            return
        setattr(shared(ctx), field, value if field != "header" else False)
    return callback


def shared_options(f: F) -> F:
    """``--name``/``-name``, ``--json``/``-json`` and ``--no-header``, on the group and on every subcommand."""
    f = click.option("--no-header", "-no-header", "no_header", is_flag=True, expose_value=False,
                     callback=_set("header"), help="Plain output: leave out the table's header line.")(f)
    f = click.option("--json", "-json", "as_json", is_flag=True, expose_value=False, callback=_set("json"),
                     help="Print machine-readable JSON.")(f)
    f = click.option("--name", "-name", "name", expose_value=False, callback=_set("name"),
                     metavar="NODE", help="Which local vestad to talk to (default: $VESTA_NAME, or the only one).")(f)
    return f


# ---- --version


def versions(verbose: bool) -> str:
    # only --version needs these two: imported here, not at start-up
    import platform
    from importlib import metadata

    lines = [f"{{prog}} {vesta.__version__}", f"Python {platform.python_version()} ({sys.executable})"]
    if verbose:
        for dist in ("cryptography", "PyNaCl", "click", "msgpack", "psutil", "rich"):
            try:
                lines.append(f"{dist} {metadata.version(dist)}")
            except metadata.PackageNotFoundError:
                lines.append(f"{dist} not installed")
        try:
            from cryptography.hazmat.backends.openssl.backend import backend

            lines.append(f"OpenSSL {backend.openssl_version_text()}")
        except Exception:  # noqa: BLE001 - a version line is best effort
            pass
        try:
            import nacl.bindings

            lines.append(f"libsodium {nacl.bindings.sodium_version_string()}")  # type: ignore[attr-defined]
        except (ImportError, AttributeError):
            pass
    return "\n".join(lines)


def version_option(prog: str, hidden_verbose: bool = False) -> Callable[[F], F]:
    def show(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if not value or ctx.resilient_parsing:
            return
        verbose = any(a in ("-v", "--verbose") or re.fullmatch(r"-v+", a) for a in sys.argv[1:])
        click.echo(versions(verbose).replace("{prog}", prog))
        ctx.exit(0)
    option = click.option("--version", "-version", is_flag=True, expose_value=False, is_eager=True, callback=show,
                          help="Print the version (with -v: Python and crypto library versions) and exit.")
    if not hidden_verbose:
        return option
    verbose = click.option("-v", "verbose_version", count=True, expose_value=False, hidden=True)

    def both(f: F) -> F:
        return option(verbose(f))
    return both


def command_path(exc: click.ClickException) -> str | None:
    ctx = getattr(exc, "ctx", None)
    return ctx.command_path if isinstance(ctx, click.Context) else None


def usage_message(prog: str, exc: click.UsageError) -> str:
    """One line: the subcommand, what is wrong, where its help is."""
    path = command_path(exc) or prog
    sub = path[len(prog):].strip()
    if isinstance(exc, click.exceptions.NoSuchOption):
        what = f"unknown flag {exc.option_name!r}"
        if exc.possibilities:
            what += f" (did you mean {sorted(exc.possibilities)[0]!r}?)"
    else:
        what = exc.format_message()
    return f"{sub + ': ' if sub else ''}{what} (see `{path} --help`)"
