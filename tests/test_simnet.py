"""simnet: the real membership code on a simulated network of 50 nodes, with loss and a partition that heals.

Only simulated times are checked here (the runs are seeded, so they are the same on any machine); the
speed and CPU goals are for ``scripts/simulate``, never for the suite.
"""

from __future__ import annotations

import os

import pytest
from nacl.signing import SigningKey

from vesta import simnet
from vesta.crypto import (
    MAX_MEMBER_DATAGRAM,
    FederationKeys,
    fingerprint,
    open_member_packet,
    seal_member_packet,
    verify_signature,
)
from vesta.errors import AuthError, ProtocolError
from vesta.membership import State


def test_fifty_nodes_with_loss_and_a_partition_that_heals() -> None:
    sc = simnet.scenario("50-partition")
    assert sc.subnets * sc.per_subnet == 50 and sc.loss > 0 and sc.partition is not None
    rep = simnet.run(sc)
    assert rep.nodes == 50
    assert rep.converged_s is not None and rep.converged_s <= 5.0
    # The partition was real: members across it were suspected, and declared dead, during it ...
    assert rep.counters["probe_failures"] > 0
    # ... and once it healed, everyone knew everyone again (through syncs with the dead and refutations).
    assert rep.healed_s is not None and rep.healed_s <= 20.0
    assert rep.counters["refutations"] > 0
    # The killed node: suspected within 5 s, gone from every table within 15 s; the leaver at once.
    assert len(rep.gone_all_s) == 1 and max(rep.detect_first_s) <= 5.0 and max(rep.gone_all_s) <= 15.0
    assert len(rep.left_all_s) == 1 and max(rep.left_all_s) <= 2.0
    assert rep.false_suspicions == 0
    assert rep.max_datagram <= simnet.MAX_DATAGRAM
    assert rep.load_age_placed_max <= 2.0
    assert any(line.startswith("  PASS") for line in rep.lines())


def test_a_partition_that_never_heals_is_reported_as_such() -> None:
    sc = simnet.scenario("50-partition", idle=30.0, partition=(5.0, 1e9), kills=0, leaves=0)
    rep = simnet.run(sc)
    assert rep.healed_s is None
    assert rep.counters["probe_failures"] > 0


def test_broadcast_domains_and_seeds() -> None:
    """Two subnets: HELLOs reach only their own subnet; the seeds carry members across."""
    sc = simnet.scenario("50-partition", partition=None, kills=0, leaves=0, idle=5.0, loss=0.0)
    sim = simnet.Sim(sc)
    for n in sim.nodes:
        if n.m.seeds:
            assert all(not s[0].startswith(f"10.{n.subnet}.") for s in n.m.seeds)
    # Without seeds, the subnets never meet.
    lonely = simnet.Sim(simnet.scenario("50-partition", partition=None, seeds_per_subnet=0, loss=0.0))
    for n in lonely.nodes:
        lonely.at(0.1 * n.i / 50, lambda n=n: lonely.start(n))
    lonely.run_until(15.0)
    a = lonely.nodes[0]
    assert a.m.live_count() == 24
    assert all(a.m.state_of(o.m.me) is None for o in lonely.nodes if o.subnet == 1)
    # With them, everyone knows all 49 others.
    for n in sim.nodes:
        sim.at(0.1 * n.i / 50, lambda n=n: sim.start(n))
    sim.run_until(15.0)
    assert sim.converged()
    assert all(n.m.state_of(o.m.me) is State.ALIVE for n in sim.nodes for o in sim.nodes if o is not n)


def test_sealed_size_is_what_the_crypto_makes() -> None:
    keys = FederationKeys(os.urandom(32), os.urandom(32), "00000000")
    signer = SigningKey.generate()
    for size in (10, 200, 1200):
        body = os.urandom(size)
        datagram = seal_member_packet(keys, signer, body)
        assert simnet.sealed_size(body) == len(datagram)
        pub, opened, message, sig = open_member_packet(keys, datagram)
        assert opened == body and pub == bytes(signer.verify_key)
        verify_signature(pub, message, sig)


def test_membership_datagrams_are_checked_before_they_are_believed() -> None:
    keys = FederationKeys(os.urandom(32), os.urandom(32), "00000000")
    other = FederationKeys(os.urandom(32), os.urandom(32), "00000001")
    signer, thief = SigningKey.generate(), SigningKey.generate()
    good = seal_member_packet(keys, signer, b"body")
    with pytest.raises(ProtocolError):
        open_member_packet(keys, good + bytes(MAX_MEMBER_DATAGRAM))       # oversized: before decrypting
    with pytest.raises(AuthError):
        open_member_packet(other, good)                                   # another federation's key
    with pytest.raises(ProtocolError):
        open_member_packet(keys, b"V" + good[1:])                         # a beacon's header
    with pytest.raises(ProtocolError, match="version 2, this node speaks 1"):
        open_member_packet(keys, b"M\x02" + good[2:])                    # a newer version: said so
    with pytest.raises(AuthError):
        open_member_packet(keys, good[:-1] + bytes([good[-1] ^ 1]))       # tampered
    # A key holder signing in another's name: the envelope opens, the signature does not hold for the key
    # the receiver expects (it checks the key against the fingerprint it knows).
    pub, _, message, sig = open_member_packet(keys, seal_member_packet(keys, thief, b"body"))
    assert fingerprint(pub) != fingerprint(bytes(signer.verify_key))
    with pytest.raises(AuthError):
        verify_signature(bytes(signer.verify_key), message, sig)
