"""crypto: key derivation, sealed beacons, signatures, and the handshake state machine (no sockets)."""

from __future__ import annotations

import os

import msgpack
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl.signing import SigningKey

from vesta import crypto
from vesta.crypto import FederationKeys, Handshake, LinkCipher, Session
from vesta.errors import AuthError, ProtocolError

SECRET = "correct horse battery staple, federation one"
OTHER_SECRET = "a different federation entirely, two"


@pytest.fixture(scope="module")
def keys() -> FederationKeys:
    return crypto.derive_keys(SECRET)


@pytest.fixture(scope="module")
def other_keys() -> FederationKeys:
    return crypto.derive_keys(OTHER_SECRET)


@pytest.fixture
def signer() -> SigningKey:
    return SigningKey.generate()


# ---------------------------------------------------------------- keys


def test_derive_keys_is_deterministic(keys: FederationKeys) -> None:
    again = crypto.derive_keys(SECRET)
    assert again == keys
    assert again.beacon_key == keys.beacon_key and again.handshake_key == keys.handshake_key


def test_sub_keys_have_the_documented_shape(keys: FederationKeys) -> None:
    assert len(keys.beacon_key) == 32 and len(keys.handshake_key) == 32
    assert keys.beacon_key != keys.handshake_key
    assert len(keys.key_id) == 8 and int(keys.key_id, 16) >= 0
    assert keys.key_id.encode() not in keys.beacon_key + keys.handshake_key


def test_different_secrets_give_different_keys(keys: FederationKeys, other_keys: FederationKeys) -> None:
    assert other_keys.beacon_key != keys.beacon_key
    assert other_keys.handshake_key != keys.handshake_key
    assert other_keys.key_id != keys.key_id


def test_repr_has_no_key_material(keys: FederationKeys) -> None:
    text = repr(keys) + str(keys) + f"{keys}"
    assert keys.key_id in text
    for secret in (keys.beacon_key, keys.handshake_key):
        assert secret.hex() not in text
        assert repr(secret) not in text
    assert SECRET not in text


def test_fingerprint_is_32_hex_chars_of_sha256(signer: SigningKey) -> None:
    pub = bytes(signer.verify_key)
    fp = crypto.fingerprint(pub)
    assert len(fp) == 32 and int(fp, 16) >= 0 and fp == fp.lower()
    assert fp != crypto.fingerprint(bytes(SigningKey.generate().verify_key))


# ---------------------------------------------------------------- sealed beacons


MESSAGE = b"an encoded beacon message"


def test_seal_open_round_trip(keys: FederationKeys, signer: SigningKey) -> None:
    datagram = crypto.seal_beacon(keys, signer, MESSAGE)
    assert datagram[:2] == b"V\x01"
    assert MESSAGE not in datagram
    message, signature = crypto.open_beacon(keys, datagram)
    assert message == MESSAGE
    crypto.verify_signature(bytes(signer.verify_key), message, signature)


def test_seal_uses_a_fresh_nonce(keys: FederationKeys, signer: SigningKey) -> None:
    a = crypto.seal_beacon(keys, signer, MESSAGE)
    b = crypto.seal_beacon(keys, signer, MESSAGE)
    assert a[2:14] != b[2:14] and a != b


def test_wrong_key_is_auth_error(keys: FederationKeys, other_keys: FederationKeys, signer: SigningKey) -> None:
    datagram = crypto.seal_beacon(other_keys, signer, MESSAGE)
    with pytest.raises(AuthError):
        crypto.open_beacon(keys, datagram)


def test_every_single_bit_flip_is_rejected(keys: FederationKeys, signer: SigningKey) -> None:
    datagram = crypto.seal_beacon(keys, signer, MESSAGE)
    for i in range(len(datagram)):
        for bit in range(8):
            bad = bytearray(datagram)
            bad[i] ^= 1 << bit
            with pytest.raises(ProtocolError) as info:
                crypto.open_beacon(keys, bytes(bad))
            if i < 2:
                assert "header" in str(info.value), (i, bit)
            else:
                assert isinstance(info.value, AuthError), (i, bit)


def test_every_truncation_is_rejected(keys: FederationKeys, signer: SigningKey) -> None:
    datagram = crypto.seal_beacon(keys, signer, MESSAGE)
    minimum = 2 + crypto.NONCE_SIZE + crypto.TAG_SIZE
    for n in range(len(datagram)):
        with pytest.raises(ProtocolError) as info:
            crypto.open_beacon(keys, datagram[:n])
        if n < minimum:
            assert "too short" in str(info.value)
    with pytest.raises(ProtocolError):
        crypto.open_beacon(keys, datagram + b"\x00")


