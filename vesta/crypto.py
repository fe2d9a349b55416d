"""Federation keys, sealed beacons, and the authenticated peer-link handshake.

Keys (once at start-up)::

    master        = scrypt(federation key, salt="vesta-federation-v1", n=2^15, r=8, p=1)
    beacon_key    = HKDF-SHA256(master, info="vesta beacon v1")        (32 bytes)
    handshake_key = HKDF-SHA256(master, info="vesta handshake v1")     (32 bytes)
    key_id        = HKDF-SHA256(master, info="vesta key id v1")[:4]    (shown, never secret)

Sealed beacon (one UDP datagram)::

    +-----+-----+------------+---------------------------------+---------+
    | 'V' | ver | nonce (12) | AES-256-GCM ciphertext          | tag(16) |
    +-----+-----+------------+---------------------------------+---------+
    associated data = b"vesta-beacon" + the two header bytes; nonce random.
    plaintext = msgpack([message, Ed25519 signature of message])

Sealed membership packet (one UDP datagram, at most MAX_MEMBER_DATAGRAM bytes)::

    +-----+-----+------------+---------------------------------+---------+
    | 'M' | ver | nonce (12) | AES-256-GCM ciphertext          | tag(16) |
    +-----+-----+------------+---------------------------------+---------+
    associated data = b"vesta-member" + the two header bytes; beacon key; nonce random.
    plaintext = msgpack([msgpack([sender's Ed25519 public key, body]), Ed25519 signature of it])

    The size is checked before decrypting; the receiver checks the key against the fingerprint the body
    names, and whatever the body says only after the signature.

Peer-link handshake (I = initiator, R = responder; every frame length-prefixed)::

    I -> R  hello_I = nonce(12) | GCM(handshake_key, AD "vesta-hello-I", {v, eph_I, id_I})
    R -> I  hello_R = nonce(12) | GCM(handshake_key, AD "vesta-hello-R", {v, eph_R, id_R})
    both    th = SHA-256(hello_I plaintext | hello_R plaintext)
            k_IR | k_RI = HKDF-SHA256(X25519(eph, eph_peer), salt=handshake_key,
                                      info="vesta link v1" | th, 64 bytes)
    I -> R  seal_IR(sign_I("vesta-auth-I" | th))       counter 0 of I->R
    R -> I  seal_RI(sign_R("vesta-auth-R" | th))       counter 0 of R->I

Only holders of the federation key can open a hello or derive the link keys
(wrong key => AuthError on the first frame); the signatures bind both Ed25519
identities to this connection's fresh X25519 keys (forward secrecy).

Link frame: AES-256-GCM with nonce = 4 zero bytes | 8-byte big-endian counter,
one key and one counter per direction; the receiver expects the exact next
counter, so a replayed, dropped or reordered frame fails to open.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from nacl.exceptions import CryptoError
from nacl.signing import SigningKey, VerifyKey

from vesta.errors import AuthError, ProtocolError

CRYPTO_VERSION = 1
_SCRYPT_SALT = b"vesta-federation-v1"
_SCRYPT_N = 1 << 15          # ~32 MiB and ~0.1 s on a desktop, under a second on a Pi
NONCE_SIZE = 12
TAG_SIZE = 16
SIG_SIZE = 64
_BEACON_HEADER = bytes([ord("V"), CRYPTO_VERSION])
_BEACON_AD = b"vesta-beacon" + _BEACON_HEADER
MAX_COUNTER = (1 << 64) - 1


def fingerprint(public_key: bytes) -> str:
    """A node's stable id: the first 16 bytes of SHA-256 of its Ed25519 public key, hex."""
    return hashlib.sha256(public_key).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class FederationKeys:
    """Sub-keys derived from the federation key."""

    beacon_key: bytes
    handshake_key: bytes
    key_id: str       # 8 hex chars: lets two owners compare keys without revealing them

    def __repr__(self) -> str:  # never print key material
        return f"FederationKeys(key_id={self.key_id!r})"


