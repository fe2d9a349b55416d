"""Background tasks whose failures are logged, never lost (no bare ensure_future)."""

from __future__ import annotations

import asyncio
import logging
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