@pytest.mark.parametrize("header", [b"X\x01", b"V\x02", b"v\x01", b"\x00\x00"])
def test_bad_header(keys: FederationKeys, signer: SigningKey, header: bytes) -> None:
    datagram = crypto.seal_beacon(keys, signer, MESSAGE)
    with pytest.raises(ProtocolError, match="header"):
        crypto.open_beacon(keys, header + datagram[2:])


def _seal_raw(keys: FederationKeys, plaintext: bytes) -> bytes:
    """A datagram sealed with the right key around arbitrary plaintext (a key holder misbehaving)."""
    header = b"V\x01"
    nonce = os.urandom(12)
    return header + nonce + AESGCM(keys.beacon_key).encrypt(nonce, plaintext, b"vesta-beacon" + header)


@pytest.mark.parametrize(
    "inner",
    [
        b"\xc1garbage",
        msgpack.packb(5),
        msgpack.packb([b"msg"]),
        msgpack.packb([b"msg", b"s" * 64, b"extra"]),
        msgpack.packb(["msg", b"s" * 64]),
        msgpack.packb([b"msg", b"s" * 63]),
        msgpack.packb([b"msg", "s" * 64]),
        msgpack.packb({"a": 1, "b": 2}),
    ],
)
def test_authentic_but_malformed_envelope_is_protocol_error(keys: FederationKeys, inner: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        crypto.open_beacon(keys, _seal_raw(keys, inner))
    assert not isinstance(info.value, AuthError)


def test_verify_signature(signer: SigningKey) -> None:
    pub = bytes(signer.verify_key)
    sig = signer.sign(MESSAGE).signature
    crypto.verify_signature(pub, MESSAGE, sig)  # no exception
    with pytest.raises(AuthError):
        crypto.verify_signature(pub, MESSAGE + b"!", sig)
    with pytest.raises(AuthError):
        crypto.verify_signature(pub, MESSAGE, bytes([sig[0] ^ 1]) + sig[1:])
    with pytest.raises(AuthError):
        crypto.verify_signature(bytes(SigningKey.generate().verify_key), MESSAGE, sig)


@pytest.mark.parametrize(("pub_len", "sig_len"), [(31, 64), (33, 64), (0, 64), (32, 63), (32, 0)])
def test_verify_signature_malformed_inputs_are_auth_errors(signer: SigningKey, pub_len: int, sig_len: int) -> None:
    pub = bytes(signer.verify_key)[:pub_len].ljust(pub_len, b"\x00")
    sig = signer.sign(MESSAGE).signature[:sig_len]
    with pytest.raises(AuthError):
        crypto.verify_signature(pub, MESSAGE, sig)


# ---------------------------------------------------------------- handshake


class Run:
    """One handshake driven by hand, recording every frame as an on-path observer would."""

    def __init__(self, i_keys: FederationKeys, r_keys: FederationKeys | None = None) -> None:
        self.i_signer, self.r_signer = SigningKey.generate(), SigningKey.generate()
        self.i = Handshake(i_keys, self.i_signer, initiator=True)
        self.r = Handshake(r_keys or i_keys, self.r_signer, initiator=False)
        self.hello_i = self.i.hello()
        self.hello_r = b""
        self.auth_i = b""
        self.auth_r = b""

    def complete(self) -> tuple[Session, Session]:
        self.r.read_hello(self.hello_i)
        self.hello_r = self.r.hello()
        self.i.read_hello(self.hello_r)
        self.auth_i, i_send = self.i.auth()
        self.auth_r, r_send = self.r.auth()
        r_session = self.r.read_auth(self.auth_i, r_send)
        i_session = self.i.read_auth(self.auth_r, i_send)
        return i_session, r_session


def test_handshake_gives_interoperating_sessions(keys: FederationKeys) -> None:
    run = Run(keys)
    i_sess, r_sess = run.complete()
    for n in range(3):
        assert r_sess.recv.open(i_sess.send.seal(b"to responder %d" % n)) == b"to responder %d" % n
        assert i_sess.recv.open(r_sess.send.seal(b"to initiator %d" % n)) == b"to initiator %d" % n


def test_each_side_learns_the_others_fingerprint(keys: FederationKeys) -> None:
    run = Run(keys)
    i_sess, r_sess = run.complete()
    r_pub, i_pub = bytes(run.r_signer.verify_key), bytes(run.i_signer.verify_key)
    assert i_sess.peer_pubkey == r_pub and r_sess.peer_pubkey == i_pub
    assert i_sess.peer_fingerprint == crypto.fingerprint(r_pub)
    assert r_sess.peer_fingerprint == crypto.fingerprint(i_pub)
    assert i_sess.peer_fingerprint != r_sess.peer_fingerprint


def test_hellos_do_not_reveal_identities(keys: FederationKeys) -> None:
    run = Run(keys)
    run.complete()
    for pub in (bytes(run.i_signer.verify_key), bytes(run.r_signer.verify_key)):
        assert pub not in run.hello_i + run.hello_r + run.auth_i + run.auth_r


def test_two_handshakes_use_different_link_keys(keys: FederationKeys) -> None:
    first, _ = Run(keys).complete()
    _, second_r = Run(keys).complete()
    frame = first.send.seal(b"hello")
    with pytest.raises(AuthError):
        second_r.recv.open(frame)


def test_wrong_federation_key_fails_at_read_hello(keys: FederationKeys, other_keys: FederationKeys) -> None:
    run = Run(keys, other_keys)
    with pytest.raises(AuthError):
        run.r.read_hello(run.hello_i)
    # And the other way round: an initiator with the right key cannot read a wrong-key responder.
    r_wrong = Handshake(other_keys, SigningKey.generate(), initiator=False)
    with pytest.raises(AuthError):
        run.i.read_hello(r_wrong.hello())


def test_a_hello_cannot_be_reflected_back_to_its_sender(keys: FederationKeys) -> None:
    run = Run(keys)
    with pytest.raises(AuthError):
        run.i.read_hello(run.hello_i)


@pytest.mark.parametrize("pos", [0, 11, 12, 20, -1])
def test_tampered_hello_is_auth_error(keys: FederationKeys, pos: int) -> None:
    run = Run(keys)
    bad = bytearray(run.hello_i)
    bad[pos] ^= 0x01
    with pytest.raises(AuthError):
        run.r.read_hello(bytes(bad))


def test_short_hello_is_protocol_error(keys: FederationKeys) -> None:
    run = Run(keys)
    with pytest.raises(ProtocolError):
        run.r.read_hello(run.hello_i[:27])
    with pytest.raises(ProtocolError):
        run.r.read_hello(b"")


def _hello_from_key_holder(keys: FederationKeys, body: object, role: bytes = b"I") -> bytes:
    """A hello sealed with the right federation key around arbitrary content."""
    nonce = os.urandom(12)
    plain = msgpack.packb(body, use_bin_type=True)
    return nonce + AESGCM(keys.handshake_key).encrypt(nonce, plain, b"vesta-hello-" + role)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"v": 2, "eph": b"e" * 32, "id": b"i" * 32}, ProtocolError),
        ({"v": 1, "eph": b"e" * 31, "id": b"i" * 32}, ProtocolError),
        ({"v": 1, "eph": b"e" * 32, "id": "i" * 32}, ProtocolError),
        ({"v": 1, "eph": b"e" * 32}, ProtocolError),
        ([1, b"e" * 32, b"i" * 32], ProtocolError),
        ("hello", ProtocolError),
        ({"v": 1, "eph": b"\x00" * 32, "id": b"i" * 32}, AuthError),  # low-order point: all-zero shared secret
    ],
    ids=["version", "short-eph", "str-id", "no-id", "list", "str", "zero-eph"],
)
def test_malformed_hello_from_a_key_holder(keys: FederationKeys, body: object, error: type[Exception]) -> None:
    r = Handshake(keys, SigningKey.generate(), initiator=False)
    with pytest.raises(error):
        r.read_hello(_hello_from_key_holder(keys, body))


