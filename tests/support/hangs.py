"""A pytest plugin: when a test fails, say what every asyncio task of its event loop was awaiting.

pytest-timeout reports where the main thread was (``select``, in an event loop) and the
other threads' stacks; a hung async test needs the tasks' ``await`` chains instead, from the
test's coroutine down to the future nobody completes. Found from the failure's own traceback
(the loop is a ``self`` in one of its frames), so any loop (pytest-asyncio's, aiohttp's) is seen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Iterator
from types import FrameType, TracebackType
from typing import Any

import pytest

SECTION = "asyncio tasks when the test failed"
_MAX_DEPTH = 64


def loop_of(traceback: TracebackType | None) -> asyncio.AbstractEventLoop | None:
    """The event loop one of ``traceback``'s frames ran (stopped by the failure, not closed yet)."""
    while traceback is not None:
        candidate = traceback.tb_frame.f_locals.get("self")
        if isinstance(candidate, asyncio.AbstractEventLoop) and not candidate.is_closed():
            return candidate
        traceback = traceback.tb_next
    return None


def await_chain(task: asyncio.Task[Any]) -> Iterator[str]:
    """One line per frame from ``task``'s coroutine down to what it awaits, then that."""
    awaited: Any = task.get_coro()
    for _ in range(_MAX_DEPTH):
        frame: FrameType | None = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            break
        yield f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        if awaited is None:
            break
    if awaited is not None and not hasattr(awaited, "cr_frame"):
        yield f"  awaiting {awaited!r}"[:400]  # a compiled (frameless) coroutine, say
    waiter = getattr(task, "_fut_waiter", None)  # the future it sleeps on: its repr says whose
    if waiter is not None:
        yield f"  on {waiter!r}"[:400]


def describe_tasks(loop: asyncio.AbstractEventLoop) -> str:
    lines: list[str] = []
    for task in sorted(asyncio.all_tasks(loop), key=lambda task: task.get_name()):
        lines.append(f"{task.get_name()}: {task.get_coro()!r}"[:400])
        lines.extend(await_chain(task))
    return "\n".join(lines)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if call.excinfo is not None and report.failed:
        loop = loop_of(call.excinfo.tb)
        if loop is not None:
            report.sections.append((SECTION, describe_tasks(loop)))
    return report
