"""identity: created once (0600), reused, never silently replaced."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from vesta import crypto
from vesta.errors import ConfigError, IdentityError
from vesta.identity import atomic_write, identity_path, load_or_create


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_created_once_with_mode_0600_and_reused(tmp_path: Path) -> None:
    first = load_or_create(tmp_path, "desk")
    path = identity_path(tmp_path, "desk")
    assert first.path == path and path.is_file()
    assert _mode(path) == 0o600
    before = path.read_bytes()
    second = load_or_create(tmp_path, "desk")
    assert second.fingerprint == first.fingerprint
    assert second.public_key == first.public_key
    assert bytes(second.signing_key) == bytes(first.signing_key)
    assert path.read_bytes() == before  # loading does not rewrite the file


def test_file_holds_seed_public_and_fingerprint(tmp_path: Path) -> None:
    ident = load_or_create(tmp_path, "desk")
    body = json.loads(ident.path.read_text())
    assert {"seed", "public", "fingerprint"} <= set(body)
    key = SigningKey(bytes.fromhex(body["seed"]))
    assert body["public"] == bytes(key.verify_key).hex() == ident.public_key.hex()
    assert body["fingerprint"] == crypto.fingerprint(ident.public_key) == ident.fingerprint
    assert len(ident.fingerprint) == 32


def test_signing_key_matches_public_key(tmp_path: Path) -> None:
    ident = load_or_create(tmp_path, "desk")
    sig = ident.signing_key.sign(b"msg").signature
    crypto.verify_signature(ident.public_key, b"msg", sig)


def test_repr_has_no_secret(tmp_path: Path) -> None:
    ident = load_or_create(tmp_path, "desk")
    seed_hex = bytes(ident.signing_key).hex()
    assert seed_hex not in repr(ident) and seed_hex not in str(ident)
    assert ident.fingerprint in repr(ident)


def test_each_node_name_has_its_own_identity(tmp_path: Path) -> None:
    a = load_or_create(tmp_path, "a")
    b = load_or_create(tmp_path, "b")
    assert a.path != b.path
    assert a.fingerprint != b.fingerprint


def test_loose_mode_is_tightened(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = load_or_create(tmp_path, "desk")
    os.chmod(first.path, 0o644)
    with caplog.at_level(logging.WARNING, logger="vesta.identity"):
        again = load_or_create(tmp_path, "desk")
    assert _mode(first.path) == 0o600
    assert again.fingerprint == first.fingerprint
    assert any("0600" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "content",
    ["{not json", "", "[]", '"seed"', "null", '{"public": "00"}', '{"seed": "zz"}', '{"seed": "00ff"}',
     '{"seed": 12345}'],
    ids=["bad-json", "empty", "list", "string", "null", "no-seed", "non-hex", "short-seed", "int-seed"],
)
def test_corrupt_file_is_identity_error_naming_the_file_and_the_fix(tmp_path: Path, content: str) -> None:
    path = identity_path(tmp_path, "desk")
    path.write_text(content)
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError) as info:
        load_or_create(tmp_path, "desk")
    message = str(info.value)
    assert str(path) in message
    assert "restore" in message and "delete" in message
    assert "\n" not in message
    assert path.read_text() == content  # never replaced silently
    assert isinstance(info.value, ConfigError)  # so the CLI exits 2


def test_inconsistent_public_key_is_identity_error(tmp_path: Path) -> None:
    ident = load_or_create(tmp_path, "desk")
    body = json.loads(ident.path.read_text())
    body["public"] = bytes(SigningKey.generate().verify_key).hex()
    ident.path.write_text(json.dumps(body))
    with pytest.raises(IdentityError, match="inconsistent") as info:
        load_or_create(tmp_path, "desk")
    assert str(ident.path) in str(info.value)


def test_missing_public_key_is_derived_from_the_seed(tmp_path: Path) -> None:
    ident = load_or_create(tmp_path, "desk")
    body = json.loads(ident.path.read_text())
    del body["public"]
    ident.path.write_text(json.dumps(body))
    assert load_or_create(tmp_path, "desk").fingerprint == ident.fingerprint


def test_state_dir_is_created_if_missing(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "er" / "state"
    ident = load_or_create(state, "desk")
    assert state.is_dir()
    assert _mode(state) & 0o077 == 0
    assert ident.path.parent == state


def test_state_dir_that_cannot_be_created_is_identity_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    with pytest.raises(IdentityError, match="state directory"):
        load_or_create(blocker / "state", "desk")


def test_identity_path_that_is_a_directory_is_identity_error(tmp_path: Path) -> None:
    identity_path(tmp_path, "desk").mkdir()
    with pytest.raises(IdentityError, match="cannot read"):
        load_or_create(tmp_path, "desk")


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, b"one")
    atomic_write(target, b"two, longer")
    assert target.read_bytes() == b"two, longer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert _mode(target) == 0o600


def test_atomic_write_sets_the_mode_exactly(tmp_path: Path) -> None:
    target = tmp_path / "public.json"
    target.write_bytes(b"old")
    os.chmod(target, 0o666)
    atomic_write(target, b"new", mode=0o640)
    assert _mode(target) == 0o640
    assert target.read_bytes() == b"new"


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, b"old")
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # the temp file is cleaned up


def test_atomic_write_survives_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def short_write(fd: int, data: bytes) -> int:
        return real_write(fd, bytes(data[:3]))  # the kernel may accept fewer bytes than asked

    monkeypatch.setattr(os, "write", short_write)
    target = tmp_path / "state.json"
    atomic_write(target, b"0123456789" * 10)
    monkeypatch.undo()
    assert target.read_bytes() == b"0123456789" * 10
