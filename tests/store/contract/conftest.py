"""The store contract runs on every backend: SQLite, and Redis twice (over TCP and over its
Unix socket). ``inspector`` reads what lies under the store, bypassing it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from idemproxy.store import Store
from tests.conftest import store_url_for
from tests.support.store_inspector import Inspector


@pytest.fixture(params=["sqlite", "redis", "redis-unix"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return store_url_for(request, tmp_path)


@pytest.fixture
async def inspector(store: Store, store_url: str) -> AsyncIterator[Inspector]:
    under = Inspector(store, store_url)
    yield under
    await under.aclose()
