"""membership: the SWIM state machine on a fake clock (suspect, refute, confirm, leave, rejoin, limits)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import FakeClock
from vesta.errors import ProtocolError
from vesta.membership import (
    Kind,
    Load,
    MemberConfig,
    Membership,
    Packet,
    Send,
    State,
    Sync,
    UKind,
    Update,
    decode_packet,
    encode_packet,
)

CFG = MemberConfig(sync_interval=1e9, reconnect_interval=1e9, hello_interval=1e9, tombstone_s=30.0)


def fp(i: int) -> str:
    return f"{i:032x}"


class Lan:
    """Members on one fake clock; packets go through the real codec and arrive at once unless dropped."""

    def __init__(self, n: int, cfg: MemberConfig = CFG, seed: int = 1) -> None:
        self.clock = FakeClock(1000.0)
        self.cfg = cfg
        self.nodes: dict[str, Membership] = {}
        self.by_addr: dict[tuple[str, int], Membership] = {}
        self.drop: Callable[[str, str, Packet], bool] = lambda src, dst, p: False
        self.sent: list[tuple[str, str, Packet]] = []
        self.rng = random.Random(seed)
        for i in range(n):
            self.add(i)

    def add(self, i: int, incarnation: int = 1) -> Membership:
        m = Membership(fp(i), (f"10.0.0.{i}", 7778), self.cfg, self.clock, incarnation=incarnation,
                       rng=random.Random(self.rng.random()))
        self.nodes[m.me] = m
        self.by_addr[m.addr] = m
        return m

    def sync(self, a: Membership, b: Membership) -> None:
        sa, sb = a.local_state(), b.local_state()
        b.merge_state(sa)
        a.merge_state(sb)

    def join_all(self) -> None:
        """Every node started (its own Alive queued; hellos not delivered) and synced with the first."""
        first = next(iter(self.nodes.values()))
        for m in self.nodes.values():
            m.start()
        for m in self.nodes.values():
            if m is not first:
                self.sync(m, first)

    def run(self, actions: list[Send | Sync], sender: Membership) -> None:
        todo = [(sender, a) for a in actions]
        while todo:
            src, action = todo.pop(0)
            if isinstance(action, Sync):
                dst = self.by_addr.get(action.to)
                if dst is not None:
                    self.sync(src, dst)
                continue
            packet = decode_packet(encode_packet(action.packet))   # the real codec every time
            # None: the LAN broadcast, to every node but the sender
            dsts = [self.by_addr.get(action.to)] if action.to is not None else \
                [m for m in self.nodes.values() if m is not src]
            for dst in dsts:
                if dst is None or self.drop(src.me, dst.me, packet):
                    continue
                self.sent.append((src.me, dst.me, packet))
                todo.extend((dst, a) for a in dst.receive(packet, src.addr))

    def step(self, dt: float = 0.05) -> None:
        self.clock.t += dt
        for m in list(self.nodes.values()):
            if m.next_wakeup() <= self.clock.t:
                self.run(m.tick(), m)

    def advance(self, seconds: float, dt: float = 0.05) -> None:
        for _ in range(round(seconds / dt)):
            self.step(dt)


def states(lan: Lan, node: str) -> set[State | None]:
    return {m.state_of(node) for m in lan.nodes.values() if m.me != node}


def test_codec_round_trip() -> None:
    p = Packet(Kind.PING_REQ, fp(1), 7, fp(2), ("10.0.0.2", 7778),
               (Update(UKind.ALIVE, fp(3), 5, ("10.0.0.3", 7778)), Update(UKind.SUSPECT, fp(4), 1, by=fp(1)),
                Update(UKind.DEAD, fp(5), 2, by=fp(1)), Update(UKind.LEFT, fp(6), 9)),
               (Load(fp(1), 3, 25, 2048, 1, 120),))
    assert decode_packet(encode_packet(p)) == p


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_is_protocol_error(data: bytes) -> None:
    try:
        decode_packet(data)
    except ProtocolError:
        pass


def test_wrong_types_are_protocol_errors() -> None:
    import msgpack
    bad = [
        [1, b"x" * 15, 0, b"", "", 0, [], []],            # short sender id
        [99, b"x" * 16, 0, b"", "", 0, [], []],           # unknown kind
        [1, b"x" * 16, -1, b"", "", 0, [], []],           # negative seq
        [1, b"x" * 16, 0, b"", "", 0, [[9, b"y" * 16, 1]], []],    # unknown update kind
        [1, b"x" * 16, 0, b"", "", 0, [[0] * 3] * 65, []],          # too many updates
        [1, b"x" * 16, 0, b"", "", 70000, [], []],        # port out of range
    ]
    for body in bad:
        with pytest.raises(ProtocolError):
            decode_packet(msgpack.packb(body, use_bin_type=True))


def test_sync_joins_both_ways_and_gossip_spreads() -> None:
    lan = Lan(3)
    a, b, c = lan.nodes.values()
    for m in (a, b, c):
        m.start()   # queues its own Alive (the hellos are not delivered)
    lan.sync(a, b)
    assert b.state_of(a.me) is State.ALIVE and a.state_of(b.me) is State.ALIVE
    lan.sync(c, b)     # c learns a from b; a learns c only by gossip
    assert c.state_of(a.me) is State.ALIVE and a.state_of(c.me) is None
    lan.advance(2.0)
    assert a.state_of(c.me) is State.ALIVE
    assert [e.event for e in a.drain_events()] == ["joined", "joined"]


def test_probes_keep_members_alive_and_carry_load() -> None:
    lan = Lan(5)
    lan.join_all()
    for _ in range(10):   # the driver refreshes the load every second
        for i, m in enumerate(lan.nodes.values()):
            m.set_load(1.5 + i, 1000, 0)
        lan.advance(1.0)
    for m in lan.nodes.values():
        assert m.live_count() == 4 and all(x.state is State.ALIVE for x in m.members.values())
        assert m.counters["probe_failures"] == 0 and m.counters["probes"] >= 15
    a = lan.nodes[fp(0)]
    age = a.load_age(fp(1))
    assert age is not None and age < 3.0
    rec = a.members[fp(1)].load
    assert rec is not None and rec.spare_tenths == 25


def test_silent_member_is_suspected_then_confirmed_dead_everywhere() -> None:
    lan = Lan(5)
    lan.join_all()
    lan.advance(2.0)
    dead = lan.nodes[fp(4)]
    lan.drop = lambda src, dst, p: fp(4) in (src, dst)   # it stops answering
    died = lan.clock.t
    suspected_at = gone_at = None
    for _ in range(400):
        lan.step()
        others = {m.state_of(dead.me) for m in lan.nodes.values() if m is not dead}
        if suspected_at is None and State.SUSPECT in others:
            suspected_at = lan.clock.t - died
        if others == {State.DEAD}:
            gone_at = lan.clock.t - died
            break
    # Each prober reaches it within two rounds of its shuffled list (4 members), and fails one period later.
    assert suspected_at is not None and suspected_at <= (2 * 4 + 1) * CFG.probe_interval + 0.1
    assert gone_at is not None
    # A lone suspicion lasts at most max_mult x the minimum; confirmations by others make it shorter.
    n = 5
    low = CFG.suspicion_mult * max(1.0, __import__("math").log10(n + 1)) * CFG.probe_interval
    assert gone_at <= suspected_at + low * CFG.suspicion_max_mult + 1.0
    seen = [[e.event for e in m.drain_events() if e.node == dead.me] for m in lan.nodes.values() if m is not dead]
    assert all(events[-1] == "dead" for events in seen)
    assert any("suspect" in events for events in seen)


def test_indirect_probe_saves_a_member_behind_one_bad_path() -> None:
    lan = Lan(5)
    lan.join_all()
    # a cannot reach e directly (either way), but others can: indirect probes must keep e alive at a.
    lan.drop = lambda src, dst, p: {src, dst} == {fp(0), fp(4)}
    lan.advance(20.0)
    a = lan.nodes[fp(0)]
    assert a.counters["indirect_probes"] > 0
    assert a.counters["probe_failures"] == 0
    assert states(lan, fp(4)) == {State.ALIVE}


def test_suspected_member_refutes_with_a_higher_incarnation() -> None:
    lan = Lan(4)
    lan.join_all()
    lan.advance(1.0)
    victim = lan.nodes[fp(3)]
    before = victim.incarnation
    a = lan.nodes[fp(0)]
    # a wrongly suspects the victim (say its probe was lost); the suspicion spreads and the victim hears it.
    lan.run([Send(victim.addr, Packet(Kind.GOSSIP, a.me, updates=(Update(UKind.SUSPECT, victim.me, before,
                                                                          by=a.me),)))], a)
    assert victim.incarnation == before + 1 and victim.counters["refutations"] == 1
    lan.advance(3.0)
    assert states(lan, victim.me) == {State.ALIVE}
    assert all(m.members[victim.me].incarnation == before + 1 for m in lan.nodes.values() if m is not victim)


def test_stale_suspicion_does_not_override_newer_alive() -> None:
    lan = Lan(2)
    a, b = lan.nodes.values()
    lan.sync(a, b)
    b_inc = a.members[b.me].incarnation
    a.receive(Packet(Kind.GOSSIP, fp(9), updates=(Update(UKind.ALIVE, b.me, b_inc + 2, b.addr),)), ("10.0.0.9", 1))
    a.receive(Packet(Kind.GOSSIP, fp(9), updates=(Update(UKind.SUSPECT, b.me, b_inc + 1, by=fp(9)),)),
              ("10.0.0.9", 1))
    assert a.state_of(b.me) is State.ALIVE


def test_leave_is_known_at_once_and_rejoin_takes_a_new_incarnation() -> None:
    lan = Lan(4)
    lan.join_all()
    lan.advance(1.0)
    leaver = lan.nodes[fp(3)]
    lan.run(leaver.leave(), leaver)
    del lan.nodes[leaver.me], lan.by_addr[leaver.addr]
    lan.advance(1.0)
    assert states(lan, leaver.me) == {State.LEFT}
    assert not any(m.counters["probe_failures"] for m in lan.nodes.values())
    # Back again, with a newer incarnation (the daemon passes its start time): it beats the Left remembered.
    back = lan.add(3, incarnation=leaver.incarnation + 1)
    lan.run(back.start(), back)    # its hello reaches everyone
    lan.advance(2.0)
    assert states(lan, back.me) == {State.ALIVE}
    assert "rejoined" in [e.event for e in lan.nodes[fp(1)].drain_events() if e.node == back.me]


def test_old_gossip_cannot_revive_a_dead_member() -> None:
    lan = Lan(2)
    a, b = lan.nodes.values()
    lan.sync(a, b)
    inc = a.members[b.me].incarnation
    a.receive(Packet(Kind.GOSSIP, fp(9), updates=(Update(UKind.DEAD, b.me, inc, by=fp(9)),)), ("10.0.0.9", 1))
    assert a.state_of(b.me) is State.DEAD
    a.receive(Packet(Kind.GOSSIP, fp(9), updates=(Update(UKind.ALIVE, b.me, inc, b.addr),)), ("10.0.0.9", 1))
    assert a.state_of(b.me) is State.DEAD
    lan.clock.t += CFG.tombstone_s + 1
    a.tick()
    assert a.state_of(b.me) is None   # the tombstone is reaped after tombstone_s


def test_confirmations_shorten_the_suspicion() -> None:
    lan = Lan(8)
    lan.join_all()
    a = lan.nodes[fp(0)]
    target = fp(7)
    inc = a.members[target].incarnation
    a.receive(Packet(Kind.GOSSIP, fp(1), updates=(Update(UKind.SUSPECT, target, inc, by=fp(1)),)), ("x", 1))
    lone = a._suspicions[target].deadline - lan.clock.t
    for i in (2, 3, 4):
        a.receive(Packet(Kind.GOSSIP, fp(i), updates=(Update(UKind.SUSPECT, target, inc, by=fp(i)),)), ("x", 1))
    confirmed = a._suspicions[target].deadline - lan.clock.t
    assert confirmed == pytest.approx(a.suspicion_min()) and lone == pytest.approx(
        a.suspicion_min() * CFG.suspicion_max_mult)


def test_gossip_retransmits_are_bounded_by_log_n() -> None:
    lan = Lan(20)
    lan.join_all()
    lan.advance(3.0)      # the join news has run out
    lan.sent.clear()
    a = lan.nodes[fp(0)]
    a._refute(a.incarnation)   # one piece of news from a
    lan.advance(10.0)
    carried_by_a = sum(1 for src, _, p in lan.sent if src == a.me and any(u.node == a.me for u in p.updates))
    assert 1 <= carried_by_a <= a.retransmit_limit()
    assert states(lan, a.me) == {State.ALIVE}
    assert {m.members[a.me].incarnation for m in lan.nodes.values() if m is not a} == {a.incarnation}


def test_packets_stay_under_the_body_limit_with_a_long_queue() -> None:
    lan = Lan(2)
    a, b = lan.nodes.values()
    lan.sync(a, b)
    for i in range(100, 400):
        a.receive(Packet(Kind.GOSSIP, b.me, updates=(Update(UKind.ALIVE, fp(i), 1, (f"10.1.{i // 250}.{i % 250}",
                                                                                        7778)),)), b.addr)
        a.members[fp(i)].load = Load(fp(i), 1, 10, 100, 0)
    a.set_load(2.0, 1000, 1)
    lan.clock.t += 1.0
    sizes = [len(encode_packet(act.packet)) for act in a.tick() if isinstance(act, Send)]
    assert sizes and max(sizes) <= CFG.max_body
    assert max(sizes) > CFG.max_body // 2    # and they are used: news is packed


def test_member_list_is_bounded_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    cfg = MemberConfig(max_members=5, sync_interval=1e9, reconnect_interval=1e9, hello_interval=1e9)
    lan = Lan(10, cfg)
    lan.join_all()
    first = lan.nodes[fp(0)]
    assert len(first.members) == 5 and first.counters["members_full"] >= 4
    assert "member list full" in caplog.text
    lan.advance(10.0)
    # It still probes and keeps what it holds; nobody it holds is suspected.
    assert first.live_count() == 5 and first.counters["probe_failures"] == 0


def test_a_newcomer_heard_by_broadcast_syncs_with_the_first_member_to_talk_to_it() -> None:
    lan = Lan(3)
    a, b, c = lan.nodes.values()
    lan.sync(a, b)
    hello = [x for x in c.start() if isinstance(x, Send) and x.to is None]
    assert len(hello) == 1 and hello[0].packet.kind is Kind.HELLO
    for m in (a, b):   # the broadcast reaches both
        m.receive(decode_packet(encode_packet(hello[0].packet)), c.addr)
        assert m.state_of(c.me) is State.ALIVE
        queued = [once for u, _, _, once in m._queue.values() if u.node == c.me]
        assert queued == [True]   # heard by nearly all: passed on once, not log N times
    lan.advance(3.0)
    assert c.live_count() == 2


def test_the_live_count_follows_every_change() -> None:
    lan = Lan(12, MemberConfig(max_members=8, sync_interval=1e9, reconnect_interval=1e9, hello_interval=1e9,
                               tombstone_s=2.0))
    lan.join_all()

    def check() -> None:
        for m in lan.nodes.values():
            assert m.live_count() == sum(1 for x in m.members.values() if x.state in (State.ALIVE, State.SUSPECT))

    check()
    lan.drop = lambda src, dst, p: fp(11) in (src, dst)
    leaver = lan.nodes[fp(10)]
    lan.run(leaver.leave(), leaver)
    for _ in range(60):
        lan.step(0.1)
        check()
    back = lan.add(10, incarnation=leaver.incarnation + 1)
    lan.run(back.start(), back)
    for _ in range(60):
        lan.step(0.1)
        check()


def test_a_ping_request_cannot_aim_pings_at_another_address() -> None:
    lan = Lan(3)
    lan.join_all()
    lan.advance(2.0)
    a, b, c = lan.nodes.values()
    assert b.state_of(c.me) is State.ALIVE
    req = Packet(Kind.PING_REQ, a.me, seq=9, target=c.me, target_addr=("192.0.2.66", 9))
    pings = [x for x in b.receive(req, a.addr) if isinstance(x, Send) and x.packet.kind is Kind.PING]
    assert [p.to for p in pings] == [c.addr]           # where b knows c to be, not where the request said
    stranger = Packet(Kind.PING_REQ, a.me, seq=10, target=fp(99), target_addr=("192.0.2.66", 9))
    assert not [x for x in b.receive(stranger, a.addr) if isinstance(x, Send)]
    assert b.counters["ping_req_unknown"] == 1
