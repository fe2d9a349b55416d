"""A sweep (``vesta map``): one command over many inputs, declared once and expanded the same way everywhere.

A ``SweepSpec`` holds the command template, the input sources (each a list of arguments: a ``:::`` list or
the lines of a ``::::`` file) and the options. Job number ``seq`` (from 1) is the ``seq``-th tuple of the
sources' cartesian product, the last source varying fastest, as GNU parallel numbers them. ``argv(seq)``
fills in the replacement strings:

    {}      the input (the tuple's values joined by spaces)    {1} {2} ...   one source's value
    {.}     without its extension    {/}  basename    {//}  dirname    {/.}  basename without extension
    {#}     the job's sequence number               {1.} {1/} {1//} {1/.}    the same for one source

A template with none of them gets the values appended, one argument each. The CLI checks a spec with
``validate()`` (an ``InvalidJob`` naming the problem, exit 2) before sending it; the daemon checks it again
when it arrives and when it rebuilds a sweep from its records after a restart.

The joblog is GNU parallel's (``--joblog``): a header, then one tab-separated line per job that ended:
Seq, Host, Starttime, JobRuntime, Send, Receive, Exitval, Signal, Command.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from vesta.errors import InvalidJob
from vesta.spec import MAX_ARG, MAX_ARGV, MAX_INPUTS, MAX_MEM_MIB, MAX_NEED, MAX_NODE_ARG, MAX_RETRIES, MAX_TIMEOUT_S

MAX_JOBS = 100_000            # jobs in one sweep
MAX_SOURCES = 9               # ::: lists of one sweep
MAX_VALUES = 100_000          # arguments of one source
MAX_JOBS_IN_FLIGHT = 10_000   # -j
MAX_SWEEP_BYTES = 15 << 20    # a sweep's request to its daemon (its inputs, packed); the control socket takes 16 MiB
JOBLOG_HEADER = "Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand"
HALT_WHEN = ("now", "soon")

_REPL = re.compile(r"\{(\d*)(\.|/|//|/\.)?\}|\{#\}")


def is_sweep_id(value: object) -> bool:
    """Sweep ids are "s" and ten hex digits (job ids start with "j")."""
    return isinstance(value, str) and len(value) == 11 and value.startswith("s")


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class Halt:
    """``--halt now,fail=1`` / ``soon,fail=10%``: stop after this many (or this share of all) jobs failed.
    ``now`` cancels the jobs running; ``soon`` lets them end and starts no more."""

    when: str = ""          # "" = never
    count: int = 0          # failures that halt (with pct == 0)
    pct: float = 0.0        # share of the sweep's jobs, in percent

    @classmethod
    def parse(cls, text: str | None) -> Halt:
        if not text:
            return cls()
        m = re.fullmatch(r"(now|soon),fail=(\d+)(%?)", text.strip())
        if m is None:
            raise InvalidJob(f"--halt {text!r}: use now,fail=N or soon,fail=N% (e.g. now,fail=1 or soon,fail=10%)")
        n = int(m.group(2))
        if m.group(3):
            if not 0 < n <= 100:
                raise InvalidJob(f"--halt {text!r}: the share must be from 1% to 100%")
            return cls(m.group(1), 0, float(n))
        if n < 1:
            raise InvalidJob(f"--halt {text!r}: fail= must be at least 1")
        return cls(m.group(1), n, 0.0)

    def text(self) -> str:
        if not self.when:
            return ""
        return f"{self.when},fail={self.count}" if not self.pct else f"{self.when},fail={self.pct:g}%"

    def reached(self, failed: int, total: int) -> bool:
        if not self.when or failed == 0:
            return False
        if self.pct:
            return failed >= max(1, math.ceil(total * self.pct / 100))
        return failed >= self.count


@dataclass(frozen=True, slots=True)
class SweepSpec:
    """What ``vesta map`` asks the daemon to run. Paths (``puts``, ``results``, ``joblog``, ``cwd``) are
    absolute: the CLI makes them so. ``seqs``: the job numbers to run (all when empty; ``--resume``)."""

    template: tuple[str, ...]
    sources: tuple[tuple[str, ...], ...]
    seqs: tuple[int, ...] = ()
    jobs: int = 0                 # -j: jobs in flight at most (0: as many as the federation takes)
    on: str | None = None
    need: tuple[str, ...] = ()
    timeout_s: float = 0.0
    mem_mib: int = 0
    retries: int = 0
    halt: Halt = field(default_factory=Halt)
    puts: tuple[str, ...] = ()    # shipped with every job
    put_each: tuple[str, ...] = ()   # templates: each job's own files ({} and friends filled in)
    results: str = ""             # --results DIR
    joblog: str = ""              # --joblog FILE
    joblog_from: int = 0          # bytes of the joblog written before this sweep (--resume appends)
    cwd: str = "/"                # where relative --put-each paths are (the CLI's working directory)

    @property
    def total(self) -> int:
        return math.prod(len(s) for s in self.sources)

    def to_run(self) -> list[int]:
        return list(self.seqs) if self.seqs else list(range(1, self.total + 1))

    def values(self, seq: int) -> tuple[str, ...]:
        """The ``seq``-th tuple of the sources' product (from 1; the last source varies fastest)."""
        i = seq - 1
        out = []
        for source in reversed(self.sources):
            i, r = divmod(i, len(source))
            out.append(source[r])
        return tuple(reversed(out))

    def argv(self, seq: int) -> tuple[str, ...]:
        values = self.values(seq)
        if not any(_REPL.search(part) for part in self.template):
            return (*self.template, *values)
        return tuple(fill(part, values, seq) for part in self.template)

    def command(self, seq: int) -> str:
        """The job's command line as the joblog shows it."""
        return " ".join(self.argv(seq))

    def put_each_paths(self, seq: int) -> tuple[str, ...]:
        values = self.values(seq)
        return tuple(os.path.join(self.cwd, fill(t, values, seq)) for t in self.put_each)

    def validate(self) -> None:
        t = self.template
        if not isinstance(t, tuple) or not t or not all(isinstance(a, str) for a in t) or not t[0]:
            raise InvalidJob("map needs a command: vesta map -- CMD ARGS... ::: A B C")
        if len(t) > MAX_ARGV or any(len(a) > MAX_ARG or "\x00" in a for a in t):
            raise InvalidJob(f"command too long: at most {MAX_ARGV} arguments of {MAX_ARG} bytes, without NUL bytes")
        if not isinstance(self.sources, tuple) or not self.sources:
            raise InvalidJob("map needs inputs: end the command with ::: A B C (or :::: FILE, one input a line)")
        if len(self.sources) > MAX_SOURCES:
            raise InvalidJob(f"map takes at most {MAX_SOURCES} input sources (::: or ::::)")
        for i, source in enumerate(self.sources, 1):
            if not isinstance(source, tuple) or not all(isinstance(v, str) and "\x00" not in v for v in source):
                raise InvalidJob(f"input source {i} must be a list of arguments")
            if not source:
                raise InvalidJob(f"input source {i} is empty: nothing to run (give it at least one argument)")
            if len(source) > MAX_VALUES:
                raise InvalidJob(f"input source {i} has {len(source):,} arguments; at most {MAX_VALUES:,}")
        if self.total > MAX_JOBS:
            raise InvalidJob(f"the inputs make {self.total:,} jobs; a sweep runs at most {MAX_JOBS:,}")
        for part in t:
            check_template(part, len(self.sources))
        for part in self.put_each:
            try:
                check_template(part, len(self.sources))
            except InvalidJob as exc:
                raise InvalidJob(f"--put-each {part}: {exc}") from None
        if not isinstance(self.seqs, tuple) or not all(_whole(s) and 1 <= s <= self.total for s in self.seqs):
            raise InvalidJob(f"seqs must be job numbers from 1 to {self.total}")
        if not _whole(self.jobs) or not 0 <= self.jobs <= MAX_JOBS_IN_FLIGHT:
            raise InvalidJob(f"-j must be from 1 to {MAX_JOBS_IN_FLIGHT:,} (or 0: as many as the federation takes)")
        if self.on is not None and (not isinstance(self.on, str) or not 0 < len(self.on) <= MAX_NODE_ARG):
            raise InvalidJob(f"--on must be a node name or a fingerprint prefix of at most {MAX_NODE_ARG} characters")
        if not isinstance(self.need, tuple) or len(self.need) > MAX_NEED or not all(
                isinstance(n, str) and n for n in self.need):
            raise InvalidJob(f"--need takes at most {MAX_NEED} labels")
        if (isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float))
                or not 0 <= self.timeout_s <= MAX_TIMEOUT_S):
            raise InvalidJob(f"--timeout must be from 1 to {MAX_TIMEOUT_S} seconds")
        if not _whole(self.mem_mib) or not 0 <= self.mem_mib <= MAX_MEM_MIB:
            raise InvalidJob(f"--mem must be a whole number of MiB, at most {MAX_MEM_MIB}")
        if not _whole(self.retries) or not 0 <= self.retries <= MAX_RETRIES:
            raise InvalidJob(f"--retries must be from 0 to {MAX_RETRIES}")
        if len(self.puts) + len(self.put_each) > MAX_INPUTS:
            raise InvalidJob(f"--put and --put-each take at most {MAX_INPUTS} files in all")
        for what, value in (("--put", self.puts), ("--put-each", self.put_each)):
            if not isinstance(value, tuple) or not all(isinstance(p, str) and p and "\x00" not in p for p in value):
                raise InvalidJob(f"{what} must be a list of file paths")
        for what, path in (("--put", p) for p in self.puts):
            if not os.path.isabs(path):
                raise InvalidJob(f"{what} {path}: the path must be absolute (the vesta CLI makes it so)")
        for what, text in (("--results", self.results), ("--joblog", self.joblog), ("cwd", self.cwd)):
            if not isinstance(text, str) or "\x00" in text or (text and not os.path.isabs(text)):
                raise InvalidJob(f"{what} must be an absolute path (the vesta CLI makes it so)")
        if not _whole(self.joblog_from) or self.joblog_from < 0:
            raise InvalidJob("joblog_from must be a byte offset >= 0")
        if not isinstance(self.halt, Halt):
            raise InvalidJob("halt must be now,fail=N or soon,fail=N%")

    def to_wire(self) -> dict[str, Any]:
        return {"template": list(self.template), "sources": [list(s) for s in self.sources], "seqs": list(self.seqs),
                "jobs": self.jobs, "on": self.on, "need": list(self.need), "timeout_s": self.timeout_s,
                "mem_mib": self.mem_mib, "retries": self.retries, "halt": self.halt.text(), "puts": list(self.puts),
                "put_each": list(self.put_each), "results": self.results, "joblog": self.joblog,
                "joblog_from": self.joblog_from, "cwd": self.cwd}

    @classmethod
    def from_wire(cls, body: object) -> SweepSpec:
        if not isinstance(body, Mapping):
            raise InvalidJob("a sweep must be a map of its fields")

        def strings(key: str) -> tuple[str, ...]:
            value = body.get(key) or ()
            if not isinstance(value, (list, tuple)):
                raise InvalidJob(f"{key} must be a list")
            return tuple(value)

        sources = body.get("sources") or ()
        if not isinstance(sources, (list, tuple)) or not all(isinstance(s, (list, tuple)) for s in sources):
            raise InvalidJob("sources must be a list of lists of arguments")
        halt = body.get("halt") or ""
        if not isinstance(halt, str):
            raise InvalidJob("halt must be now,fail=N or soon,fail=N%")
        spec = cls(template=strings("template"), sources=tuple(tuple(s) for s in sources), seqs=strings("seqs"),  # type: ignore[arg-type]
                   jobs=body.get("jobs") or 0, on=body.get("on"), need=strings("need"),
                   timeout_s=body.get("timeout_s") or 0.0, mem_mib=body.get("mem_mib") or 0,
                   retries=body.get("retries") or 0, halt=Halt.parse(halt), puts=strings("puts"),
                   put_each=strings("put_each"), results=body.get("results") or "", joblog=body.get("joblog") or "",
                   joblog_from=body.get("joblog_from") or 0, cwd=body.get("cwd") or "/")
        spec.validate()
        return spec

    def with_(self, **changes: Any) -> SweepSpec:
        return replace(self, **changes)


