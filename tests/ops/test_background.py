"""Stopping background tasks (``idemproxy.background.stop``), including one whose
``asyncio.wait_for`` swallowed the cancellation, as Python 3.11's does when the awaited
thing finishes in the same turn (a fresh-clone CI run hung in shutdown on it)."""

from __future__ import annotations

import asyncio
import sys

from idemproxy import background

BOUND_S = 10.0  # a stop that never returns fails here instead of at the suite's timeout


async def test_a_task_that_swallowed_its_cancellation_is_cancelled_again_until_it_ends() -> None:
    loop = asyncio.get_running_loop()
    sent: list[asyncio.Future[None]] = []
    waiting = asyncio.Event()
    rounds_after_the_cancel = 0
    cancelled_at = 0

    async def sends_commands_forever() -> None:
        nonlocal rounds_after_the_cancel
        while True:
            command: asyncio.Future[None] = loop.create_future()
            sent.append(command)
            waiting.set()
            await asyncio.wait_for(command, 5.0)  # as redis-py writes a command
            if cancelled_at:
                rounds_after_the_cancel += 1

    task = asyncio.create_task(sends_commands_forever())
    await waiting.wait()
    sent[-1].set_result(None)  # the command is written in the very turn the cancellation comes
    cancelled_at = len(sent)
    async with asyncio.timeout(BOUND_S):
        await background.stop(task)

    assert task.done()
    assert task.cancelled()
    if sys.version_info < (3, 12):  # gh-86296: the first cancellation was swallowed, the loop went on
        assert rounds_after_the_cancel >= 1


async def test_what_a_stopped_task_raised_is_consumed_and_none_is_skipped() -> None:
    started = asyncio.Event()

    async def fails_when_cancelled() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    failing = asyncio.create_task(fails_when_cancelled())
    finished = asyncio.create_task(asyncio.sleep(0))
    await started.wait()
    await finished

    await background.stop(failing, None, finished)

    assert failing.done()
    assert isinstance(failing.exception(), RuntimeError)
    assert finished.done()
    assert not finished.cancelled()
