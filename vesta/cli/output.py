"""How the CLI writes to stdout: boxes and colour for a person, plain lines for a pipe.

On a terminal, tables are rich tables (colour only without ``NO_COLOR``). When stdout is not a
terminal, a table is tab-separated columns with one header line (``--no-header`` drops it) and
nothing else: no padding, no rule, no escape codes, so ``cut -f``, ``awk -F'\\t'`` and ``sort``
work on it as they are. rich is imported only when something is drawn for a terminal: a command that
prints JSON or writes to a pipe starts without it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from rich.console import Console

_MARKUP = re.compile(r"\[/?[a-z ]*\]")


def on_terminal() -> bool:
    return sys.stdout.isatty()


def no_color() -> bool:
    """The NO_COLOR convention (https://no-color.org): set and not empty means no colour."""
    return bool(os.environ.get("NO_COLOR"))


def console(stderr: bool = False) -> Console:
    """A rich console for a terminal; only used when the stream is one."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, no_color=no_color())


def plain(text: str) -> str:
    """Rich markup removed (``[bold]x[/]`` -> ``x``)."""
    return _MARKUP.sub("", text)


def line(text: str) -> None:
    """One line of prose: styled (rich markup) on a colour terminal, plain otherwise."""
    if on_terminal() and not no_color():
        console().print(text)
    else:
        click.echo(plain(text))


def _cell(value: object) -> str:
    return " ".join(str(value).split("\t")).replace("\n", " ")


def table(columns: Sequence[str], rows: Iterable[Sequence[object]], *, header: bool = True,
          right: Iterable[str] = (), dim_rows: Iterable[int] = ()) -> None:
    """Print a table: rich on a terminal, tab-separated lines (one header line unless ``header`` is False)
    in a pipe."""
    cells = [[_cell(c) for c in r] for r in rows]
    if not on_terminal():
        if header:
            click.echo("\t".join(columns))
        for r in cells:
            click.echo("\t".join(r))
        return
    from rich import box
    from rich.table import Table

    right = set(right)
    dim = set(dim_rows)
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_header=header)
    for col in columns:
        t.add_column(col, justify="right" if col in right else "left")
    for i, r in enumerate(cells):
        t.add_row(*r, style="dim" if i in dim else None)
    console().print(t)


def pairs(rows: Sequence[tuple[str, str]]) -> None:
    """Key/value lines (``vesta status``): aligned on a terminal, ``key<TAB>value`` in a pipe."""
    if not on_terminal():
        for k, v in rows:
            click.echo(f"{k}\t{_cell(v)}")
        return
    from rich.table import Table

    t = Table(box=None, show_header=False, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    console().print(t)
