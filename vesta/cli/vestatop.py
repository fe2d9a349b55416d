"""vestatop: the live federation monitor (not built yet: see the vestatop issue)."""

from __future__ import annotations

import sys
from typing import NoReturn


def main() -> NoReturn:
    sys.stderr.write("vestatop: not yet implemented; use `vesta peers` for now\n")
    sys.exit(1)
