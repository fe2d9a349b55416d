"""Background tasks and the stop switch shared by worker threads and the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from vesta.tasks import StopFlag, cancel_all, spawn


def test_a_flag_set_from_a_thread_wakes_a_waiter_on_the_loop() -> None:
    async def main() -> None:
        flag = StopFlag()
        waiter = flag.future()
        await asyncio.sleep(0.01)
        assert not waiter.done() and not flag.is_set()
        threading.Timer(0.05, flag.set).start()
        await asyncio.wait_for(waiter, 5)   # nothing else would complete it: only set() can
        assert flag.is_set() and waiter.result() is None

    asyncio.run(main())


def test_a_flag_already_set_gives_a_done_future_and_set_twice_is_harmless() -> None:
    async def main() -> None:
        flag = StopFlag()
        flag.set()
        assert flag.future().done()
        flag.set()
        assert flag.wait(0)   # still a threading.Event for the worker threads

    asyncio.run(main())


def test_a_waiter_that_gave_up_does_not_break_set_and_others_still_wake() -> None:
    async def main() -> None:
        flag = StopFlag()
        gave_up, waiting = flag.future(), flag.future()
        gave_up.cancel()
        flag.set()
        await asyncio.wait_for(waiting, 5)
        assert gave_up.cancelled() and waiting.done()

    asyncio.run(main())


def test_setting_a_flag_whose_loop_is_closed_is_harmless() -> None:
    flag = StopFlag()

    async def wait_briefly() -> None:
        flag.future()   # left waiting when this loop closes

    asyncio.run(wait_briefly())
    flag.set()   # must not raise: that loop is gone
    assert flag.is_set()


def test_spawn_logs_a_failure_with_the_task_name_and_cancel_all_stops_the_rest(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        tasks: set[asyncio.Task[None]] = set()

        async def fail() -> None:
            raise ValueError("broken on purpose")

        spawn(fail(), name="the-failing-one", tasks=tasks)
        forever = spawn(asyncio.sleep(3600), name="sleeper", tasks=tasks)
        await asyncio.sleep(0.01)
        assert tasks == {forever}   # the failed one left the set when it ended
        await cancel_all(tasks)
        assert forever.cancelled() and not tasks

    with caplog.at_level(logging.ERROR, logger="vesta.tasks"):
        asyncio.run(main())
    assert any("task the-failing-one failed" in r.getMessage() and r.exc_info for r in caplog.records)
