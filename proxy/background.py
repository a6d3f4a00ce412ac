"""Stopping background tasks, including one that swallowed its cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

#: How long a cancelled task gets to end before it is cancelled again.
RECANCEL_S = 1.0


async def stop(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel ``tasks`` (``None`` is skipped) and return once every one has ended.

    One ``cancel()`` is not always enough. On Python 3.11, ``asyncio.wait_for`` hands
    the inner result to a caller that was cancelled in the same event-loop turn as the
    inner awaitable finished, and drops the cancellation (gh-86296, fixed in 3.12).
    redis-py writes every command under a ``wait_for``, so a loop cancelled while it
    sends one can carry on as if nothing happened, and whoever waits for it to end
    waits forever (a proxy that never shuts down). A task still running
    ``RECANCEL_S`` after a cancellation is cancelled again. What the tasks raised is
    consumed, not raised: they are being stopped."""
    pending = {task for task in tasks if task is not None and not task.done()}
    ended = [task for task in tasks if task is not None and task.done()]
    while pending:
        for task in pending:
            task.cancel()
        done, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
        ended.extend(done)
    for task in ended:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at collection
