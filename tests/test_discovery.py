"""discovery: beacons stay one unfragmented datagram and rotate their gossip through every peer."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from nacl.signing import SigningKey

from tests.helpers import FakeClock
from tests.test_peertable import make_beacon
from vesta import proto
from vesta.config import Config
from vesta.crypto import FederationKeys, fingerprint, open_beacon
from vesta.discovery import GOSSIP_PER_BEACON, MAX_SEALED, Discovery
from vesta.identity import Identity
from vesta.peertable import PeerTable


def make_discovery(table: PeerTable) -> Discovery:
    key = SigningKey.generate()
    pub = bytes(key.verify_key)
    ident = Identity(key, pub, fingerprint(pub), Path("/nonexistent"))
    keys = FederationKeys(os.urandom(32), os.urandom(32), "00000000")
    own = make_beacon(fingerprint(pub), name="self").status
    return Discovery(Config.for_tests(), keys, ident, table, Counter(), lambda: own, lambda c: None)


def test_beacons_fit_one_datagram_and_gossip_every_peer_in_turn() -> None:
    table = PeerTable(max_peers=1000, clock=FakeClock())
    fps = [f"{i:032x}" for i in range(300)]
    for i, fp in enumerate(fps):
        table.observe(make_beacon(fp, name=f"n{i}"), (f"10.0.{i // 200}.{i % 200 + 1}", 7778))
        table.mark_linked(fp)
    disco = make_discovery(table)
    mentioned: set[str] = set()
    for _ in range(300 // GOSSIP_PER_BEACON + 1):
        datagram = disco.seal(disco.make_beacon())
        assert len(datagram) <= MAX_SEALED
        message, _ = open_beacon(disco.keys, datagram)
        beacon = proto.decode(message)
        assert isinstance(beacon, proto.Beacon) and 0 < len(beacon.gossip) <= GOSSIP_PER_BEACON
        mentioned.update(g.fingerprint for g in beacon.gossip)
    assert mentioned == set(fps)


def test_a_goodbye_carries_no_gossip() -> None:
    table = PeerTable(clock=FakeClock())
    table.observe(make_beacon("ab" * 16), ("10.0.0.9", 7778))
    disco = make_discovery(table)
    beacon = disco.make_beacon(leaving=True)
    assert beacon.leaving and beacon.gossip == ()
    decoded = proto.decode(proto.encode(beacon))
    assert isinstance(decoded, proto.Beacon) and decoded.leaving
    # An older node's beacon has no such field: it is not leaving.
    assert "leaving" not in proto.Beacon.to_wire(disco.make_beacon())
