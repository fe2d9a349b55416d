"""peertable: join, suspect, recover, expire, restart, rename and replay, on an injected clock."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import FakeClock
from vesta.peertable import EVICT_SILENT_S, MAX_INTERVAL_S, MAX_UNLINKED_PER_SOURCE, Freshness, PeerTable
from vesta.proto import Beacon, NodeStatus

FP_A = "aa" * 16
FP_B = "bb" * 16
SRC = ("192.168.1.20", 7778)




def make_beacon(
    fp: str = FP_A, *, name: str = "desk", host: str = "", port: int = 7777, dport: int = 7778,
    boot: int = 1, seq: int = 1, interval_ms: int = 1000, **status: Any,
) -> Beacon:
    fields: dict[str, Any] = {
        "name": name, "fingerprint": fp, "host": host, "port": port, "dport": dport, "version": "0.1.0",
        "cores": 4, "cpu_pct": 10.0, "cpu_per_core": (10, 10, 10, 10), "load1": 0.4,
        "mem_total_mb": 8000, "mem_avail_mb": 4000, "offered_cores": 2.4, "offered_mem_mb": 1024,
        "spare_cores": 2.0, "power": "grid", "willingness": 1.0,
    }
    fields.update(status)
    beacon = Beacon(status=NodeStatus(**fields), ts=1_700_000_000.0, boot=boot, seq=seq,
                    interval_ms=interval_ms, pubkey=b"\x01" * 32)
    beacon.validate()  # the table only ever sees beacons that passed decode()
    return beacon


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def table(clock: FakeClock) -> PeerTable:
    return PeerTable(suspect_after=3, expire_after=10, max_peers=256, clock=clock)


def events(changes: list[Any]) -> list[str]:
    return [c.event for c in changes]


def test_new_peer_joins(table: PeerTable, clock: FakeClock) -> None:
    changes = table.observe(make_beacon(), SRC)
    assert events(changes) == ["joined"]
    peer = table.get(FP_A)
    assert peer is not None and changes[0].peer is peer
    assert FP_A in table and len(table) == 1
    assert peer.name == "desk" and peer.fingerprint == FP_A
    assert peer.first_seen == peer.last_seen == clock.now
    assert peer.interval == 1.0 and peer.beacons == 1 and not peer.suspect
    assert table.alive() == [peer] and table.all() == [peer]
    assert table.by_name("desk") is peer and table.by_name("other") is None


def test_address_from_the_beacon_source_when_host_is_empty(table: PeerTable) -> None:
    table.observe(make_beacon(host="", port=40001, dport=7779), ("10.1.2.3", 55555))
    peer = table.get(FP_A)
    assert peer is not None
    assert peer.addr == ("10.1.2.3", 40001)
    assert peer.disco == ("10.1.2.3", 7779)  # the advertised discovery port, not the source port


def test_address_from_status_host_when_advertised(table: PeerTable) -> None:
    table.observe(make_beacon(host="vpn.example.net", port=40001), ("10.1.2.3", 7778))
    peer = table.get(FP_A)
    assert peer is not None
    assert peer.addr == ("vpn.example.net", 40001)
    assert peer.disco == ("10.1.2.3", 7778)


def test_a_second_beacon_updates_the_entry(table: PeerTable, clock: FakeClock) -> None:
    table.observe(make_beacon(seq=1, cpu_pct=10.0), SRC)
    clock.advance(1.0)
    changes = table.observe(make_beacon(seq=2, cpu_pct=90.0, host="10.9.9.9"), SRC)
    assert changes == []
    peer = table.get(FP_A)
    assert peer is not None
    assert peer.status.cpu_pct == 90.0 and peer.addr == ("10.9.9.9", 7777)
    assert peer.beacons == 2 and peer.last_seen == clock.now and peer.first_seen == clock.now - 1.0


def test_suspect_after_missed_intervals_then_recovers(table: PeerTable, clock: FakeClock) -> None:
    table.observe(make_beacon(), SRC)
    clock.advance(3.0)  # exactly suspect_after intervals: not yet
    assert table.sweep() == []
    clock.advance(0.01)
    changes = table.sweep()
    assert events(changes) == ["suspect"]
    peer = table.get(FP_A)
    assert peer is not None and peer.suspect
    assert table.alive() == [] and table.all() == [peer]
    assert table.sweep() == []  # reported once
    changes = table.observe(make_beacon(seq=2), SRC)
    assert events(changes) == ["recovered"]
    assert not peer.suspect and table.alive() == [peer]


def test_timeouts_use_the_peers_own_interval(table: PeerTable, clock: FakeClock) -> None:
    table.observe(make_beacon(FP_A, interval_ms=100), SRC)
    table.observe(make_beacon(FP_B, name="slow", interval_ms=5000), SRC)
    clock.advance(0.31)  # 3.1 of A's intervals, 0.06 of B's
    changes = table.sweep()
    assert [(c.event, c.peer.fingerprint) for c in changes] == [("suspect", FP_A)]
    clock.advance(0.8)  # A: 11.1 intervals -> gone; B: 0.22 intervals
    changes = table.sweep()
    assert [(c.event, c.peer.fingerprint) for c in changes] == [("left", FP_A)]
    assert FP_A not in table and FP_B in table


def test_removed_after_expire_after_intervals(table: PeerTable, clock: FakeClock) -> None:
    table.observe(make_beacon(), SRC)
    clock.advance(10.0)  # exactly expire_after: suspect, not yet removed
    assert events(table.sweep()) == ["suspect"]
    assert FP_A in table
    clock.advance(0.01)
    changes = table.sweep()
    assert events(changes) == ["left"]
    assert "no beacon for" in changes[0].detail
    assert FP_A not in table and len(table) == 0 and table.get(FP_A) is None


def test_a_late_sweep_removes_directly(table: PeerTable, clock: FakeClock) -> None:
    table.observe(make_beacon(), SRC)
    clock.advance(60.0)
    assert events(table.sweep()) == ["left"]


def test_restart_is_recognised_as_the_same_peer(table: PeerTable, clock: FakeClock) -> None:
    table.observe(make_beacon(boot=100, seq=57), SRC)
    peer = table.get(FP_A)
    clock.advance(1.0)
    restarted = make_beacon(boot=200, seq=0)
    assert table.freshness(make_beacon(boot=100, seq=57)) is Freshness.NEW  # first time the table sees it
    assert table.freshness(restarted) is Freshness.NEW  # a new boot starts again from seq 0
    changes = table.observe(restarted, SRC)
    assert events(changes) == ["restarted"]
    assert table.get(FP_A) is peer and len(table) == 1
    assert peer is not None and peer.boot == 200 and peer.restarts == 1 and peer.beacons == 2


def test_rename_keeps_the_entry(table: PeerTable) -> None:
    table.observe(make_beacon(name="old-name"), SRC)
    peer = table.get(FP_A)
    changes = table.observe(make_beacon(name="new-name", seq=2), SRC)
    assert events(changes) == ["renamed"]
    assert changes[0].detail == "old-name -> new-name"
    assert table.get(FP_A) is peer and len(table) == 1
    assert table.by_name("new-name") is peer and table.by_name("old-name") is None


def test_restart_rename_and_recovery_together(table: PeerTable, clock: FakeClock) -> None:
    table.observe(make_beacon(name="a", boot=1), SRC)
    clock.advance(5.0)
    table.sweep()
    changes = table.observe(make_beacon(name="b", boot=2), SRC)
    assert events(changes) == ["restarted", "renamed", "recovered"]


def test_freshness_orders_by_boot_then_seq(table: PeerTable) -> None:
    assert table.freshness(make_beacon(boot=5, seq=10)) is Freshness.NEW
    assert table.freshness(make_beacon(boot=5, seq=10)) is Freshness.DUPLICATE
    assert table.freshness(make_beacon(boot=5, seq=9)) is Freshness.REPLAY
    assert table.freshness(make_beacon(boot=5, seq=11)) is Freshness.NEW
    assert table.freshness(make_beacon(boot=5, seq=10)) is Freshness.REPLAY  # the newest mark moved on
    assert table.freshness(make_beacon(boot=4, seq=1_000_000)) is Freshness.REPLAY  # an older boot
    assert table.freshness(make_beacon(boot=6, seq=0)) is Freshness.NEW


def test_freshness_is_per_fingerprint(table: PeerTable) -> None:
    assert table.freshness(make_beacon(FP_A, boot=5, seq=10)) is Freshness.NEW
    assert table.freshness(make_beacon(FP_B, boot=1, seq=1)) is Freshness.NEW
    assert table.freshness(make_beacon(FP_B, boot=1, seq=1)) is Freshness.DUPLICATE
    assert table.freshness(make_beacon(FP_A, boot=5, seq=11)) is Freshness.NEW


def test_old_boot_is_a_replay_even_after_the_peer_was_removed(table: PeerTable, clock: FakeClock) -> None:
    old = make_beacon(boot=1, seq=3)
    assert table.freshness(old) is Freshness.NEW
    table.observe(old, SRC)
    new_boot = make_beacon(boot=2, seq=0)
    assert table.freshness(new_boot) is Freshness.NEW
    table.observe(new_boot, SRC)
    clock.advance(100.0)
    assert events(table.sweep()) == ["left"]
    assert FP_A not in table
    # A recording of the first boot cannot bring the peer back.
    assert table.freshness(old) is Freshness.REPLAY
    assert table.freshness(make_beacon(boot=1, seq=999)) is Freshness.REPLAY
    assert table.freshness(new_boot) is Freshness.DUPLICATE
    assert table.freshness(make_beacon(boot=2, seq=1)) is Freshness.NEW


def test_max_peers_is_respected(clock: FakeClock) -> None:
    table = PeerTable(max_peers=2, clock=clock)
    fps = [f"{n:032x}" for n in range(1, 5)]
    assert events(table.observe(make_beacon(fps[0]), SRC)) == ["joined"]
    assert events(table.observe(make_beacon(fps[1]), SRC)) == ["joined"]
    assert table.observe(make_beacon(fps[2]), SRC) == []
    assert fps[2] not in table and len(table) == 2
    # Known peers still update while the table is full.
    assert events(table.observe(make_beacon(fps[0], name="renamed", seq=2), SRC)) == ["renamed"]
    # Once one leaves there is room again.
    clock.advance(1.0)
    table.observe(make_beacon(fps[1], seq=2), SRC)
    clock.advance(10.5)  # fps[0] last seen 11.5 s ago, fps[1] 10.5 s ago: both past expire_after
    table.sweep()
    assert events(table.observe(make_beacon(fps[3]), SRC)) == ["joined"]
    assert fps[3] in table


def test_seen_marks_are_bounded(monkeypatch: pytest.MonkeyPatch, table: PeerTable) -> None:
    from vesta import peertable

    monkeypatch.setattr(peertable, "MAX_SEEN", 3)
    fps = [f"{n:032x}" for n in range(1, 6)]
    for fp in fps:
        assert table.freshness(make_beacon(fp, boot=1, seq=1)) is Freshness.NEW
    assert len(table._seen) == 3  # private on purpose: the bound is the point
    assert table.freshness(make_beacon(fps[-1], boot=1, seq=1)) is Freshness.DUPLICATE  # newest kept
    assert table.freshness(make_beacon(fps[0], boot=1, seq=1)) is Freshness.NEW  # oldest forgotten


def test_a_claimed_interval_is_bounded(table: PeerTable, clock: FakeClock) -> None:
    # One beacon claiming a 1-hour interval held its place for 10 hours.
    table.observe(make_beacon(FP_A, interval_ms=3_600_000), SRC)
    assert table.get(FP_A).interval == MAX_INTERVAL_S   # type: ignore[union-attr]
    clock.advance(MAX_INTERVAL_S * 10 + 1)
    assert events(table.sweep()) == ["left"] and FP_A not in table


def test_a_full_table_makes_room_for_a_real_node_but_never_at_a_linked_peer_s_expense(clock: FakeClock) -> None:
    table = PeerTable(max_peers=4, clock=clock)
    fakes = [f"{n:032x}" for n in range(1, 4)]
    for i, fp in enumerate(fakes):   # made-up identities, one beacon each, from three addresses
        table.observe(make_beacon(fp, interval_ms=3_600_000), (f"10.0.0.{i}", 7778))
    table.observe(make_beacon(FP_B, name="friend"), SRC)
    table.mark_linked(FP_B)
    newcomer = "c" * 32
    assert table.observe(make_beacon(newcomer, name="laptop"), ("192.168.1.30", 7778)) == []   # all fresh
    clock.advance(EVICT_SILENT_S + 1)
    table.observe(make_beacon(FP_B, name="friend", seq=2), SRC)
    changes = table.observe(make_beacon(newcomer, name="laptop", seq=2), ("192.168.1.30", 7778))
    assert events(changes) == ["left", "joined"] and changes[0].peer.fingerprint == fakes[0]
    assert newcomer in table and FP_B in table
    # the friend, silent as long as any fake but linked, keeps its place; the fakes make room, one by one
    clock.advance(EVICT_SILENT_S + 1)
    for n in range(2):
        table.observe(make_beacon(f"{100 + n:032x}", name=f"new{n}"), (f"172.16.0.{n}", 7778))
    assert FP_B in table and fakes[1] not in table and fakes[2] not in table
    changes = table.observe(make_beacon(f"{200:032x}", name="late"), ("172.16.1.1", 7778))
    assert events(changes) == ["left", "joined"] and changes[0].peer.fingerprint == newcomer   # silent too
    assert table.observe(make_beacon(f"{201:032x}", name="later"), ("172.16.1.2", 7778)) == []   # fresh or linked
    assert FP_B in table


def test_one_address_holds_a_bounded_number_of_never_linked_peers(clock: FakeClock) -> None:
    table = PeerTable(max_peers=1000, clock=clock)
    for n in range(MAX_UNLINKED_PER_SOURCE + 5):
        table.observe(make_beacon(f"{n + 1:032x}", name=f"n{n}"), SRC)
    assert len(table) == MAX_UNLINKED_PER_SOURCE
    table.mark_linked(f"{1:032x}")
    table.observe(make_beacon(f"{999:032x}", name="other"), ("192.168.1.21", 7778))   # another address: room
    assert len(table) == MAX_UNLINKED_PER_SOURCE + 1


def test_peek_freshness_remembers_nothing(table: PeerTable) -> None:
    assert table.peek_freshness(make_beacon(boot=5, seq=10)) is Freshness.NEW
    assert table.peek_freshness(make_beacon(boot=5, seq=10)) is Freshness.NEW   # not remembered
    assert table.freshness(make_beacon(boot=5, seq=10)) is Freshness.NEW
    assert table.peek_freshness(make_beacon(boot=5, seq=10)) is Freshness.DUPLICATE
    assert table.peek_freshness(make_beacon(boot=5, seq=9)) is Freshness.REPLAY


def test_admits_says_what_observe_would_do_without_doing_it(clock: FakeClock) -> None:
    table = PeerTable(max_peers=2, clock=clock)
    assert table.admits(FP_A, SRC)
    table.observe(make_beacon(FP_A), SRC)
    table.observe(make_beacon(FP_B), ("192.168.1.21", 7778))
    newcomer = "cc" * 16
    assert table.admits(FP_A, SRC)                    # a member always
    assert not table.admits(newcomer, SRC)            # full, nobody silent long enough
    assert table.observe(make_beacon(newcomer), SRC) == [] and newcomer not in table
    clock.advance(EVICT_SILENT_S + 1)
    assert table.admits(newcomer, SRC) and len(table) == 2   # room can be made, and nothing changed yet
    assert "joined" in events(table.observe(make_beacon(newcomer), SRC))


def test_admits_counts_unlinked_peers_per_source(clock: FakeClock) -> None:
    table = PeerTable(max_peers=1000, clock=clock)
    for i in range(MAX_UNLINKED_PER_SOURCE):
        table.observe(make_beacon(f"{i:032x}"), SRC)
    assert not table.admits("ff" * 16, SRC)
    assert table.admits("ff" * 16, ("192.168.1.99", 7778))


def test_forget_removes_at_once_and_a_replay_cannot_return(table: PeerTable) -> None:
    beacon = make_beacon(boot=1, seq=3)
    assert table.freshness(beacon) is Freshness.NEW
    table.observe(beacon, SRC)
    change = table.forget(FP_A, "said goodbye")
    assert change is not None and change.event == "left" and FP_A not in table
    assert table.forget(FP_A, "again") is None
    assert table.freshness(beacon) is Freshness.DUPLICATE


def test_a_full_table_remembers_it_has_no_room_until_someone_could_be_replaced(clock: FakeClock) -> None:
    table = PeerTable(max_peers=3, clock=clock)
    for i, fp in enumerate((FP_A, FP_B, "cc" * 16)):
        table.observe(make_beacon(fp), (f"10.0.0.{i}", 7778))
        clock.advance(1.0)
    newcomer = "dd" * 16
    assert not table.admits(newcomer, SRC)
    # The oldest never-linked peer (seen 3 s ago) may be replaced once silent EVICT_SILENT_S: not before.
    clock.advance(EVICT_SILENT_S - 3.0 - 0.1)
    assert not table.admits(newcomer, SRC)
    clock.advance(0.2)
    assert table.admits(newcomer, SRC)
    # A peer linked since is never replaced: with all linked, no room at any time.
    for fp in (FP_A, FP_B, "cc" * 16):
        table.mark_linked(fp)
    clock.advance(100.0)
    assert not table.admits(newcomer, SRC)
