"""The upstream client's send guard: asked once a connection is in hand, right before writing."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict
from yarl import URL

from idemproxy.config.settings import RouteConfig
from idemproxy.ledger.forwarder import Forwarder, NotSent, UpstreamRequest
from tests.support.upstream import Upstream


@pytest.fixture
async def forwarder() -> Forwarder:
    started = Forwarder()
    await started.start()
    yield started  # type: ignore[misc]
    await started.close()


def route(upstream: Upstream) -> RouteConfig:
    return RouteConfig(prefix="/", name="root", upstream=URL(upstream.url))


async def send(forwarder: Forwarder, upstream: Upstream, guard: object) -> int:
    async with forwarder.request(
        route(upstream),
        UpstreamRequest("POST", "/items", CIMultiDict(), b"{}"),
        guard=guard,  # type: ignore[arg-type]
    ) as response:
        await response.read()
        return response.status


@pytest.mark.parametrize("pooled", [False, True], ids=["new-connection", "pooled-connection"])
async def test_a_refusing_guard_sends_nothing(forwarder: Forwarder, upstream: Upstream, pooled: bool) -> None:
    asked: list[bool] = []
    if pooled:
        assert await send(forwarder, upstream, None) == 201  # leaves a keep-alive connection in the pool

    def refuse() -> bool:
        asked.append(True)
        return False

    with pytest.raises(NotSent):
        await send(forwarder, upstream, refuse)

    assert asked == [True]
    assert upstream.count() == (1 if pooled else 0)
    assert await send(forwarder, upstream, lambda: True) == 201  # the connection was not spoiled
    assert upstream.count() == (2 if pooled else 1)


async def test_the_guard_belongs_to_its_own_request_only(forwarder: Forwarder, upstream: Upstream) -> None:
    with pytest.raises(NotSent):
        await send(forwarder, upstream, lambda: False)
    assert await send(forwarder, upstream, None) == 201  # no guard left behind in the context
    assert upstream.count() == 1
