"""Fixtures for the upstream client tests: raw tools on loopback and the client under test.

(The proxy listener's own server, ``serve``, is in ``tests/conftest.py``.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from idemproxy.wire.upstream_client import UpstreamClient
from tests.support.raw_tool import ServeRaw, raw_servers


@pytest.fixture
async def raw_server() -> AsyncIterator[ServeRaw]:
    """``await raw_server(handler)``: a started raw server, closed after the test."""
    async with raw_servers() as start:
        yield start


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    opened = UpstreamClient()
    yield opened
    await opened.close()
