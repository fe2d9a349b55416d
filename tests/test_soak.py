"""A small version of every case of the attack suite (scripts/soak runs it with more than 10^6 inputs)."""

from __future__ import annotations

from tests.soak import FULL, Soak


def test_a_small_soak_passes() -> None:
    lines: list[str] = []
    soak = Soak(scale=0.001, kill_cycles=2, need=500, say=lines.append)   # a busy machine drops datagrams
    assert soak.run(), "\n".join(lines)
    assert set(soak.sent) == set(FULL) and all(n >= 20 for n in soak.sent.values())
    assert soak.pings >= 1 and not soak.refused
