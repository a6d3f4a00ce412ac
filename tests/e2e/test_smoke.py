from tests.conftest import ProxyFactory
from tests.support.upstream import Upstream


async def test_replay(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    client = await make_proxy()
    first = await client.post("/items", json={"a": 1}, headers={"Idempotency-Key": "k1"})
    second = await client.post("/items", json={"a": 1}, headers={"Idempotency-Key": "k1"})
    assert first.status == 201
    assert await first.read() == await second.read()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert upstream.count() == 1