def _hkdf(ikm: bytes, info: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def derive_keys(secret: str) -> FederationKeys:
    """Stretch the shared secret once (slow on purpose) and split it into sub-keys."""
    master = Scrypt(salt=_SCRYPT_SALT, length=32, n=_SCRYPT_N, r=8, p=1).derive(secret.encode())
    return FederationKeys(
        beacon_key=_hkdf(master, b"vesta beacon v1"),
        handshake_key=_hkdf(master, b"vesta handshake v1"),
        key_id=_hkdf(master, b"vesta key id v1", 4).hex(),
    )


# ---------------------------------------------------------------- beacons


def seal_beacon(keys: FederationKeys, signer: SigningKey, message: bytes) -> bytes:
    """Sign then encrypt one beacon message into a datagram."""
    plaintext = msgpack.packb([message, signer.sign(message).signature], use_bin_type=True)
    nonce = os.urandom(NONCE_SIZE)
    return _BEACON_HEADER + nonce + AESGCM(keys.beacon_key).encrypt(nonce, plaintext, _BEACON_AD)


def open_beacon(keys: FederationKeys, datagram: bytes) -> tuple[bytes, bytes]:
    """Decrypt a datagram into (message, signature); the caller verifies the signature."""
    if len(datagram) < len(_BEACON_HEADER) + NONCE_SIZE + TAG_SIZE:
        raise ProtocolError(f"datagram too short ({len(datagram)} bytes)")
    if datagram[:2] != _BEACON_HEADER:
        raise ProtocolError("not a vesta beacon (bad header)")
    nonce = datagram[2 : 2 + NONCE_SIZE]
    try:
        plaintext = AESGCM(keys.beacon_key).decrypt(nonce, datagram[2 + NONCE_SIZE :], _BEACON_AD)
    except InvalidTag as exc:
        raise AuthError("beacon failed authentication (wrong federation key?)") from exc
    try:
        message, signature = msgpack.unpackb(plaintext, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"undecodable beacon envelope: {exc}") from exc
    if not isinstance(message, bytes) or not isinstance(signature, bytes) or len(signature) != SIG_SIZE:
        raise ProtocolError("beacon envelope must be [bytes, 64-byte signature]")
    return message, signature


MAX_MEMBER_DATAGRAM = 1400   # bytes: one unfragmented datagram on any usual link
_MEMBER_HEADER = bytes([ord("M"), CRYPTO_VERSION])
_MEMBER_AD = b"vesta-member" + _MEMBER_HEADER


def seal_member_packet(keys: FederationKeys, signer: SigningKey, body: bytes) -> bytes:
    """Sign and encrypt one membership packet body (see ``vesta.membership``) into a datagram."""
    message = msgpack.packb([bytes(signer.verify_key), body], use_bin_type=True)
    plaintext = msgpack.packb([message, signer.sign(message).signature], use_bin_type=True)
    nonce = os.urandom(NONCE_SIZE)
    return _MEMBER_HEADER + nonce + AESGCM(keys.beacon_key).encrypt(nonce, plaintext, _MEMBER_AD)


def open_member_packet(keys: FederationKeys, datagram: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """Decrypt a membership datagram into (public key, body, signed message, signature); the signature is
    not checked here, so a caller can drop what it would drop anyway before paying for it."""
    if len(datagram) > MAX_MEMBER_DATAGRAM:
        raise ProtocolError(f"membership datagram of {len(datagram)} bytes exceeds {MAX_MEMBER_DATAGRAM}")
    if len(datagram) < len(_MEMBER_HEADER) + NONCE_SIZE + TAG_SIZE:
        raise ProtocolError(f"datagram too short ({len(datagram)} bytes)")
    if datagram[:1] == _MEMBER_HEADER[:1] and datagram[1:2] != _MEMBER_HEADER[1:]:
        raise ProtocolError(f"membership packet of version {datagram[1]}, this node speaks {CRYPTO_VERSION}: run the "
                            "same vesta version on both")
    if datagram[:2] != _MEMBER_HEADER:
        raise ProtocolError("not a vesta membership packet (bad header)")
    nonce = datagram[2 : 2 + NONCE_SIZE]
    try:
        plaintext = AESGCM(keys.beacon_key).decrypt(nonce, datagram[2 + NONCE_SIZE :], _MEMBER_AD)
    except InvalidTag as exc:
        raise AuthError("membership packet failed authentication (wrong federation key?)") from exc
    try:
        message, signature = msgpack.unpackb(plaintext, raw=False)
        pubkey, body = msgpack.unpackb(message, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"undecodable membership envelope: {exc}") from exc
    if not (isinstance(signature, bytes) and len(signature) == SIG_SIZE and isinstance(pubkey, bytes)
            and len(pubkey) == 32 and isinstance(body, bytes)):
        raise ProtocolError("membership envelope must be [[32-byte key, body], 64-byte signature]")
    return pubkey, body, message, signature


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Raise AuthError unless ``signature`` is the holder of ``public_key`` signing ``message``."""
    try:
        VerifyKey(public_key).verify(message, signature)
    except (CryptoError, ValueError, TypeError) as exc:
        raise AuthError("bad Ed25519 signature") from exc


# ---------------------------------------------------------------- link


class LinkCipher:
    """One direction of a peer link: AES-256-GCM with a counter nonce."""

    __slots__ = ("_aead", "_counter")

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._counter = 0

    def _next_nonce(self) -> bytes:
        if self._counter > MAX_COUNTER:
            raise AuthError("link counter exhausted; reconnect")
        nonce = struct.pack(">IQ", 0, self._counter)
        self._counter += 1
        return nonce

    def seal(self, plaintext: bytes) -> bytes:
        return self._aead.encrypt(self._next_nonce(), plaintext, None)

    def open(self, ciphertext: bytes) -> bytes:
        try:
            return self._aead.decrypt(self._next_nonce(), ciphertext, None)
        except InvalidTag as exc:
            raise AuthError("link frame failed authentication") from exc


@dataclass(slots=True)
class Session:
    """The outcome of a handshake: two ciphers and the authenticated peer."""

    send: LinkCipher
    recv: LinkCipher
    peer_pubkey: bytes
    peer_fingerprint: str


class Handshake:
    """Pure handshake state machine; ``wire.handshake`` drives it over a stream."""

    def __init__(self, keys: FederationKeys, signer: SigningKey, *, initiator: bool) -> None:
        self._keys = keys
        self._signer = signer
        self._initiator = initiator
        self._eph = X25519PrivateKey.generate()
        self._own_hello = msgpack.packb(
            {
                "v": CRYPTO_VERSION,
                "eph": self._eph.public_key().public_bytes_raw(),
                "id": bytes(signer.verify_key),
            },
            use_bin_type=True,
        )
        self._peer_id: bytes | None = None
        self._k_send: bytes | None = None
        self._k_recv: bytes | None = None
        self._transcript = b""

    @property
    def _role(self) -> bytes:
        return b"I" if self._initiator else b"R"

    @property
    def _peer_role(self) -> bytes:
        return b"R" if self._initiator else b"I"

    def hello(self) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        ad = b"vesta-hello-" + self._role
        return nonce + AESGCM(self._keys.handshake_key).encrypt(nonce, self._own_hello, ad)

    def read_hello(self, frame: bytes) -> None:
        if len(frame) < NONCE_SIZE + TAG_SIZE:
            raise ProtocolError("handshake hello too short")
        ad = b"vesta-hello-" + self._peer_role
        try:
            plain = AESGCM(self._keys.handshake_key).decrypt(frame[:NONCE_SIZE], frame[NONCE_SIZE:], ad)
        except InvalidTag as exc:
            raise AuthError("handshake hello failed authentication (wrong federation key?)") from exc
        try:
            body = msgpack.unpackb(plain, raw=False)
            version, eph, ident = body["v"], body["eph"], body["id"]
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            raise ProtocolError(f"malformed handshake hello: {exc}") from exc
        if version != CRYPTO_VERSION:
            raise ProtocolError(f"unsupported handshake version {version!r}")
        if not (isinstance(eph, bytes) and len(eph) == 32 and isinstance(ident, bytes) and len(ident) == 32):
            raise ProtocolError("handshake hello keys must be 32 bytes each")
        self._peer_id = ident
        first, second = (self._own_hello, plain) if self._initiator else (plain, self._own_hello)
        self._transcript = hashlib.sha256(first + second).digest()
        try:
            shared = self._eph.exchange(X25519PublicKey.from_public_bytes(eph))
        except ValueError as exc:  # all-zero shared secret from a low-order point
            raise AuthError("handshake: invalid ephemeral key") from exc
        okm = _hkdf(shared, b"vesta link v1" + self._transcript, 64, salt=self._keys.handshake_key)
        k_ir, k_ri = okm[:32], okm[32:]
        self._k_send, self._k_recv = (k_ir, k_ri) if self._initiator else (k_ri, k_ir)

    def auth(self) -> tuple[bytes, LinkCipher]:
        """Our signed proof, sealed as the first frame of our direction; returns the send cipher too."""
        if self._k_send is None:
            raise ProtocolError("handshake: auth before hello")
        send = LinkCipher(self._k_send)
        proof = self._signer.sign(b"vesta-auth-" + self._role + self._transcript).signature
        return send.seal(proof), send

    def read_auth(self, frame: bytes, send: LinkCipher) -> Session:
        if self._k_recv is None or self._peer_id is None:
            raise ProtocolError("handshake: auth before hello")
        recv = LinkCipher(self._k_recv)
        proof = recv.open(frame)
        verify_signature(self._peer_id, b"vesta-auth-" + self._peer_role + self._transcript, proof)
        return Session(send=send, recv=recv, peer_pubkey=self._peer_id,
                       peer_fingerprint=fingerprint(self._peer_id))
