"""vestad's control socket: the Unix socket ``vesta``, ``vestatop`` and the Python client talk to.

Requests and replies are msgpack maps in length-prefixed frames (see ``control``). A request with an
``id`` is pipelined: it runs beside the others of its connection (at most MAX_IN_FLIGHT at once), and its
events and answer carry the same ``id``. A request without one is served before the next is read (the
one-request-at-a-time clients of earlier versions). Only the daemon's own user may connect
(SO_PEERCRED); the socket is created 0600. Events a request streams before its
answer are held briefly and leave with the next frame (``_Replies``). What a request does is the
business of ``ops.ControlOps``, handed in as ``dispatch``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack

from vesta.errors import ConfigError, PeerUnavailable, ProtocolError
from vesta.paths import link_tmp_socket, unlink_tmp_socket
from vesta.tasks import spawn
from vesta.wire import pack_frame, read_frame

log = logging.getLogger(__name__)

MAX_CONTROL_FRAME = 16 << 20  # control requests are small, but for a sweep's inputs (sweepspec.MAX_SWEEP_BYTES)
MAX_SOCKET_PATH = 107         # sun_path is 108 bytes with its terminating NUL
EVENT_HOLD_S = 0.02           # seconds a job's events wait for company: a job done sooner sends them with its answer
EVENT_HOLD_BYTES = 64 * 1024  # ... unless this much is waiting already
LISTEN_BACKLOG = 1024        # clients connecting at once before the daemon accepts them (a burst of scripts)
MAX_IN_FLIGHT = 4096          # requests one connection may have in flight; the next waits (is not read) till one ends

Emit = Callable[[dict[str, Any]], Awaitable[None]]
Dispatch = Callable[[Any, Emit], Awaitable[dict[str, Any]]]


async def refuse_if_running(path: Path, name: str) -> None:
    """ConfigError if a vestad answers on ``path`` already."""
    if path.is_socket() and not path.is_symlink() and await _socket_alive(path):
        raise ConfigError(f"a vestad named {name!r} is already running (socket {path}): "
                          "stop it first, or use another -name")


class ControlServer:
    """The control socket of the vestad named ``name``."""

    def __init__(self, path: Path, name: str, dispatch: Dispatch, counters: Counter[str]) -> None:
        self.path = path
        self.name = name
        self.dispatch = dispatch
        self.counters = counters
        self.clients: set[asyncio.Task[Any]] = set()
        self.requests: set[asyncio.Task[Any]] = set()   # pipelined requests being served
        self._server: asyncio.Server | None = None
        self._socket_inode: int | None = None
        self._tmp_link: Path | None = None

    async def stop(self) -> None:
        """Stop listening, end every client's connection, remove the socket."""
        if self._server is not None:
            self._server.close()
        for task in [*self.clients, *self.requests]:
            task.cancel()
        if self.clients or self.requests:
            await asyncio.gather(*self.clients, *self.requests, return_exceptions=True)
        self.close()

    async def open(self) -> None:
        path = self.path
        if len(str(path).encode()) > MAX_SOCKET_PATH:
            raise ConfigError(f"control socket path {path} is longer than {MAX_SOCKET_PATH} bytes: "
                              "set XDG_RUNTIME_DIR to a shorter directory, or use a shorter -name")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {path.parent}: {exc.strerror}: check XDG_RUNTIME_DIR") from exc
        if path.exists() or path.is_symlink():
            if not path.is_socket() or path.is_symlink():
                raise ConfigError(f"{path} exists and is not a socket: remove it, or use another -name")
            await refuse_if_running(self.path, self.name)
            path.unlink()
        old = os.umask(0o177)   # the socket is created 0600: no window where others can connect
        try:
            server = await asyncio.start_unix_server(self._serve_control, path=str(path), backlog=LISTEN_BACKLOG)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._socket_inode = path.stat().st_ino
        self._server = server
        self._tmp_link = link_tmp_socket(path, self.name)   # the seed's /tmp place, for other runtime dirs

    def close(self) -> None:
        path = self.path
        unlink_tmp_socket(self._tmp_link, path)
        with contextlib.suppress(OSError):
            if self._socket_inode is not None and path.stat().st_ino == self._socket_inode:
                path.unlink()

    async def _serve_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.clients.add(task)
        conn = _Connection(writer)
        try:
            if not _same_user(writer):
                self.counters["control_rejected"] += 1
                log.warning("rejected a control connection from another user")
                return
            while True:
                try:
                    request = msgpack.unpackb(await read_frame(reader, MAX_CONTROL_FRAME), raw=False)
                except (PeerUnavailable, ProtocolError):
                    return
                except (ValueError, msgpack.UnpackException):
                    conn.write(pack_frame(msgpack.packb({"ok": False, "error": "undecodable request",
                                                         "type": "ProtocolError"})))
                    return
                rid = request.get("id") if isinstance(request, dict) else None
                if rid is None:   # a client of one request at a time: served before the next is read
                    await conn.serve(self.dispatch, request, None)
                    continue
                await conn.slots.acquire()   # at most MAX_IN_FLIGHT at once: the client waits, nothing is dropped
                spawn(conn.serve(self.dispatch, request, rid), "control-request", self.requests)
        except (PeerUnavailable, asyncio.CancelledError):
            pass
        finally:
            self.clients.discard(task)
            conn.reading_done = True
            if not conn.busy:
                conn.close()
            # else: the last request in flight closes it (answers still go out after the client stops sending)


