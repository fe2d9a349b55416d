"""Background tasks whose failures are logged, never lost (no bare ensure_future)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


def spawn(coro: Coroutine[Any, Any, Any], name: str, tasks: set[asyncio.Task[Any]] | None = None) -> asyncio.Task[Any]:
    """Start ``coro`` as a task; an exception other than cancellation is logged with ``name``.

    When ``tasks`` is given the task is kept there until it ends, so the owner
    can cancel everything it started on shutdown.
    """
    task = asyncio.get_running_loop().create_task(coro, name=name)
    if tasks is not None:
        tasks.add(task)

    def done(t: asyncio.Task[Any]) -> None:
        if tasks is not None:
            tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("task %s failed", name, exc_info=t.exception())

    task.add_done_callback(done)
    return task


async def cancel_all(tasks: set[asyncio.Task[Any]]) -> None:
    for t in list(tasks):
        t.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


class StopFlag:
    """A run's stop switch, set once from any thread: worker threads check ``is_set()`` in their loops (or
    ``wait()``), the event loop awaits ``future()``, which ``set()`` completes at once (no polling). Lighter
    than a ``threading.Event`` (one per job, made on the hot path), whose Condition is made only for ``wait``."""

    __slots__ = ("_set", "_lock", "_waiters", "_event")

    def __init__(self) -> None:
        self._set = False
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._event: threading.Event | None = None   # for threads that wait()

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._lock:
            self._set = True
            waiters, self._waiters = self._waiters, []
            event = self._event
        if event is not None:
            event.set()
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_complete, fut)
            except RuntimeError:   # that loop is closed: nobody waits there any more
                pass

    def wait(self, timeout: float | None = None) -> bool:
        """Block this (worker) thread until the flag is set or ``timeout`` passes; whether it is set."""
        with self._lock:
            if self._set:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def future(self) -> asyncio.Future[None]:
        """A future of the running loop, done once the flag is set (at once if it already is)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._set:
                fut.set_result(None)
            else:
                self._waiters.append((loop, fut))
        return fut


def _complete(fut: asyncio.Future[None]) -> None:
    if not fut.done():   # the waiter may have given up (cancelled it) meanwhile
        fut.set_result(None)
