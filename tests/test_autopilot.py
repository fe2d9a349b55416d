"""Routing rules in pure code: ranking by speed, chunk cutting, memory (the slots are placement's: test_placement)."""

from __future__ import annotations

from vesta import autopilot, proto
from vesta.autopilot import NodeView, cut, cut_size_slots, fits_memory, score


def node(name: str, *, local: bool = False, cores: int = 4, cpu: float = 0.0, spare: float = 3.0,
         rate: float = 2e7, mem: int = 1024, exec_allowed: bool = False, seen: float = 0.0) -> NodeView:
    return NodeView(name * 8 if len(name) < 32 else name, name, local, cores, cpu, spare, rate, mem, exec_allowed,
                    seen)


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


def test_nodes_are_ranked_by_free_slots_times_speed() -> None:
    """A Pi and a desktop get work in proportion to what they really do."""
    pi, desk = node("pi4", rate=1e6), node("desk", rate=4e6)
    assert score(desk, 1) > score(pi, 2) > score(pi, 1) > score(pi, 0) == 0
    assert score(node("new", rate=0.0), 2) == 2   # speed not measured yet: slots alone

