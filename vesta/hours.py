"""Lending hours: the weekly windows in which a node offers work to peers.

Config ``lend_hours`` is a list like ``["Mon-Fri 18:00-08:00", "Sat-Sun 00:00-24:00"]`` in the node's
local time zone; empty means always. A window that crosses midnight belongs to the day it *starts* on:
"Fri 22:00-06:00" is open Fri 22:00 -> Sat 06:00.

Pure and clock-injected. All arithmetic is done in local wall time (a datetime with the zone, or a naive
local datetime) and only then turned into epoch seconds, day by day, so "18:00" stays local 18:00 on the
days the clocks change (a DST day is 23 or 25 hours long, never a fixed 86400 s).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from datetime import time as dtime

from vesta.errors import ConfigError

DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_FULL_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_DAY_INDEX = {name.lower(): i for i, name in enumerate(DAY_NAMES)} | {n: i for i, n in enumerate(_FULL_NAMES)}
_ALL_DAYS = frozenset(range(7))
_EVERY_DAY = {"", "daily", "every day", "everyday"}
_DAY_MIN = 24 * 60
_EXAMPLE = 'write it like "Mon-Fri 18:00-08:00"'
# A time token starts with a digit; what follows is checked by _minutes so "8h" gets a precise error.
_RANGE = re.compile(r"(\d[\w:.]*)\s*-\s*(\d[\w:.]*)")
_CLOCK = re.compile(r"(\d{1,2}):(\d{2})")
# An open stretch this long covers a whole week of wall time (DST moves it by at most an hour): never closes.
_WHOLE_WEEK_S = 7.5 * 86400
_SCAN_DAYS = range(-1, 9)  # yesterday (its window may cross into today) through 8 days ahead


@dataclass(frozen=True, slots=True)
class Window:
    """One weekly lending window, in local wall time."""

    days: frozenset[int]  # weekdays the window STARTS on, 0=Mon..6=Sun
    start: int            # minutes after midnight, 0..1439
    end: int              # minutes after midnight, 1..1440 ("24:00"); end <= start crosses midnight
    text: str             # the entry as written


def _bad(text: str, what: str) -> ConfigError:
    return ConfigError(f"lend_hours entry {text!r}: {what}; {_EXAMPLE}")


def _minutes(text: str, token: str, *, is_end: bool) -> int:
    m = _CLOCK.fullmatch(token)
    if m is None:
        raise _bad(text, f"bad time {token!r} (use 24-hour HH:MM)")
    hours, mins = int(m.group(1)), int(m.group(2))
    if mins > 59 or hours > 24 or (hours == 24 and mins != 0):
        raise _bad(text, f"bad time {token!r} (hours 00-23, minutes 00-59; 24:00 only as an end)")
    if hours == 24 and not is_end:
        raise _bad(text, "24:00 can only end a window")
    return hours * 60 + mins


def _day(text: str, name: str) -> int:
    index = _DAY_INDEX.get(name.strip())
    if index is None:
        raise _bad(text, f"unknown day {name.strip()!r} (use Mon..Sun, a range like Fri-Mon, or daily)")
    return index


def _days(text: str, spec: str) -> frozenset[int]:
    spec = " ".join(spec.lower().split())
    if spec in _EVERY_DAY:
        return _ALL_DAYS
    days: set[int] = set()
    for item in spec.split(","):
        if "-" in item:
            first_name, last_name = item.split("-", 1)
            first, last = _day(text, first_name), _day(text, last_name)
            span = (last - first) % 7  # ranges may wrap past Sunday: Fri-Mon
            days.update((first + i) % 7 for i in range(span + 1))
        else:
            days.add(_day(text, item))
    return frozenset(days)


def parse_window(text: str) -> Window:
    """Parse one lend_hours entry ("Mon-Fri 18:00-08:00", "daily 20:00-07:00", "18:00-08:00")."""
    m = _RANGE.search(text)
    if m is None:
        raise _bad(text, "missing time range (start-end)")
    rest = text[m.end():].strip()
    if rest:
        raise _bad(text, f"unexpected {rest!r} after the time range")
    days = _days(text, text[: m.start()])
    start = _minutes(text, m.group(1), is_end=False)
    end = _minutes(text, m.group(2), is_end=True)
    if start == end:
        raise _bad(text, "start and end are the same (empty window; a whole day is 00:00-24:00)")
    return Window(days=days, start=start, end=end or _DAY_MIN, text=text)


def parse_hours(entries: Sequence[str]) -> tuple[Window, ...]:
    """Parse every lend_hours entry; the first bad one is a ConfigError naming it."""
    if isinstance(entries, (str, bytes)) or not isinstance(entries, (list, tuple)):
        raise ConfigError(f"lend_hours must be a list of windows (got {entries!r}); {_EXAMPLE}")
    windows = []
    for entry in entries:
        if not isinstance(entry, str):
            raise ConfigError(f"lend_hours entry {entry!r} is not a string; {_EXAMPLE}")
        windows.append(parse_window(entry))
    return tuple(windows)


class LendingHours:
    """Answers "may this node lend now, and until / from when?" for a set of windows in one time zone."""

    def __init__(
        self, windows: Sequence[Window], tz: tzinfo | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.windows = tuple(windows)
        self.tz = tz  # None = the machine's local zone, resolved per instant (right across DST)
        self._clock = clock

    @property
    def always(self) -> bool:
        """No windows configured: lending is never restricted by the hour."""
        return not self.windows

    def is_open(self, ts: float | None = None) -> bool:
        return self.always or self._period(self._now(ts)) is not None

    def closes_at(self, ts: float | None = None) -> float | None:
        """End of the current open period (epoch s); None if closed, always open, or open all week."""
        now = self._now(ts)
        period = None if self.always else self._period(now)
        if period is None or period[1] - now >= _WHOLE_WEEK_S:
            return None
        return period[1]

    def opens_at(self, ts: float | None = None) -> float | None:
        """When lending next resumes (epoch s); None if open now or no window can ever open."""
        now = self._now(ts)
        if self.is_open(now):
            return None
        return next((start for start, _ in self._periods(now) if start > now), None)

    def describe(self, ts: float | None = None) -> str:
        """One line for `vesta status`."""
        now = self._now(ts)
        if self.always:
            return "always (no lend_hours set)"
        if self.is_open(now):
            end = self.closes_at(now)
            return "open (lend_hours cover the whole week)" if end is None else f"open until {self._fmt(end)}"
        nxt = self.opens_at(now)
        return "closed; no lend_hours window ever opens" if nxt is None else f"closed; lending resumes {self._fmt(nxt)}"

    # ------------------------------------------------------------ internals

    def _now(self, ts: float | None) -> float:
        return self._clock() if ts is None else ts

    def _fmt(self, ts: float) -> str:
        local = datetime.fromtimestamp(ts, self.tz)
        return f"{DAY_NAMES[local.weekday()]} {local:%H:%M}"

    def _epoch(self, day: date, minutes: int) -> float:
        # combine() with tz None gives a naive local datetime, whose timestamp() uses the local zone's rules
        # for that date; with a zone it uses the zone's. Times in a spring-forward gap map forward.
        day += timedelta(days=minutes // _DAY_MIN)
        minutes %= _DAY_MIN
        return datetime.combine(day, dtime(minutes // 60, minutes % 60), tzinfo=self.tz).timestamp()

    def _periods(self, ts: float) -> list[tuple[float, float]]:
        """Open periods (epoch start, end) near ts, overlapping and adjacent windows merged, in order."""
        today = datetime.fromtimestamp(ts, self.tz).date()
        spans: list[tuple[float, float]] = []
        for offset in _SCAN_DAYS:
            day = today + timedelta(days=offset)
            for w in self.windows:
                if day.weekday() not in w.days:
                    continue
                end_minutes = w.end if w.end > w.start else w.end + _DAY_MIN
                start, end = self._epoch(day, w.start), self._epoch(day, end_minutes)
                if end > start:  # a window inside a DST gap can be empty
                    spans.append((start, end))
        spans.sort()
        merged: list[tuple[float, float]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged

    def _period(self, ts: float) -> tuple[float, float] | None:
        return next(((s, e) for s, e in self._periods(ts) if s <= ts < e), None)
