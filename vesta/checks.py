"""Field checks for everything that arrives from outside (a peer's message, a control request, a config).

Each returns the value when it is acceptable and raises ``exc`` (ProtocolError unless the caller names
another class) with a one-line message naming the field otherwise. Limits are checked before anything
is built from the value.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, fields
from typing import Any

from vesta.errors import ProtocolError, VestaError

MAX_FRAME = 16 * 1024 * 1024      # bytes of one length-prefixed frame (peer link, control socket)
MAX_PATH = 1024                   # bytes of a relative file path (inputs, artifacts)
MAX_PATH_DEPTH = 32
FINGERPRINT_HEX = 32              # 16 bytes of SHA-256(public key), hex
MAX_NAME = 32

_JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HEX_RE = re.compile(r"^[0-9a-f]+$")

Exc = type[VestaError]


def check_str(where: str, value: object, max_len: int, *, empty: bool = True, exc: Exc = ProtocolError) -> str:
    if not isinstance(value, str):
        raise exc(f"{where} must be a string, got {type(value).__name__}")
    if len(value) > max_len or (not empty and not value):
        raise exc(f"{where} has bad length {len(value)}")
    return value


def check_int(where: str, value: object, lo: int, hi: int, *, exc: Exc = ProtocolError) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise exc(f"{where} out of range: {value!r}")
    return value


def check_num(where: str, value: object, lo: float, hi: float, *, exc: Exc = ProtocolError) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise exc(f"{where} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise exc(f"{where} out of range: {value!r}")
    return float(value)


def check_bool(where: str, value: object, *, exc: Exc = ProtocolError) -> bool:
    if not isinstance(value, bool):
        raise exc(f"{where} must be true or false")
    return value


def check_list(where: str, value: object, max_len: int, *, exc: Exc = ProtocolError) -> list[Any]:
    if not isinstance(value, (list, tuple)) or len(value) > max_len:
        raise exc(f"{where} must be a list of at most {max_len}")
    return list(value)


def check_job_id(where: str, value: object, *, exc: Exc = ProtocolError) -> str:
    job = check_str(where, value, 40, empty=False, exc=exc)
    if not _JOB_ID_RE.match(job):
        raise exc(f"{where} is not a job id: {job!r}")
    return job


def check_name(where: str, value: object, *, exc: Exc = ProtocolError) -> str:
    """A node name as it may appear on the wire (already sanitized by its owner)."""
    name = check_str(where, value, MAX_NAME, empty=False, exc=exc)
    if not _NAME_RE.match(name):
        raise exc(f"{where} has invalid characters: {name!r}")
    return name


def check_fingerprint(where: str, value: object, *, exc: Exc = ProtocolError) -> str:
    fp = check_str(where, value, FINGERPRINT_HEX, empty=False, exc=exc)
    if len(fp) != FINGERPRINT_HEX or not _HEX_RE.match(fp):
        raise exc(f"{where} is not a fingerprint: {fp!r}")
    return fp


def check_rel_path(where: str, value: object, *, exc: Exc = ProtocolError) -> str:
    """A relative file path from outside: '/'-separated, no empty, '.' or '..' part, no NUL, bounded.
    Whoever writes it joins it under a directory of its own, so it cannot land anywhere else."""
    path = check_str(where, value, MAX_PATH, empty=False, exc=exc)
    parts = path.split("/")
    if "\x00" in path or path.startswith("/") or len(parts) > MAX_PATH_DEPTH:
        raise exc(f"{where} is not a safe relative path: {path!r}")
    try:
        too_long = any(len(part.encode()) > 255 for part in parts)
    except UnicodeEncodeError:   # a file name that is not UTF-8 (os.listdir hands those over escaped)
        raise exc(f"{where} is not valid UTF-8: {path!r}") from None
    if too_long or any(part in ("", ".", "..") for part in parts):
        raise exc(f"{where} is not a safe relative path: {path!r}")
    return path


def check_sha256_hex(where: str, value: object, *, exc: Exc = ProtocolError) -> str:
    digest = check_str(where, value, 64, empty=False, exc=exc)
    if len(digest) != 64 or not _HEX_RE.match(digest):
        raise exc(f"{where} is not a SHA-256 in hex")
    return digest


def build(cls: type[Any], body: dict[str, Any], where: str) -> Any:
    """Construct ``cls`` from a wire map: defaults fill gaps, unknown keys are ignored."""
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in body:
            kwargs[f.name] = body[f.name]
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ProtocolError(f"{where}.{f.name} missing")
    return cls(**kwargs)