def test_tampered_auth_is_auth_error(keys: FederationKeys) -> None:
    run = Run(keys)
    run.r.read_hello(run.hello_i)
    run.i.read_hello(run.r.hello())
    auth_i, _ = run.i.auth()
    _, r_send = run.r.auth()
    for pos in (0, len(auth_i) // 2, len(auth_i) - 1):
        bad = bytearray(auth_i)
        bad[pos] ^= 0x80
        with pytest.raises(AuthError):
            run.r.read_auth(bytes(bad), r_send)
    # The untouched frame still completes, so the failures above were the tampering.
    assert run.r.read_auth(auth_i, r_send).peer_fingerprint == crypto.fingerprint(bytes(run.i_signer.verify_key))


def test_auth_before_hello_is_refused(keys: FederationKeys) -> None:
    h = Handshake(keys, SigningKey.generate(), initiator=True)
    with pytest.raises(ProtocolError):
        h.auth()
    with pytest.raises(ProtocolError):
        h.read_auth(b"x" * 80, LinkCipher(b"k" * 32))


def test_replayed_handshake_cannot_complete(keys: FederationKeys) -> None:
    """An attacker who recorded a whole earlier handshake replays it to the responder."""
    old = Run(keys)
    old.complete()
    # The old hello still opens (it is authentic), so the new responder answers it...
    r2 = Handshake(keys, SigningKey.generate(), initiator=False)
    r2.read_hello(old.hello_i)
    r2.hello()
    _, r2_send = r2.auth()
    # ...but the attacker has no valid auth for the new ephemeral key: the old one fails.
    with pytest.raises(AuthError):
        r2.read_auth(old.auth_i, r2_send)


def test_replayed_hello_to_the_same_responder_identity_cannot_complete(keys: FederationKeys) -> None:
    old = Run(keys)
    old.complete()
    r2 = Handshake(keys, old.r_signer, initiator=False)  # the very same responder, restarted
    r2.read_hello(old.hello_i)
    r2.hello()
    _, r2_send = r2.auth()
    with pytest.raises(AuthError):
        r2.read_auth(old.auth_i, r2_send)


def test_a_key_holder_cannot_impersonate_another_node(keys: FederationKeys) -> None:
    """Knowing the federation key is not enough to claim someone else's identity in a hello."""
    victim = SigningKey.generate()
    mallory = Handshake(keys, SigningKey.generate(), initiator=False)
    # Mallory claims the victim's public key but can only sign with her own.
    mallory._own_hello = msgpack.packb(  # private on purpose: forging the hello is the point
        {"v": 1, "eph": mallory._eph.public_key().public_bytes_raw(), "id": bytes(victim.verify_key)},
        use_bin_type=True,
    )
    i = Handshake(keys, SigningKey.generate(), initiator=True)
    mallory.read_hello(i.hello())
    i.read_hello(mallory.hello())
    _, i_send = i.auth()
    forged_auth, _ = mallory.auth()
    with pytest.raises(AuthError):
        i.read_auth(forged_auth, i_send)


# ---------------------------------------------------------------- link cipher


def test_link_cipher_counter_nonces_in_order() -> None:
    key = os.urandom(32)
    tx, rx = LinkCipher(key), LinkCipher(key)
    frames = [tx.seal(b"frame %d" % n) for n in range(5)]
    assert len(set(frames)) == 5
    assert [rx.open(f) for f in frames] == [b"frame %d" % n for n in range(5)]


def test_same_plaintext_seals_differently_each_time() -> None:
    tx = LinkCipher(os.urandom(32))
    assert tx.seal(b"same") != tx.seal(b"same")


def test_replayed_frame_fails() -> None:
    key = os.urandom(32)
    tx, rx = LinkCipher(key), LinkCipher(key)
    f0 = tx.seal(b"pay 1 core")
    assert rx.open(f0) == b"pay 1 core"
    with pytest.raises(AuthError):
        rx.open(f0)


def test_reordered_or_dropped_frame_fails() -> None:
    key = os.urandom(32)
    tx = LinkCipher(key)
    f0, f1 = tx.seal(b"first"), tx.seal(b"second")
    with pytest.raises(AuthError):
        LinkCipher(key).open(f1)  # f0 was dropped or comes later
    rx = LinkCipher(key)
    assert rx.open(f0) == b"first"
    assert rx.open(f1) == b"second"


def test_tampered_link_frame_fails() -> None:
    key = os.urandom(32)
    frame = LinkCipher(key).seal(b"payload")
    for pos in range(len(frame)):
        bad = bytearray(frame)
        bad[pos] ^= 0x04
        with pytest.raises(AuthError):
            LinkCipher(key).open(bytes(bad))


def test_directions_use_different_keys(keys: FederationKeys) -> None:
    i_sess, r_sess = Run(keys).complete()
    # Both directions have sent and received exactly one frame (the auth), so counters agree:
    # a failure below can only come from the key.
    frame = i_sess.send.seal(b"initiator to responder")
    with pytest.raises(AuthError):
        i_sess.recv.open(frame)  # reflected back to the initiator as if it came from the responder
    frame = r_sess.send.seal(b"responder to initiator")
    with pytest.raises(AuthError):
        r_sess.recv.open(frame)