def check_template(part: str, sources: int) -> None:
    """InvalidJob when ``part`` names an input source the sweep does not have."""
    for m in _REPL.finditer(part):
        if m.group(0) != "{#}" and m.group(1):
            n = int(m.group(1))
            if not 1 <= n <= sources:
                have = f"only {sources} input source{'s' if sources != 1 else ''}"
                raise InvalidJob(f"replacement string {m.group(0)} names input source {n}, but there "
                                 f"{'is' if sources == 1 else 'are'} {have} (one per ::: or ::::)")


def fill(part: str, values: tuple[str, ...], seq: int) -> str:
    """One argument of the template with its replacement strings filled in."""
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "{#}":
            return str(seq)
        value = values[int(m.group(1)) - 1] if m.group(1) else " ".join(values)
        return _transform(value, m.group(2) or "")
    return _REPL.sub(one, part)


def _transform(value: str, how: str) -> str:
    if how == ".":
        return _no_ext(value)
    if how == "/":
        return os.path.basename(value)
    if how == "//":
        return os.path.dirname(value) or "."
    if how == "/.":
        return _no_ext(os.path.basename(value))
    return value


def _no_ext(value: str) -> str:
    head, sep, tail = value.rpartition("/")
    stem, dot, _ext = tail.rpartition(".")
    return head + sep + (stem if dot and stem else tail)


