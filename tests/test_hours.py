"""hours: lend_hours parsing, open/closed, period ends and starts, time zones and DST, on fixed instants."""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo

import pytest

from vesta.errors import ConfigError
from vesta.hours import LendingHours, Window, parse_hours, parse_window

BERLIN = ZoneInfo("Europe/Berlin")
# 2026-06-01 is a Monday; no DST change that week.
MON, TUE, WED, THU, FRI, SAT, SUN = range(1, 8)


def at(day: int, hh: int, mm: int = 0, tz: tzinfo = BERLIN, month: int = 6) -> float:
    """Epoch seconds of 2026-<month>-<day> hh:mm in tz."""
    return datetime(2026, month, day, hh, mm, tzinfo=tz).timestamp()


def hours(*entries: str, tz: tzinfo = BERLIN) -> LendingHours:
    return LendingHours(parse_hours(entries), tz=tz)


class FakeClock:
    """Wall-clock time that moves only when told."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += dt


# ---------------------------------------------------------------- parsing

ALL = frozenset(range(7))


@pytest.mark.parametrize(
    ("text", "days", "start", "end"),
    [
        ("Mon-Fri 18:00-08:00", {0, 1, 2, 3, 4}, 18 * 60, 8 * 60),
        ("Sat-Sun 00:00-24:00", {5, 6}, 0, 1440),
        ("Mon,Wed,Fri 09:00-17:00", {0, 2, 4}, 9 * 60, 17 * 60),
        ("Mon, Wed , Fri 09:00-17:00", {0, 2, 4}, 9 * 60, 17 * 60),
        ("Sun 22:00-06:00", {6}, 22 * 60, 6 * 60),
        ("daily 20:00-07:00", ALL, 20 * 60, 7 * 60),
        ("every day 20:00-07:00", ALL, 20 * 60, 7 * 60),
        ("Every  Day 20:00-07:00", ALL, 20 * 60, 7 * 60),
        ("Fri-Mon 20:00-06:00", {4, 5, 6, 0}, 20 * 60, 6 * 60),
        ("Sat-Tue 20:00-06:00", {5, 6, 0, 1}, 20 * 60, 6 * 60),
        ("18:00-08:00", ALL, 18 * 60, 8 * 60),
        ("mon-FRI 8:30-17:45", {0, 1, 2, 3, 4}, 8 * 60 + 30, 17 * 60 + 45),
        ("  Mon - Fri   18:00 - 08:00  ", {0, 1, 2, 3, 4}, 18 * 60, 8 * 60),
        ("Monday-Friday 18:00-08:00", {0, 1, 2, 3, 4}, 18 * 60, 8 * 60),
        ("Wed 18:00-00:00", {2}, 18 * 60, 1440),  # "until midnight" is the end of the day
        ("Tue 00:00-00:01", {1}, 0, 1),
        ("Thu 23:59-24:00", {3}, 23 * 60 + 59, 1440),
    ],
)
def test_parse_accepts(text: str, days: set[int], start: int, end: int) -> None:
    assert parse_window(text) == Window(days=frozenset(days), start=start, end=end, text=text)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("Mon-Fro 18:00-08:00", "unknown day 'fro'"),
        ("Someday 18:00-08:00", "unknown day"),
        ("Mon,,Fri 18:00-08:00", "unknown day"),
        ("garbage Mon-Fri 18:00-08:00", "unknown day"),
        ("Mon-Fri 25:00-08:00", "bad time '25:00'"),
        ("Mon-Fri 12:60-13:00", "bad time '12:60'"),
        ("Mon-Fri 8h-17h", "bad time '8h'"),
        ("Mon-Fri 18:00-8", "bad time '8'"),
        ("Mon-Fri 24:30-08:00", "bad time"),
        ("Mon-Fri 24:00-08:00", "24:00 can only end"),
        ("Mon-Fri 08:00-08:00", "empty window"),
        ("Mon-Fri 00:00-00:00", "empty window"),
        ("Mon-Fri", "missing time range"),
        ("Mon-Fri 18:00", "missing time range"),
        ("Mon-Fri 18:00 08:00", "missing time range"),
        ("", "missing time range"),
        ("Mon-Fri 18:00-08:00 please", "unexpected 'please'"),
        ("Mon-Fri 18:00-08:00-09:00", "unexpected '-09:00'"),
    ],
)
def test_parse_rejects_naming_the_entry(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_window(text)
    msg = str(exc.value)
    assert f"lend_hours entry {text!r}" in msg
    assert why in msg
    assert 'write it like "Mon-Fri 18:00-08:00"' in msg
    assert "\n" not in msg


def test_parse_hours_checks_every_entry() -> None:
    assert parse_hours([]) == ()
    got = parse_hours(["Mon-Fri 18:00-08:00", "Sat-Sun 00:00-24:00"])
    assert [w.text for w in got] == ["Mon-Fri 18:00-08:00", "Sat-Sun 00:00-24:00"]
    with pytest.raises(ConfigError, match="'Sat-Sun 00:00-25:00'"):
        parse_hours(["Mon-Fri 18:00-08:00", "Sat-Sun 00:00-25:00"])


@pytest.mark.parametrize("bad", [["Mon 18:00-20:00", 1800], [None], [["Mon 18:00-20:00"]]])
def test_parse_hours_rejects_non_strings(bad: list[object]) -> None:
    with pytest.raises(ConfigError, match="is not a string"):
        parse_hours(bad)  # type: ignore[arg-type]


def test_parse_hours_rejects_a_bare_string() -> None:
    with pytest.raises(ConfigError, match="must be a list"):
        parse_hours("Mon-Fri 18:00-08:00")


# ---------------------------------------------------------------- is_open


def test_simple_window() -> None:
    h = hours("Mon,Wed 09:00-17:00")
    assert h.is_open(at(MON, 9)) and h.is_open(at(MON, 16, 59)) and h.is_open(at(WED, 12))
    assert not h.is_open(at(MON, 8, 59)) and not h.is_open(at(MON, 17))  # end is exclusive
    assert not h.is_open(at(TUE, 12)) and not h.is_open(at(SUN, 12))


def test_midnight_crossing_belongs_to_the_start_day() -> None:
    h = hours("Fri 22:00-06:00")
    assert not h.is_open(at(FRI, 21, 59))
    assert h.is_open(at(FRI, 22)) and h.is_open(at(FRI, 23))
    assert h.is_open(at(SAT, 0)) and h.is_open(at(SAT, 5, 59))
    assert not h.is_open(at(SAT, 6))
    assert not h.is_open(at(THU, 23)) and not h.is_open(at(FRI, 5))  # not Thu night -> Fri morning


def test_weekday_evenings_run_into_the_next_morning() -> None:
    h = hours("Mon-Fri 18:00-08:00")
    assert not h.is_open(at(MON, 7))  # Sunday is not in the list, so Monday morning is closed
    assert h.is_open(at(MON, 18)) and h.is_open(at(TUE, 7, 59)) and not h.is_open(at(TUE, 8))
    assert h.is_open(at(SAT, 7, 59)) and not h.is_open(at(SAT, 8)) and not h.is_open(at(SUN, 23))


def test_wrapping_day_range() -> None:
    h = hours("Fri-Mon 20:00-06:00")
    for day in (FRI, SAT, SUN, MON):
        assert h.is_open(at(day, 21))
    assert h.is_open(at(TUE, 5))  # Monday's night
    assert not h.is_open(at(TUE, 21)) and not h.is_open(at(THU, 21)) and not h.is_open(at(FRI, 5))


def test_whole_days() -> None:
    h = hours("Sat-Sun 00:00-24:00")
    assert not h.is_open(at(FRI, 23, 59))
    assert h.is_open(at(SAT, 0)) and h.is_open(at(SUN, 23, 59))
    assert not h.is_open(at(MON, 0))


def test_no_windows_is_always_open() -> None:
    h = LendingHours([], tz=BERLIN)
    assert h.always and h.is_open(at(WED, 3))
    assert h.closes_at(at(WED, 3)) is None and h.opens_at(at(WED, 3)) is None
    assert h.describe(at(WED, 3)) == "always (no lend_hours set)"
    assert not hours("daily 00:00-24:00").always


def test_uses_the_injected_clock() -> None:
    clock = FakeClock(at(FRI, 21))
    h = LendingHours(parse_hours(["Fri 22:00-06:00"]), tz=BERLIN, clock=clock)
    assert not h.is_open()
    assert h.describe() == "closed; lending resumes Fri 22:00"
    clock.advance(3600)
    assert h.is_open() and h.closes_at() == at(SAT, 6)
    assert h.describe() == "open until Sat 06:00"


def test_local_zone_when_none_given() -> None:
    # Naive datetimes are the machine's local time, so this holds in whatever zone the tests run.
    h = LendingHours(parse_hours(["Wed 11:00-13:00"]))
    assert h.is_open(datetime(2026, 6, 3, 12, 0).timestamp())
    assert not h.is_open(datetime(2026, 6, 3, 13, 0).timestamp())
    assert h.opens_at(datetime(2026, 6, 2, 12, 0).timestamp()) == datetime(2026, 6, 3, 11, 0).timestamp()


# ---------------------------------------------------------------- closes_at / opens_at / describe


def test_closes_and_opens_for_weekday_evenings() -> None:
    h = hours("Mon-Fri 18:00-08:00")
    assert h.closes_at(at(TUE, 3)) == at(TUE, 8) and h.opens_at(at(TUE, 3)) is None
    assert h.describe(at(TUE, 3)) == "open until Tue 08:00"
    assert h.closes_at(at(TUE, 12)) is None and h.opens_at(at(TUE, 12)) == at(TUE, 18)
    assert h.describe(at(TUE, 12)) == "closed; lending resumes Tue 18:00"
    assert h.describe(at(FRI, 23)) == "open until Sat 08:00"
    # Saturday afternoon: nothing until Monday evening.
    assert h.opens_at(at(SAT, 15)) == at(MON + 7, 18)
    assert h.describe(at(SAT, 15)) == "closed; lending resumes Mon 18:00"


def test_overlapping_and_adjacent_windows_merge() -> None:
    h = hours("Mon-Fri 18:00-08:00", "Sat-Sun 00:00-24:00")
    # Fri 18:00 -> Sat 08:00 runs into Sat 00:00-24:00, then Sun, ending Mon 00:00.
    assert h.closes_at(at(FRI, 19)) == at(MON + 7, 0)
    assert h.closes_at(at(SUN, 12)) == at(MON + 7, 0)
    assert h.describe(at(SAT, 15)) == "open until Mon 00:00"
    assert h.opens_at(at(MON + 7, 3)) == at(MON + 7, 18)
    adjacent = hours("Wed 09:00-12:00", "Wed 12:00-15:00", "Wed 14:00-16:00")
    assert adjacent.closes_at(at(WED, 10)) == at(WED, 16)


def test_windows_covering_the_whole_week_never_close() -> None:
    for h in (
        hours("daily 00:00-24:00"),
        hours("18:00-08:00", "07:00-19:00"),
        hours("Mon-Sun 12:00-12:01", "12:01-12:00"),
    ):
        assert h.is_open(at(THU, 12, 0)) and h.closes_at(at(THU, 12)) is None and h.opens_at(at(THU, 12)) is None
        assert h.describe(at(THU, 12)) == "open (lend_hours cover the whole week)"


def test_a_gap_once_a_week_still_closes() -> None:
    h = hours("daily 00:00-24:00", "Sun 00:00-23:00")  # the same as daily, so: never closes
    assert h.closes_at(at(WED, 12)) is None
    h = hours("Mon-Sat 00:00-24:00", "Sun 00:00-23:00")  # Sun 23:00-24:00 is closed
    assert h.closes_at(at(MON, 1)) == at(SUN, 23)
    assert h.opens_at(at(SUN, 23, 30)) == at(MON + 7, 0)


# ---------------------------------------------------------------- time zones and DST


def test_same_instant_different_zones() -> None:
    instant = datetime(2026, 6, 5, 17, 30, tzinfo=UTC).timestamp()  # Fri 17:30 UTC = 19:30 in Berlin
    assert hours("Fri 18:00-20:00", tz=BERLIN).is_open(instant)
    assert not hours("Fri 18:00-20:00", tz=UTC).is_open(instant)
    assert hours("Fri 18:00-20:00", tz=UTC).describe(instant) == "closed; lending resumes Fri 18:00"
    assert hours("Fri 18:00-20:00", tz=UTC).opens_at(instant) == instant + 1800
    assert hours("Fri 18:00-20:00", tz=BERLIN).closes_at(instant) == instant + 1800


def test_spring_forward_keeps_local_wall_time() -> None:
    # Berlin 2026-03-29 (Sun): 02:00 CET -> 03:00 CEST; that day has 23 hours.
    h = hours("daily 18:00-08:00")
    sat_evening = at(28, 20, month=3)
    sun_morning = at(29, 8, month=3)
    assert sun_morning == datetime(2026, 3, 29, 6, 0, tzinfo=UTC).timestamp()  # CEST, UTC+2
    assert h.closes_at(sat_evening) == sun_morning
    assert sun_morning - at(28, 18, month=3) == 13 * 3600  # 14 wall hours, 13 real ones
    assert h.opens_at(at(29, 12, month=3)) == datetime(2026, 3, 29, 16, 0, tzinfo=UTC).timestamp()
    assert not h.is_open(datetime(2026, 3, 29, 15, 59, tzinfo=UTC).timestamp())  # 17:59 local
    assert h.is_open(datetime(2026, 3, 29, 16, 0, tzinfo=UTC).timestamp())  # 18:00 local
    assert h.describe(at(29, 12, month=3)) == "closed; lending resumes Sun 18:00"
    # Scanning a week ahead from before the change still lands on local 18:00 after it.
    weekly = hours("Sun 18:00-20:00")
    assert weekly.opens_at(at(23, 12, month=3)) == datetime(2026, 3, 29, 16, 0, tzinfo=UTC).timestamp()


def test_fall_back_keeps_local_wall_time() -> None:
    # Berlin 2026-10-25 (Sun): 03:00 CEST -> 02:00 CET; that day has 25 hours.
    h = hours("Sat 18:00-08:00")
    assert h.closes_at(at(24, 23, month=10)) == datetime(2026, 10, 25, 7, 0, tzinfo=UTC).timestamp()
    assert at(25, 8, month=10) - at(24, 18, month=10) == 15 * 3600
    weekly = hours("Sun 18:00-20:00")
    assert weekly.opens_at(at(20, 12, month=10)) == datetime(2026, 10, 25, 17, 0, tzinfo=UTC).timestamp()
    assert weekly.is_open(datetime(2026, 10, 25, 17, 0, tzinfo=UTC).timestamp())  # 18:00 CET
    assert not weekly.is_open(datetime(2026, 10, 25, 16, 30, tzinfo=UTC).timestamp())  # 17:30 CET


def test_window_inside_the_spring_gap_is_skipped() -> None:
    h = hours("Sun 02:00-03:00")  # 02:00-03:00 does not exist in Berlin on 2026-03-29
    assert not h.is_open(datetime(2026, 3, 29, 1, 0, tzinfo=UTC).timestamp())
    assert h.opens_at(at(28, 12, month=3)) == at(5, 2, month=4)
