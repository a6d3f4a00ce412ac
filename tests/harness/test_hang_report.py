"""The hang report (``tests.support.hangs``): a test that times out in its event loop names
what each task was awaiting, down to the line."""

from __future__ import annotations

import pytest

from tests.support.hangs import SECTION

HUNG = """
import asyncio

async def never_answered(waiting: asyncio.Event) -> None:
    await waiting.wait()

async def test_hangs() -> None:
    waiting = asyncio.Event()
    helper = asyncio.create_task(never_answered(waiting), name="the-helper")
    await helper
"""

INNER = ["-p", "tests.support.hangs", "-p", "no:cacheprovider", "-o", "asyncio_mode=auto"]
INNER += ["-o", "asyncio_default_fixture_loop_scope=function"]


def test_a_timed_out_async_test_reports_each_tasks_await_chain(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_hung=HUNG)
    result = pytester.runpytest_inprocess(*INNER, "-o", "timeout=1")
    result.assert_outcomes(failed=1)
    report = result.stdout.str()
    assert SECTION in report
    section = report[report.index(SECTION) :]
    assert "the-helper" in section
    assert "test_hung.py:4 in never_answered" in section  # the helper's own line, awaiting the event
    assert "test_hung.py:9 in test_hangs" in section  # the test, awaiting the helper


def test_a_plain_failure_outside_a_loop_adds_nothing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def test_fails() -> None:\n    assert 1 == 2\n")
    result = pytester.runpytest_inprocess(*INNER)
    result.assert_outcomes(failed=1)
    assert SECTION not in result.stdout.str()
