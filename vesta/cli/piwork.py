"""piwork: Monte Carlo estimate of pi (not built yet: see the jobs issue)."""

from __future__ import annotations

import sys
from typing import NoReturn


def main() -> NoReturn:
    sys.stderr.write("piwork: not yet implemented\n")
    sys.exit(1)