class _Connection:
    """One client's connection: its requests in flight and what goes back to it. Frames written in one turn of
    the event loop leave in one write (a batch of small jobs answers in a few syscalls, not one per frame)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.busy = 0                # requests being served
        self.reading_done = False    # the client sent its last request: close once the answers are out
        self._out: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        if self._out and not self.writer.is_closing():
            self.writer.write(b"".join(self._out))
        self._out.clear()

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise PeerUnavailable(f"connection lost: {exc}") from exc

    async def serve(self, dispatch: Dispatch, request: Any, rid: Any) -> None:
        """One request, its events and its answer, tagged with its id when it has one."""
        self.busy += 1
        replies = _Replies(self, rid)
        try:
            if rid is not None and (isinstance(rid, bool) or not isinstance(rid, int) or not 0 <= rid < 1 << 63):
                answer: dict[str, Any] = {"ok": False, "error": "request id must be a whole number >= 0",
                                          "type": "ConfigError"}
            else:
                answer = await dispatch(request, replies.event)
            if rid is not None:
                answer["id"] = rid
            await replies.send(msgpack.packb(answer))
        except PeerUnavailable:
            pass   # the client is gone; a job that needed it (its output) has failed already
        finally:
            self.busy -= 1
            if rid is not None:
                self.slots.release()
            if self.busy == 0 and self.reading_done:
                self.close()

    def close(self) -> None:
        self._flush()
        self.writer.close()


class _Replies:
    """What one control request sends back. Events are held up to EVENT_HOLD_S and leave with the next frame:
    a quick job reaches its client in one write (each write wakes the client, ~0.2 ms of both sides' time)."""

    def __init__(self, conn: _Connection, rid: Any) -> None:
        self.conn = conn
        self.rid = rid
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.timer: asyncio.TimerHandle | None = None

    def _flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.held:
            self.conn.write(b"".join(self.held))
            self.held.clear()
            self.held_bytes = 0

    async def event(self, event: dict[str, Any]) -> None:
        body: dict[str, Any] = {"event": event}
        if self.rid is not None:
            body["id"] = self.rid
        frame = pack_frame(msgpack.packb(body))
        self.held.append(frame)
        self.held_bytes += len(frame)
        if self.held_bytes >= EVENT_HOLD_BYTES:
            self._flush()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(EVENT_HOLD_S, self._flush)
        await self.conn.drain()   # a client that stopped reading still slows its job down (and a gone one fails it)

    async def send(self, payload: bytes) -> None:
        self.held.append(pack_frame(payload))
        self._flush()
        await self.conn.drain()


def _same_user(writer: asyncio.StreamWriter) -> bool:
    """SO_PEERCRED: only processes of the daemon's own user may use the control socket."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                               struct.calcsize("3i")))
    except OSError:
        return False
    return bool(uid == os.getuid())


async def _socket_alive(path: Path) -> bool:
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True
