"""Which identity a node name stands for: the first one seen with it, kept in the state directory.

A name is what a node *says* it is called; any key holder may say any name. So a name is bound to the
first identity (fingerprint) this node saw using it, this node's own name to itself, and the binding is
kept in ``STATE_DIR/vestad-names-NAME.json`` across restarts (written within a second of a new binding, off
the event loop, so a flood of new names costs one write a second). Another identity using a bound name is shown
as ``NAME~fp8`` (its fingerprint's first 8 characters): ``--on NAME`` reaches only the bound identity,
``--on NAME~fp8`` the other one, so two honest machines called ``laptop`` both stay usable and an
impostor is never chosen by name alone. Records and the ledger show these names, which follow the
identity a link authenticated, never a name a message claims.

The book is bounded (``MAX_NAMES``, and ``MAX_PER_IDENTITY`` names for one identity): beyond either a new
name is shown with its fingerprint too, so a flood of made-up identities or renames cannot grow the file
without end, and one identity cannot take every name. Renaming a node binds its new name (when free)
and leaves the old one bound to it. To give a name to another machine, stop vestad and delete the name's
entry from the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vesta.identity import atomic_write

log = logging.getLogger(__name__)

MAX_NAMES = 4096
MAX_PER_IDENTITY = 4   # names one identity may have bound (renames): one identity cannot fill the book
SEP = "~"
FP_SHOWN = 8


def tagged(name: str, fingerprint: str) -> str:
    """``name~fp8``: how an identity that does not own its name is shown."""
    return f"{name}{SEP}{fingerprint[:FP_SHOWN]}"


class Names:
    """Name -> the fingerprint it is bound to; ``shown`` binds on first sight."""

    def __init__(self, path: Path | None, own_name: str, own_fp: str) -> None:
        self.path = path
        self.bound: dict[str, str] = {}
        self.dirty = False      # bindings not yet written (``save``, about once a second, off the event loop)
        self.unsaved = False    # the last write failed (a full disk): said once
        if path is not None:
            self._load(path)
        self.shown(own_name, own_fp, own=True)
        self.save()

    def _load(self, path: Path) -> None:
        try:
            body = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("name bindings %s are unreadable (%s): starting with none (names are bound anew "
                        "as nodes are seen)", path, exc)
            return
        names = body.get("names") if isinstance(body, dict) else None
        if not isinstance(names, dict):
            log.warning("name bindings %s have no 'names' map: starting with none", path)
            return
        for name, fp in list(names.items())[:MAX_NAMES]:
            if isinstance(name, str) and isinstance(fp, str) and SEP not in name:
                self.bound[name] = fp

    def shown(self, name: str, fingerprint: str, *, own: bool = False) -> str:
        """How the identity ``fingerprint`` that calls itself ``name`` is shown; binds a free name to it.
        ``own``: this node's name is always its own (an older binding to another identity is replaced)."""
        if not name:
            return fingerprint[:FP_SHOWN]
        owner = self.bound.get(name)
        if owner == fingerprint:
            return name
        if own or (owner is None and len(self.bound) < MAX_NAMES
                   and sum(1 for fp in self.bound.values() if fp == fingerprint) < MAX_PER_IDENTITY):
            self.bound[name] = fingerprint
            self.dirty = True
            return name
        return tagged(name, fingerprint)

    def owner(self, name: str) -> str | None:
        return self.bound.get(name)

    def snapshot(self) -> bytes:
        """The file's next contents (taken where bindings change: the event loop), written by ``write``."""
        self.dirty = False
        return json.dumps({"version": 1, "names": self.bound}, indent=1, sort_keys=True).encode() + b"\n"

    def write(self, data: bytes) -> None:
        """Atomically replace the file; a full disk keeps the bindings in memory, written again later."""
        if self.path is None:
            return
        try:
            atomic_write(self.path, data)
            self.unsaved = False
        except OSError as exc:
            self.dirty = True
            if not self.unsaved:
                log.warning("cannot save name bindings to %s (%s): kept in memory, saved when there is room",
                            self.path, exc.strerror or exc)
            self.unsaved = True

    def save(self) -> None:
        if self.dirty:
            self.write(self.snapshot())
