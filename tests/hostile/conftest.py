"""One hostile stack per test module, on the session's redis-server.

Hypothesis runs many examples inside one test, so the stack is module-scoped
(and so is the event loop the tests and the stack share). The fuzz settings
are fixed for CI: derandomized (the same examples on every run), no example
database, no deadline (a shared 2-core machine is slow now and then).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from hypothesis import HealthCheck, settings

from tests.hostile.stack import Stack, hostile_stack
from tests.support.redis_server import RedisServer

#: Short, so that slowloris cases end quickly; well-formed requests arrive in one write.
CLIENT_TIMEOUT = "1s"


def fuzz(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(redis_server: RedisServer) -> AsyncIterator[Stack]:
    redis_server.flush()
    async with hostile_stack(
        redis_server.url, client_header_timeout=CLIENT_TIMEOUT, client_body_timeout=CLIENT_TIMEOUT
    ) as running:
        yield running
