"""Client side of the control socket, used by ``vesta``, ``vestatop`` and Python callers.

Requests and replies are msgpack maps in 4-byte length-prefixed frames:
``{"op": "peers", "args": {...}}`` -> ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "one line", "type": "ErrorClass"}``; the client raises
``errors.remote(type)``, both the daemon's class and ``RemoteError``. Blocking
sockets on purpose: a CLI call is one round trip and needs no event loop.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from vesta.checks import MAX_FRAME
from vesta.errors import DaemonNotRunning, PeerUnavailable, RemoteError, remote
from vesta.paths import locate_socket, socket_dirs

__all__ = ["ControlClient", "RemoteError", "find_socket"]

_HEADER = struct.Struct(">I")
CONNECT_RETRY_S = 5.0   # how long a client waits out a daemon's full listen queue
START_HINT = "start it with: vestad -name NAME -key-file PATH"


def find_socket(name: str | None = None, directory: Path | None = None) -> Path:
    """The control socket for ``name`` (or $VESTA_NAME), else the only one of this user; looked for in
    ``directory``, or else in $XDG_RUNTIME_DIR and then /tmp."""
    return locate_socket(name or os.environ.get("VESTA_NAME"), [directory] if directory else socket_dirs(),
                         START_HINT)


class ControlClient:
    """One connection to a local vestad."""

    def __init__(self, path: Path, timeout: float | None = 30.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self._connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise DaemonNotRunning(f"vestad is not running (socket {path} does not answer): {START_HINT}") from exc
        except PermissionError as exc:
            self.sock.close()
            raise DaemonNotRunning(f"not allowed to use {path}: run vesta as the user that runs vestad") from exc

    def _connect(self, path: Path) -> None:
        """Connect, waiting out a full listen queue (EAGAIN: a burst of clients) for up to CONNECT_RETRY_S."""
        deadline = time.monotonic() + CONNECT_RETRY_S
        pause = 0.005
        while True:
            try:
                self.sock.connect(str(path))
                return
            except BlockingIOError as exc:
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise DaemonNotRunning(f"vestad is too busy to take a connection on {path} "
                                           f"(tried for {CONNECT_RETRY_S:g}s): try again") from exc
                time.sleep(pause)
                pause = min(pause * 2, 0.1)

    @classmethod
    def connect(cls, name: str | None = None, directory: Path | None = None,
                timeout: float | None = 30.0) -> ControlClient:
        return cls(find_socket(name, directory), timeout)

    def call(self, op: str, on_event: Callable[[dict[str, Any]], None] | None = None, **args: Any) -> Any:
        """One request; events the daemon streams before its answer go to ``on_event``."""
        payload = msgpack.packb({"op": op, "args": args})
        try:
            self.sock.sendall(_HEADER.pack(len(payload)) + payload)
            while True:
                reply = msgpack.unpackb(self._read_frame(), raw=False)
                if isinstance(reply, dict) and "event" in reply:
                    if on_event is not None:
                        on_event(reply["event"])
                    continue
                break
        except TimeoutError as exc:
            raise PeerUnavailable(f"vestad did not answer {op!r} in time") from exc
        except OSError as exc:
            raise DaemonNotRunning(f"lost the connection to vestad ({exc}): is it still running?") from exc
        if not isinstance(reply, dict) or "ok" not in reply:
            raise RemoteError("vestad sent an unexpected reply")
        if not reply["ok"]:
            raise remote(reply.get("type"))(str(reply.get("error", "unknown error")))
        return reply.get("result")

    def _read_frame(self) -> bytes:
        (size,) = _HEADER.unpack(self._read_exact(_HEADER.size))
        if size > MAX_FRAME:
            raise RemoteError(f"reply of {size} bytes is too large")
        return self._read_exact(size)

    def _read_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise DaemonNotRunning("vestad closed the connection (did it stop?)")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
