"""Fair-share ledger: what this node lent to and borrowed from each peer, and who may borrow more.

**Units.** Core-seconds of CPU actually used (thread CPU time for built-in
work, ``wait4`` rusage for exec, children included), plus memory held: one
GiB held for one second counts as one core-second. Kept per peer, keyed by
its Ed25519 fingerprint (renaming a node keeps its standing), with its last
known name.

**The rule** (the seed's, made precise). A peer may borrow from this node as
long as what it has borrowed here is below its cap::

    cap = max_borrow_ratio x max(goodwill, what it has lent to this node)

So a new peer may borrow ``max_borrow_ratio x goodwill`` (with the defaults,
5 x 720 core-seconds = one core-hour) without lending anything; once it lends,
its cap grows with what it lent. Past its cap it is refused with "borrow cap
reached" until it lends, or until its debt ages: every amount halves every
``half_life_days`` (default 7), so old debts never lock a friend out for good.
The lender's record decides: each node judges only what it lent itself.

**Persistence.** ``vestad-ledger-NAME.json`` in the state directory, written
by atomic replace (temp file, fsync, rename; mode 0600) shortly after each
change. The file is always a whole old or whole new ledger, whatever moment
a crash or ``kill -9`` strikes; at most the last fraction of a second of
accounting can be missing. A corrupt or truncated file is moved aside
(``...json.corrupt-TIME``) with a warning and a fresh ledger starts.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vesta.identity import atomic_write

log = logging.getLogger(__name__)

LEDGER_VERSION = 1
MIB_S_PER_CORE_S = 1024.0     # 1 GiB held for 1 s counts as 1 core-second
MAX_PEERS = 10_000


@dataclass
class Account:
    """Both directions with one peer, in core-seconds, decayed to ``updated``."""

    name: str
    lent: float = 0.0          # we ran this much for them
    borrowed: float = 0.0      # they ran this much for us
    lent_chunks: int = 0
    borrowed_chunks: int = 0
    updated: float = 0.0


MIN_CHUNK_COST = 0.05   # core-s: what one chunk costs its borrower at least (its records, its link messages,
                        # its scheduling), so a flood of tiny jobs reaches the borrow cap instead of costing ~0


def cost(cpu_s: float, mib_s: float = 0.0) -> float:
    """One number for a piece of work: core-seconds plus memory held."""
    return max(0.0, cpu_s) + max(0.0, mib_s) / MIB_S_PER_CORE_S


class Ledger:
    """Per-peer accounting with the borrow cap; ``save()`` persists it."""

    def __init__(self, path: Path | None, *, goodwill: float, ratio: float, half_life_days: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.goodwill = goodwill
        self.ratio = ratio
        self.half_life_s = half_life_days * 86400.0
        self.clock = clock
        self.accounts: dict[str, Account] = {}
        self.dirty = False
        self._write_lock = threading.Lock()

    # ------------------------------------------------------------ arithmetic

    def _decayed(self, fp: str) -> Account | None:
        acct = self.accounts.get(fp)
        if acct is None:
            return None
        now = self.clock()
        if self.half_life_s > 0 and now > acct.updated:
            factor = 0.5 ** ((now - acct.updated) / self.half_life_s)
            acct.lent *= factor
            acct.borrowed *= factor
        acct.updated = max(acct.updated, now)
        return acct

    def _account(self, fp: str, name: str) -> Account:
        acct = self._decayed(fp)
        if acct is None:
            if len(self.accounts) >= MAX_PEERS:  # keep memory bounded: forget the smallest account
                smallest = min(self.accounts, key=lambda k: self.accounts[k].lent + self.accounts[k].borrowed)
                del self.accounts[smallest]
            acct = self.accounts[fp] = Account(name=name, updated=self.clock())
        if name:
            acct.name = name
        return acct

    def record_lent(self, fp: str, name: str, cpu_s: float, mib_s: float = 0.0) -> None:
        """We ran work for peer ``fp``."""
        acct = self._account(fp, name)
        acct.lent += max(MIN_CHUNK_COST, cost(cpu_s, mib_s))
        acct.lent_chunks += 1
        self.dirty = True

    def record_borrowed(self, fp: str, name: str, cpu_s: float, mib_s: float = 0.0) -> None:
        """Peer ``fp`` ran work for us."""
        acct = self._account(fp, name)
        acct.borrowed += max(MIN_CHUNK_COST, cost(cpu_s, mib_s))
        acct.borrowed_chunks += 1
        self.dirty = True

    def cap(self, fp: str) -> float:
        """How much peer ``fp`` may borrow from us: ratio x max(goodwill, what it lent us)."""
        acct = self._decayed(fp)
        return self.ratio * max(self.goodwill, acct.borrowed if acct else 0.0)

    def admits(self, fp: str) -> tuple[bool, str]:
        """May peer ``fp`` borrow more now? The message says why not, and what to do."""
        acct = self._decayed(fp)
        used = acct.lent if acct else 0.0
        cap = self.cap(fp)
        if used < cap:
            return True, ""
        who = acct.name if acct else fp[:8]
        lent_back = acct.borrowed if acct else 0.0
        return False, (f"borrow cap reached: {who} has used {used:.0f} core-s here and lent {lent_back:.0f}"
                       f"; cap {cap:.0f} (lend some work back, or wait: amounts halve every "
                       f"{self.half_life_s / 86400:g} days)")

    def balance(self, fp: str) -> float:
        """What we lent them minus what we borrowed from them (positive: they owe us)."""
        acct = self._decayed(fp)
        return (acct.lent - acct.borrowed) if acct else 0.0

    def state(self, fp: str) -> str:
        acct = self._decayed(fp)
        if acct is None or (acct.lent == 0 and acct.borrowed == 0):
            return "new"
        if not self.admits(fp)[0]:
            return "capped"
        if acct.borrowed == 0:
            return "goodwill"      # borrowing on the goodwill floor, has not lent yet
        return "ok"

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for fp in sorted(self.accounts, key=lambda k: self.accounts[k].name):
            acct = self._decayed(fp)
            assert acct is not None
            out.append({"fingerprint": fp, "name": acct.name, "lent": round(acct.lent, 3),
                        "borrowed": round(acct.borrowed, 3), "balance": round(acct.lent - acct.borrowed, 3),
                        "cap": round(self.cap(fp), 3), "state": self.state(fp), "lent_chunks": acct.lent_chunks,
                        "borrowed_chunks": acct.borrowed_chunks})
        return out

    # ------------------------------------------------------------ persistence

    def snapshot(self) -> bytes:
        """The file's next contents; taken where the accounts change (the event loop), written anywhere."""
        body = {"version": LEDGER_VERSION, "saved": self.clock(),
                "peers": {fp: asdict(acct) for fp, acct in self.accounts.items()}}
        self.dirty = False
        return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"

    def write(self, data: bytes) -> None:
        """Atomically replace the file with ``data``; writers queue, so the newest snapshot lands last."""
        if self.path is None:
            return
        with self._write_lock:
            atomic_write(self.path, data)

    def save(self) -> None:
        self.write(self.snapshot())

    @classmethod
    def load(cls, path: Path, **kw: Any) -> Ledger:
        """Read the ledger; a missing file starts empty, a corrupt one is moved aside (never a crash loop)."""
        ledger = cls(path, **kw)
        if not path.exists():
            return ledger
        try:
            body = json.loads(path.read_text())
            if not isinstance(body, dict) or body.get("version") != LEDGER_VERSION:
                raise ValueError(f"unknown ledger version {body.get('version') if isinstance(body, dict) else body!r}")
            for fp, raw in dict(body["peers"]).items():
                acct = Account(**raw)
                if not isinstance(fp, str) or not all(
                        isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
                        for v in (acct.lent, acct.borrowed, acct.updated)):
                    raise ValueError(f"bad account for {fp!r}")
                ledger.accounts[fp] = acct
        except (OSError, ValueError, TypeError, KeyError) as exc:
            aside = path.with_name(f"{path.name}.corrupt-{int(ledger.clock())}")
            try:
                path.replace(aside)
            except OSError:
                aside = path
            log.warning("ledger %s is unreadable (%s); moved it to %s and started a fresh ledger", path, exc, aside)
            ledger.accounts.clear()
        return ledger
