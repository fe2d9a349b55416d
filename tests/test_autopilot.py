"""Routing decisions in pure code: slots, spill, split, chunk cutting, debits (with a fake clock)."""

from __future__ import annotations

from tests.helpers import FakeClock
from vesta import autopilot, proto
from vesta.autopilot import Debits, NodeView, choose, cut, cut_size_slots, fits_memory, slots


def node(name: str, *, local: bool = False, cores: int = 4, cpu: float = 0.0, spare: float = 3.0,
         rate: float = 2e7, mem: int = 1024, exec_allowed: bool = False, seen: float = 0.0) -> NodeView:
    return NodeView(name * 8 if len(name) < 32 else name, name, local, cores, cpu, spare, rate, mem, exec_allowed,
                    seen)


def test_peer_slots_come_from_its_spare_cores_minus_debits() -> None:
    clock = FakeClock(1000.0)
    debits = Debits(clock)
    pi = node("pi", spare=2.4, seen=999.0)
    assert slots(pi) == 2 and slots(node("x", spare=0.4)) == 0 and slots(node("y", spare=0.5)) == 1
    debits.place(pi.fingerprint)
    assert slots(pi, debits) == 1
    debits.release(pi.fingerprint)
    assert slots(pi, debits) == 2
    debits.place(pi.fingerprint)
    # its next beacon (seen after the placement) already shows that load: the debit is dropped
    later = node("pi", spare=1.4, seen=1001.0)
    assert slots(later, debits) == 1


def test_local_slots_and_spill() -> None:
    assert slots(node("me", local=True, cores=8, cpu=25.0)) == 6
    assert slots(node("me", local=True, cores=8, cpu=79.0), spill_cpu_pct=80) == 2
    assert slots(node("me", local=True, cores=8, cpu=85.0), spill_cpu_pct=80) == 0   # spilling
    assert slots(node("me", local=True, cores=1, cpu=70.0)) == 1                      # never 0 when not spilling


def test_busy_local_node_spills_to_an_idle_peer_and_is_the_last_resort() -> None:
    me = node("me", local=True, cores=2, cpu=95.0)
    peer = node("pi", spare=1.0)
    assert [c.node.name for c in choose([me, peer], spill_cpu_pct=80)] == ["pi"]
    busy_peer = node("pi", spare=0.0)
    assert [c.node.name for c in choose([me, busy_peer], spill_cpu_pct=80)] == ["me"]
    assert choose([me, busy_peer], spill_cpu_pct=80, fallback=False) == []


def test_split_only_large_jobs_and_rank_by_slots_times_speed() -> None:
    me = node("me", local=True, cores=1, rate=2e7)
    desk = node("desk", spare=4.0, rate=2e7)
    pi = node("pi", spare=4.0, rate=6e6)
    small = choose([me, desk, pi], spill_cpu_pct=80, units=autopilot.SPLIT_MIN_UNITS - 1)
    assert [c.node.name for c in small] == ["desk"]
    big = choose([me, desk, pi], spill_cpu_pct=80, units=autopilot.SPLIT_MIN_UNITS)
    assert [c.node.name for c in big] == ["desk", "pi", "me"]      # 4x2e7 > 4x6e6 > 1x2e7
    assert [c.node.name for c in choose([me, desk, pi], spill_cpu_pct=80, units=1000, split=False)] == ["desk"]


def test_exec_jobs_only_go_where_exec_is_allowed() -> None:
    me = node("me", local=True)
    pi = node("pi", exec_allowed=True, spare=1.0)
    assert [c.node.name for c in choose([me, pi], spill_cpu_pct=80, exec_job=True)] == ["pi"]
    assert choose([me], spill_cpu_pct=80, exec_job=True) == []


def test_cut_covers_every_unit_once_and_respects_the_protocol_limit() -> None:
    for units, total in ((1, 1), (16, 2), (143, 3), (1000, 7), (5, 100)):
        chunks = cut(units, total)
        covered = [u for start, count in chunks for u in range(start, start + count)]
        assert covered == list(range(units))
        assert all(count >= 1 for _, count in chunks)
    assert len(cut(143, 3)) == 9                        # about three chunks per slot
    huge = cut(4_000_000, 1)                            # vesta cpu ~4e12 on one slot
    assert max(count for _, count in huge) == autopilot.MAX_UNITS_PER_CHUNK == proto.MAX_UNITS_PER_CHUNK
    assert sum(count for _, count in huge) == 4_000_000


def test_chunks_are_sized_for_every_core_that_could_join() -> None:
    nodes = [node("me", local=True, cores=2), node("a", cores=8), node("b", cores=4)]
    assert cut_size_slots(nodes, chosen_slots=1) == 14
    assert cut_size_slots(nodes, chosen_slots=20) == 20


def test_memory_goes_to_the_roomiest_node_that_fits() -> None:
    nodes = [node("a", mem=64), node("b", mem=512), node("c", mem=2048)]
    assert [n.name for n in fits_memory(nodes, 200)] == ["c", "b"]
    assert fits_memory(nodes, 4096) == []
