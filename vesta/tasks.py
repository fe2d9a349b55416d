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


class StopFlag(threading.Event):
    """A run's stop switch, set once from any thread: worker threads check ``is_set()`` in their loops,
    the event loop awaits ``future()``, which ``set()`` completes at once (no polling)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def set(self) -> None:
        super().set()
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_complete, fut)
            except RuntimeError:   # that loop is closed: nobody waits there any more
                pass

    def future(self) -> asyncio.Future[None]:
        """A future of the running loop, done once the flag is set (at once if it already is)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self.is_set():
                fut.set_result(None)
            else:
                self._waiters.append((loop, fut))
        return fut


def _complete(fut: asyncio.Future[None]) -> None:
    if not fut.done():   # the waiter may have given up (cancelled it) meanwhile
        fut.set_result(None)
