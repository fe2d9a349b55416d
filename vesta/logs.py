"""Warn once per (reason, source): repeated bad input is counted, not logged line by line.

The memory of what was logged is bounded (``MAX_KEYS`` pairs). Once it is full, a pair not seen before is
not logged either: it is counted, and a summary line ("N more suppressed") says how many, at most once every
``SUMMARY_S`` seconds. So a flood from any number of sources costs a bounded memory and a bounded log.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

MAX_KEYS = 512       # (reason, source) pairs remembered
SUMMARY_S = 60.0     # at most one "N more suppressed" line this often


class WarnOnce:
    """The first occurrence of each (reason, source) logs at ``level``; later ones at DEBUG."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING, *, max_keys: int = MAX_KEYS,
                 summary_s: float = SUMMARY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.level = level
        self.max_keys = max_keys
        self.summary_s = summary_s
        self.clock = clock
        self.suppressed = 0                      # new pairs not logged because the memory was full, in all
        self._seen: set[tuple[str, str]] = set()
        self._pending: Counter[str] = Counter()  # ... since the last summary, by reason
        self._last_summary: float | None = None

    def __call__(self, reason: str, source: str, fmt: str, *args: object) -> None:
        key = (reason, source)
        if key in self._seen:
            self.logger.debug(fmt, *args)
            return
        if len(self._seen) >= self.max_keys:
            self.logger.debug(fmt, *args)
            self.suppressed += 1
            self._pending[reason] += 1
            now = self.clock()
            if self._last_summary is None or now - self._last_summary >= self.summary_s:
                self._summarise(now)
            return
        self._seen.add(key)
        self.logger.log(self.level, "%s (further ones from %s are counted, not logged)", fmt % args, source)

    def _summarise(self, now: float) -> None:
        total = sum(self._pending.values())
        kinds = ", ".join(f"{reason} {n}" for reason, n in self._pending.most_common())
        self.logger.log(self.level, "%d more suppressed from sources beyond the %d already logged (%s); at most "
                        "one such line every %gs", total, self.max_keys, kinds, self.summary_s)
        self._pending.clear()
        self._last_summary = now
