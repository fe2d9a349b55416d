"""Warn once per (reason, source): repeated bad input is counted, not logged line by line."""

from __future__ import annotations

import logging

MAX_KEYS = 512


class WarnOnce:
    """The first occurrence of each (reason, source) logs at ``level``; later ones at DEBUG."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING) -> None:
        self.logger = logger
        self.level = level
        self._seen: set[tuple[str, str]] = set()

    def __call__(self, reason: str, source: str, fmt: str, *args: object) -> None:
        key = (reason, source)
        if key in self._seen:
            self.logger.debug(fmt, *args)
            return
        if len(self._seen) < MAX_KEYS:
            self._seen.add(key)
        self.logger.log(self.level, "%s (further ones from %s are counted, not logged)", fmt % args, source)
