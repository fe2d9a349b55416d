"""Placement in pure code: slots counted with the work in flight, the reasons of "why not there?", and
property tests over arbitrary interleavings of results, refusals, lost nodes and new views."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import FakeClock
from vesta.autopilot import NodeView
from vesta.placement import FULL_MAX_S, PASSING, JobPlan, Placer, Want


def local(cores: int = 1, spare: float = 1.0, cpu: float = 0.0, **kw: Any) -> NodeView:
    fields: dict[str, Any] = {"fingerprint": "fp-a", "name": "a", "local": True, "cores": cores, "cpu_pct": cpu,
                              "spare_cores": spare, "hash_rate": 1.0, "offered_mem_mb": 1024, "exec_allowed": True}
    return NodeView(**(fields | kw))


def peer(name: str, spare: float = 1.0, offered: float = 1.0, running: int = 0, seen: float = 1.0,
         **kw: Any) -> NodeView:
    fields: dict[str, Any] = {"fingerprint": f"fp-{name}", "name": name, "local": False, "cores": 1,
                              "cpu_pct": 0.0, "spare_cores": spare, "hash_rate": 1.0, "offered_mem_mb": 512,
                              "exec_allowed": True, "last_seen": seen, "running": running, "offered_cores": offered}
    return NodeView(**(fields | kw))


def placer(*views: NodeView, spill: float = 80.0, clock: FakeClock | None = None) -> Placer:
    p = Placer(spill_cpu_pct=spill, clock=clock or FakeClock())
    p.update(views)
    return p


def one_chunk(p: Placer, want: Want | None = None, **kw: object) -> JobPlan:
    return JobPlan(p, want or Want(), [(0, 1)], **kw)  # type: ignore[arg-type]


def test_a_burst_spreads_over_every_node_and_the_rest_waits() -> None:
    """Two one-slot nodes: the first job goes to one, the second to the other at once (no beacon
    in between), the third waits until a chunk ends anywhere."""
    p = placer(local(), peer("b"))
    plans = [one_chunk(p, pinned=True) for _ in range(3)]
    first, second = plans[0].next(), plans[1].next()
    assert {first[0].node.name, second[0].node.name} == {"a", "b"}
    assert plans[2].next() == [] and plans[2].stuck() == "wait"
    assert p.free("fp-a") == p.free("fp-b") == 0
    plans[1].ended(second[0].token, ok=True)          # a chunk ends: its slot is free at once
    third = plans[2].next()
    assert [s.node.name for s in third] == [second[0].node.name]


def test_peer_slots_come_from_its_beacon_and_what_others_ran_there() -> None:
    p = placer(local(), peer("b", spare=0.0, offered=2.0, running=2))
    assert p.slots("fp-b") == 2 and p.in_use("fp-b") == 2 and p.free("fp-b") == 0   # others' chunks
    p.update([local(), peer("b", spare=1.0, offered=2.0, running=1, seen=2.0)])
    assert p.free("fp-b") == 1
    p.take("fp-b")
    p.update([local(), peer("b", spare=0.0, offered=2.0, running=2, seen=3.0)])   # its beacon counts ours too
    assert p.in_use("fp-b") == 2 and p.free("fp-b") == 0
    p.release("fp-b")
    assert p.free("fp-b") == 1


def test_a_capacity_refusal_makes_a_node_full_until_its_next_beacon() -> None:
    clock = FakeClock()
    p = placer(local(), peer("b"), clock=clock)
    p.take("fp-b")
    p.release("fp-b", refused="capacity")
    assert p.free("fp-b") == 0
    assert p.update([local(), peer("b", seen=2.0)])   # capacity appeared: the event says so
    assert p.free("fp-b") == 1
    p.take("fp-b")
    p.release("fp-b", refused="capacity")
    clock.advance(FULL_MAX_S - 0.1)
    assert p.free("fp-b") == 0
    clock.advance(0.2)                                 # its beacons are slow: asked again after a while
    assert p.free("fp-b") == 1


def test_this_node_gives_its_owner_every_free_core_but_never_less_than_one() -> None:
    p = placer(local(cores=4, spare=3.0, cpu=25.0))
    assert p.slots("fp-a") == 3
    p = placer(local(cores=4, spare=0.0, cpu=100.0))
    assert p.slots("fp-a") == 1


def test_over_the_spill_threshold_this_node_is_the_last_resort() -> None:
    p = placer(local(spare=0.2, cpu=90.0), peer("b"))
    plan = one_chunk(p, pinned=True)
    assert [s.node.name for s in plan.next()] == ["b"]
    rows = {r.node: r for r in plan.rows()}
    assert rows["b"].chosen and not rows["a"].chosen
    other = one_chunk(p, pinned=True)
    assert other.next() == [] and other.stuck() == "wait"   # b is full: new work waits for the peer
    assert "spill threshold" in {r.node: r.why for r in other.rows()}["a"]
    p.update([local(spare=0.2, cpu=90.0), peer("b", spare=0.0, offered=0.0, seen=2.0)])
    assert [s.node.name for s in other.next()] == ["a"]     # no peer has a slot at all: here anyway


def test_every_reason_a_node_was_not_chosen() -> None:
    views = [local(exec_allowed=False), peer("b", labels=("gpu",)), peer("c", lending=False, labels=("gpu",)),
             peer("d", exec_allowed=False), peer("e")]
    p = placer(*views)
    why = {r.node: r.why for r in one_chunk(p, Want("exec", need=("gpu",))).rows()}
    assert why == {"a": "exec off", "b": "ranked lower", "c": "outside lending hours", "d": "exec off",
                   "e": "unknown label gpu (has no labels)"}
    p.take("fp-b")
    plan = one_chunk(p, Want("mem", mem_mib=600))
    assert {r.node: r.why for r in plan.rows()}["b"] == "memory: offers 512 MiB, 600 MiB asked"
    plan = one_chunk(p, Want("cpu"))
    assert {r.node: r.why for r in plan.rows()}["b"] == "busy with 1 of 1 slots"
    started = plan.next()
    plan.ended(started[0].token, ok=False, refused="ledger", error="borrow cap reached")
    row = {r.node: r for r in plan.decision()}[started[0].node.name]
    assert not row.chosen and row.why == "ledger cap: refused (ledger: borrow cap reached)"
    assert all(r.why == "" for r in plan.decision() if r.chosen)


def test_a_forced_node_that_offers_nothing_is_asked_anyway_and_its_refusal_fails_the_job() -> None:
    p = placer(local(), peer("b", spare=0.0, offered=0.0))
    plan = one_chunk(p, Want("cpu", on="b"))
    started = plan.next()
    assert [s.node.name for s in started] == ["b"]
    assert plan.ended(started[0].token, ok=False, refused="capacity", error="b is busy") == "moved"
    assert plan.next() == [] and plan.stuck() == "fail"


def test_an_impatient_job_is_offered_to_a_full_node_but_a_patient_one_waits() -> None:
    p = placer(local(exec_allowed=False), peer("b"))
    p.take("fp-b")
    assert one_chunk(p, Want("exec"), patient=True).next() == []
    assert [s.node.name for s in one_chunk(p, Want("exec"), patient=False).next()] == ["b"]


def test_a_lost_chunk_runs_at_most_max_attempts_times() -> None:
    p = placer(local(), peer("b"), peer("c"))
    plan = JobPlan(p, Want(), [(0, 1)], max_attempts=2, one_at_a_time=True)
    first = plan.next()[0]
    assert plan.ended(first.token, ok=False, error="lost", started=True) == "moved"
    second = plan.next()[0]
    assert second.node.fingerprint != first.node.fingerprint and second.attempt == 2
    assert plan.ended(second.token, ok=False, error="lost", started=True) == "failed"


def test_unknown_on_names_are_told_from_nodes_seen_before() -> None:
    p = placer(local(), peer("b"))
    p.update([local()])              # b is gone for now
    assert p.known("b") and p.known("a") and not p.known("nowhere")
    assert p.known("fp-b0000"[:5]) is False   # a fingerprint prefix needs 8 characters


# ---------------------------------------------------------------- properties

OUTCOMES = st.sampled_from(["ok", "ok", "ok", "capacity", "ledger", "not_allowed", "lost", "dropped"])


def fresh_views(data: st.DataObject, seen: float, present: list[str]) -> list[NodeView]:
    views = [local(cores=2, spare=data.draw(st.sampled_from([0.0, 1.0, 2.0])))]
    for name in present:
        spare = data.draw(st.sampled_from([0.0, 1.0, 2.0]))
        views.append(peer(name, spare=spare, offered=2.0, running=data.draw(st.integers(0, 2)), seen=seen,
                          exec_allowed=data.draw(st.booleans())))
    return views


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_interleaving_loses_no_chunk_completes_none_twice_and_fails_only_without_a_node(
        data: st.DataObject) -> None:
    names = ["b", "c"]
    p = placer(*fresh_views(data, 1.0, names))
    kinds = data.draw(st.lists(st.sampled_from(["split", "pinned", "exec"]), min_size=1, max_size=4))
    plans = []
    for kind in kinds:
        n = data.draw(st.integers(1, 5)) if kind == "split" else 1
        plans.append(JobPlan(p, Want("exec" if kind == "exec" else "cpu"), [(i, 1) for i in range(n)],
                             patient=kind != "exec", pinned=kind == "pinned", one_at_a_time=kind == "exec",
                             max_attempts=3, cut=(lambda slots: [(0, 1)]) if kind == "pinned" else None))
    failed: set[int] = set()
    completions: dict[tuple[int, int], int] = {}
    seen = 1.0
    for _ in range(data.draw(st.integers(1, 40))):
        live = [i for i, plan in enumerate(plans) if i not in failed and not plan.complete()]
        if not live:
            break
        step = data.draw(st.sampled_from(["next", "end", "end", "view", "lose"]))
        i = data.draw(st.sampled_from(live))
        plan = plans[i]
        if step == "next":
            for s in plan.next():
                assert s.chunk not in plan.done
        elif step == "end" and plan.running:
            token = data.draw(st.sampled_from(sorted(plan.running)))
            chunk, _ = plan.running[token]
            outcome = data.draw(OUTCOMES)
            verdict = plan.ended(token, ok=outcome == "ok", refused=outcome if outcome in
                                 ("capacity", "ledger", "not_allowed") else "", error=outcome,
                                 started=outcome == "lost")
            if verdict == "done":
                completions[(i, chunk)] = completions.get((i, chunk), 0) + 1
            elif verdict == "failed":
                failed.add(i)
        elif step == "view":
            seen += 1.0
            p.update(fresh_views(data, seen, names))
        elif step == "lose" and len(names) > 0:
            names = names[1:]
            p.update([v for v in p.views.values() if v.local or v.name in names])
        check(p, plans, failed)
    assert all(n == 1 for n in completions.values()), completions
    drain(p, plans, failed)


def check(p: Placer, plans: list[JobPlan], failed: set[int]) -> None:
    """No chunk lost: each is queued, running or done, once; every slot held is a chunk running."""
    held: dict[str, int] = {}
    for i, plan in enumerate(plans):
        running = [chunk for chunk, _ in plan.running.values()]
        every = sorted([*plan.queue, *running, *plan.done])
        if i not in failed:
            assert every == list(range(len(plan.chunks))), (every, plan.chunks)
        for _, fp in plan.running.values():
            held[fp] = held.get(fp, 0) + 1
        if not plan.running and plan.queue and plan.stuck() == "fail":   # only when no node can take it
            assert all(v.fingerprint in plan.left or p.why_not(v, plan.want) for v in p.views.values())
    assert {fp: n for fp, n in p.used.items() if n} == held


def drain(p: Placer, plans: list[JobPlan], failed: set[int]) -> None:
    """From any state, once the nodes have room and say yes, every job not failed completes: each chunk exactly once,
    and a patient job that has a node left never fails."""
    seen = 100.0
    for _ in range(200):
        for i, plan in enumerate(plans):
            if i in failed or plan.complete():
                continue
            plan.next()
            for token in list(plan.running):
                assert plan.ended(token, ok=True) == "done"
            if not plan.complete() and not plan.running:
                if plan.stuck() == "fail":
                    assert plan.left, "failed with no node ever tried"
                    failed.add(i)
        seen += 1.0
        # capacity appears: what others ran there ends, every node has a core to spare
        p.update([replace(v, last_seen=seen, running=0, spare_cores=max(v.spare_cores, 1.0))
                  for v in p.views.values()])
    for i, plan in enumerate(plans):
        if i not in failed:
            assert plan.complete() and sorted(plan.done) == list(range(len(plan.chunks))), (
                plan.queue, plan.running, plan.left, plan.home, {fp: (p.slots(fp), p.in_use(fp), p.free(fp))
                                                                 for fp in p.views}, plan.candidates())
            assert not plan.passing - set(plan.left)
    assert not any(p.used.values())
    assert PASSING >= {"capacity", "ledger"}
