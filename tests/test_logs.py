"""Warn-once logging stays bounded in memory and in lines, whatever number of sources misbehave."""

from __future__ import annotations

import logging

import pytest

from tests.helpers import FakeClock
from vesta.logs import MAX_KEYS, WarnOnce

log = logging.getLogger("test.warnonce")


def flood(warn: WarnOnce, sources: int) -> None:
    for i in range(sources):
        for _ in range(2):   # every source twice
            warn("malformed", f"10.0.{i // 250}.{i % 250}", "bad packet from %s", i)


def test_thousands_of_sources_log_a_bounded_number_of_lines(caplog: pytest.LogCaptureFixture) -> None:
    # After 512 sources the memory stopped remembering and every further bad packet was logged.
    caplog.set_level(logging.WARNING, logger="test.warnonce")
    flood(WarnOnce(log), 3000)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == MAX_KEYS + 1
    assert lines[-1].startswith(f"1 more suppressed from sources beyond the {MAX_KEYS} already logged (malformed 1)")


def test_the_suppressed_are_summarised_at_most_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    warn = WarnOnce(log, clock=clock)
    caplog.set_level(logging.WARNING, logger="test.warnonce")
    flood(warn, 3000)
    assert warn.suppressed == 2 * (3000 - MAX_KEYS) and len(warn._seen) == MAX_KEYS
    caplog.clear()
    clock.advance(30)
    warn("stale", "192.168.0.1", "old packet")
    assert caplog.records == []
    clock.advance(31)   # a minute after the first summary: one line says how many came since
    warn("stale", "192.168.0.2", "old packet")
    assert [r.getMessage() for r in caplog.records] == [
        f"{2 * (3000 - MAX_KEYS) + 1} more suppressed from sources beyond the {MAX_KEYS} already logged "
        f"(malformed {2 * (3000 - MAX_KEYS) - 1}, stale 2); at most one such line every 60s"]
