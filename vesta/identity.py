"""The node's Ed25519 identity: created once, kept in the state directory (mode 0600).

The ledger and the records key peers by fingerprint, so the identity file is
never replaced silently: a corrupt file is an error the owner resolves.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey

from vesta.crypto import fingerprint
from vesta.errors import IdentityError

log = logging.getLogger(__name__)

IDENTITY_VERSION = 1


@dataclass(frozen=True, slots=True)
class Identity:
    signing_key: SigningKey
    public_key: bytes
    fingerprint: str
    path: Path

    def __repr__(self) -> str:
        return f"Identity(fingerprint={self.fingerprint!r}, path={str(self.path)!r})"


def identity_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"vestad-identity-{name}.json"


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write, fsync, rename: the file is either the old one or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:  # os.write may write less than asked (full disk, signals)
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a half-written temp file behind
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_or_create(state_dir: Path, name: str) -> Identity:
    """Load this node's identity, creating it on first start."""
    path = identity_path(state_dir, name)
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise IdentityError(f"cannot create state directory {state_dir}: {exc.strerror}: "
                            "choose another with -state-dir") from exc
    if not path.exists():
        key = SigningKey.generate()
        body = {
            "version": IDENTITY_VERSION,
            "name": name,
            "seed": bytes(key).hex(),
            "public": bytes(key.verify_key).hex(),
            "fingerprint": fingerprint(bytes(key.verify_key)),
        }
        try:
            atomic_write(path, json.dumps(body, indent=2).encode() + b"\n")
        except OSError as exc:
            raise IdentityError(f"cannot write identity file {path}: {exc.strerror}") from exc
        log.info("created node identity %s fingerprint=%s", path, body["fingerprint"])
        return Identity(key, bytes(key.verify_key), str(body["fingerprint"]), path)
    return _load(path)


def _load(path: Path) -> Identity:
    fix = "restore it from a backup, or delete it to start as a new node (peers will see a new fingerprint)"
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("identity file %s had mode %o; tightening to 0600", path, mode)
            os.chmod(path, 0o600)
        body = json.loads(path.read_text())
        key = SigningKey(bytes.fromhex(body["seed"]))
    except OSError as exc:
        raise IdentityError(f"cannot read identity file {path}: {exc.strerror}") from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise IdentityError(f"identity file {path} is corrupt: {fix}") from exc
    public = bytes(key.verify_key)
    if body.get("public") not in (None, public.hex()):
        raise IdentityError(f"identity file {path} is inconsistent (public key does not match seed): {fix}")
    return Identity(key, public, fingerprint(public), path)
