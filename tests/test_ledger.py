"""Ledger arithmetic, caps, decay and persistence, with a controllable clock."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tests.helpers import FakeClock
from vesta.ledger import MIB_S_PER_CORE_S, MIN_CHUNK_COST, Ledger, cost

DAY = 86400.0




def make(clock: FakeClock, path: Path | None = None, **kw: float) -> Ledger:
    args = {"goodwill": 100.0, "ratio": 5.0, "half_life_days": 7.0} | kw
    return Ledger(path, clock=clock, **args)  # type: ignore[arg-type]


def test_new_peer_borrows_up_to_ratio_times_goodwill() -> None:
    clock = FakeClock()
    led = make(clock)
    assert led.cap("p") == 500 and led.admits("p") == (True, "") and led.state("p") == "new"
    led.record_lent("p", "pi4", cpu_s=499)
    assert led.admits("p")[0] and led.state("p") == "goodwill"
    led.record_lent("p", "pi4", cpu_s=1)
    ok, why = led.admits("p")
    assert not ok and led.state("p") == "capped"
    assert why.startswith("borrow cap reached: pi4 has used 500 core-s here and lent 0; cap 500")
    assert "halve every 7 days" in why


def test_cap_grows_with_what_the_peer_lent() -> None:
    clock = FakeClock()
    led = make(clock)
    led.record_lent("p", "pi4", cpu_s=600)
    assert not led.admits("p")[0]
    led.record_borrowed("p", "pi4", cpu_s=50)          # lending less than goodwill does not raise the cap
    assert led.cap("p") == 500
    led.record_borrowed("p", "pi4", cpu_s=150)         # now it has lent 200: cap 5 x 200 = 1000
    assert led.cap("p") == pytest.approx(1000)
    assert led.admits("p")[0] and led.state("p") == "ok"
    assert led.balance("p") == pytest.approx(600 - 200)


def test_memory_counts_as_core_seconds() -> None:
    assert cost(2.0, 1024.0) == pytest.approx(3.0)
    assert cost(-1.0, -5.0) == 0.0
    led = make(FakeClock())
    led.record_lent("p", "x", cpu_s=0.5, mib_s=512 * 10)
    assert led.rows()[0]["lent"] == pytest.approx(0.5 + 5120 / MIB_S_PER_CORE_S)


def test_debts_halve_every_half_life_and_a_capped_peer_is_let_back_in() -> None:
    clock = FakeClock()
    led = make(clock)
    led.record_lent("p", "pi4", cpu_s=800)
    led.record_borrowed("p", "pi4", cpu_s=40)
    assert not led.admits("p")[0]
    clock.advance(7 * DAY)
    row = led.rows()[0]
    assert row["lent"] == pytest.approx(400) and row["borrowed"] == pytest.approx(20)
    assert led.admits("p")[0]                          # 400 < 500: friends are not locked out forever
    clock.advance(70 * DAY)
    assert led.rows()[0]["lent"] == pytest.approx(400 / 1024, abs=1e-3)


def test_zero_half_life_means_no_decay() -> None:
    clock = FakeClock()
    led = make(clock, half_life_days=0.0)
    led.record_lent("p", "x", cpu_s=10)
    clock.advance(365 * DAY)
    assert led.rows()[0]["lent"] == 10


def test_renamed_peer_keeps_its_account() -> None:
    led = make(FakeClock())
    led.record_lent("p", "old-name", cpu_s=10)
    led.record_borrowed("p", "new-name", cpu_s=4)
    rows = led.rows()
    assert len(rows) == 1 and rows[0]["name"] == "new-name" and rows[0]["balance"] == 6


def test_round_trip_through_the_file(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "vestad-ledger-desk.json"
    led = make(clock, path)
    led.record_lent("aa" * 16, "pi4", cpu_s=12.5)
    led.record_borrowed("bb" * 16, "laptop", cpu_s=3.0, mib_s=2048)
    led.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not led.dirty
    again = Ledger.load(path, goodwill=100.0, ratio=5.0, half_life_days=7.0, clock=clock)
    assert again.rows() == led.rows()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]   # no temp files left


@pytest.mark.parametrize("content", [
    b"", b"{", b"\x00\xff garbage", b"[]", b'{"version": 99, "peers": {}}',
    b'{"version": 1, "peers": {"x": {"name": "a", "lent": -5}}}',
    b'{"version": 1, "peers": {"x": {"name": "a", "lent": "lots"}}}',
    b'{"version": 1, "peers": {"x": {"nonsense": 1}}}',
])
def test_corrupt_file_is_moved_aside_and_a_fresh_ledger_starts(tmp_path: Path, content: bytes,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "vestad-ledger-desk.json"
    path.write_bytes(content)
    led = Ledger.load(path, goodwill=100.0, ratio=5.0, half_life_days=7.0, clock=FakeClock())
    assert led.rows() == []
    aside = list(tmp_path.glob("vestad-ledger-desk.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content     # kept for the owner to inspect
    assert not path.exists()
    assert "moved it to" in caplog.text
    led.record_lent("p", "x", cpu_s=1)
    led.save()
    assert json.loads(path.read_text())["peers"]["p"]["lent"] == 1


def test_a_flood_of_tiny_chunks_reaches_the_borrow_cap() -> None:
    """20,000 tiny offers cost their sender 0.17 core-seconds in all: every chunk now costs at least
    MIN_CHUNK_COST, on both sides of the ledger alike."""
    lender = Ledger(None, goodwill=720.0, ratio=5.0, half_life_days=7.0)
    borrower = Ledger(None, goodwill=720.0, ratio=5.0, half_life_days=7.0)
    ran = 0
    while lender.admits("p")[0] and ran < 200_000:
        lender.record_lent("p", "flooder", cpu_s=0.0000085)
        borrower.record_borrowed("q", "host", cpu_s=0.0000085)
        ran += 1
    assert abs(ran - 5.0 * 720.0 / MIN_CHUNK_COST) <= 1          # about 72,000 chunks, not unbounded
    assert lender.rows()[0]["lent"] == pytest.approx(borrower.rows()[0]["borrowed"])