# -- the joblog ----------------------------------------------------------------------------------------------------


def joblog_line(seq: int, host: str, start: float, runtime: float, send: int, receive: int, exitval: int,
                signal: int, command: str) -> str:
    """One line of GNU parallel's joblog."""
    command = command.replace("\n", " ").replace("\t", " ")
    return f"{seq}\t{host}\t{start:.3f}\t{runtime:8.3f}\t{send}\t{receive}\t{exitval}\t{signal}\t{command}\n"


def read_joblog(lines: Iterable[str]) -> dict[int, tuple[int, int]]:
    """Seq -> (Exitval, Signal) of the last line of each job in a joblog (the header and bad lines skipped)."""
    out: dict[int, tuple[int, int]] = {}
    for line in lines:
        cols = line.rstrip("\n").split("\t")
        if len(cols) < 9 or not cols[0].isdigit():
            continue
        try:
            out[int(cols[0])] = (int(cols[6]), int(cols[7]))
        except ValueError:
            continue
    return out


def resume_seqs(total: int, logged: Mapping[int, tuple[int, int]], *, failed_too: bool) -> tuple[int, ...]:
    """The jobs a ``--resume`` (``failed_too``: ``--resume-failed``) runs: those not in the joblog, and with
    ``failed_too`` those whose last line there says they failed."""
    return tuple(s for s in range(1, total + 1)
                 if s not in logged or (failed_too and logged[s] != (0, 0)))
