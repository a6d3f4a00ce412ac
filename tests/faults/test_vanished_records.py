"""A store that loses an operation's record while its attempt is in flight (a Redis failover
to a replica that never had it; an SQLite file restored from a backup): the outcome still
ends up recorded, so a retry is answered, never forwarded again (the trust issue, items 19
and 21). And every failure of the Redis client, not only its own error types, refuses the
request with the fail-closed 503 before anything is forwarded (item 20)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from redis.asyncio.connection import AbstractConnection

from idemproxy.app import build_proxy_app
from idemproxy.config.settings import StoreConfig
from idemproxy.ledger.leases import LeaseKeeper
from idemproxy.lifecycle.records import State
from idemproxy.store import Store, open_store
from idemproxy.store.redis import RedisStore
from tests.conftest import proxy_config
from tests.support.problems import assert_problem
from tests.support.records import make_record, new_op_id, reserved
from tests.support.topologies import RedisClusterTopology, RedisNode, started_store
from tests.support.upstream import Upstream

pytestmark = pytest.mark.slow

VANISHED = "idemproxy_ledger_records_vanished_total"


def vanished(where: str) -> float:
    return REGISTRY.get_sample_value(VANISHED, {"where": where}) or 0.0


@pytest.fixture(params=["sqlite", "redis"])
async def losing_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Store, Any]]:
    """A started store on private storage, and a function that makes it lose every operation
    record but not the ledger's epoch marker: what a failover to a replica that never had the
    latest writes does (losing the marker too is a lost ledger: ``test_ledger_loss``)."""
    if request.param == "sqlite":
        path = tmp_path / "ledger.sqlite3"
        store = open_store(StoreConfig(url=f"sqlite:///{path}"))

        def lose() -> None:
            with sqlite3.connect(path) as db:
                tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
                for table in tables:
                    if table != "markers":
                        db.execute(f'DELETE FROM "{table}"')

        await store.start()
        yield store, lose
        await store.close()
        return
    server = RedisNode(tmp_path / "redis")
    server.start()
    try:
        store = open_store(StoreConfig(url=server.url))
        await store.start()

        def lose() -> None:
            for key in server.client().scan_iter(match="idem:*:op:*"):
                server.call("DEL", key)

        yield store, lose
        await store.close()
    finally:
        server.kill()


async def test_a_record_lost_while_the_tool_runs_is_recreated_with_its_outcome(
    aiohttp_client: Any, upstream: Upstream, losing_store: tuple[Store, Any], caplog: pytest.LogCaptureFixture
) -> None:
    store, lose = losing_store
    proxy = await aiohttp_client(build_proxy_app(proxy_config(upstream.url), store))
    before = vanished("record")
    headers = {"Idempotency-Key": "k-vanish"}

    first = asyncio.create_task(proxy.post("/gate", json={"amount": 5}, headers=headers))
    await upstream.arrived.wait()  # the tool is acting on it now
    lose()
    with caplog.at_level(logging.ERROR, logger="idemproxy.ledger.ledger"):
        upstream.release.set()
        answer = await first
        retry = await proxy.post("/gate", json={"amount": 5}, headers=headers)

    assert answer.status == 201
    assert retry.status == 201
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert await retry.read() == await answer.read()
    assert upstream.count("/gate") == 1
    assert vanished("record") == before + 1
    assert [r.getMessage() for r in caplog.records if "vanished" in r.getMessage()] == [
        "operation record vanished before its outcome was recorded; recreating it"
    ]


async def test_the_recreated_record_keeps_the_outcome_and_says_what_happened(
    aiohttp_client: Any, upstream: Upstream, losing_store: tuple[Store, Any]
) -> None:
    store, lose = losing_store
    app = build_proxy_app(proxy_config(upstream.url), store)
    proxy = await aiohttp_client(app)

    first = asyncio.create_task(proxy.post("/gate", json={}, headers={"Idempotency-Key": "k-evidence"}))
    await upstream.arrived.wait()
    lose()
    upstream.release.set()
    answer = await first
    op_id = answer.headers["Idempotency-Operation"]

    record = await store.get(op_id)
    assert record is not None
    assert record.state is State.COMPLETED
    assert record.response is not None
    assert record.response.status == 201
    kinds = [evidence.kind for evidence in record.evidence]
    assert kinds == ["recreated", "completed"]
    assert record.evidence[0].detail["reason"] == "the store lost the record"


# -- the Redis client failing in ways that are not its own errors ---------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterTopology]:
    topology = RedisClusterTopology(tmp_path_factory.mktemp("cluster"))
    try:
        topology.start()
        yield topology
    finally:
        for node in topology.nodes:
            if node.process is not None:
                node.process.send_signal(signal.SIGCONT)
        topology.stop()


def break_the_next_send(monkeypatch: pytest.MonkeyPatch, error: Exception) -> list[Exception]:
    """The next command redis-py sends fails as it does on a connection a failover closed
    under it (``'NoneType' object has no attribute 'writelines'``); the ones after work."""
    raised: list[Exception] = []
    original = AbstractConnection.send_packed_command

    async def send(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        if not raised:
            raised.append(error)
            raise error
        await original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", send)
    return raised


@pytest.mark.parametrize(
    "error",
    [
        AttributeError("'NoneType' object has no attribute 'writelines'"),
        RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed"),
    ],
    ids=["attribute-error", "runtime-error"],
)
async def test_a_cluster_client_failing_with_a_foreign_error_is_a_503_and_nothing_is_forwarded(
    aiohttp_client: Any,
    upstream: Upstream,
    cluster: RedisClusterTopology,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
) -> None:
    for node in cluster.master_nodes():
        node.call("FLUSHALL")
    async with started_store(StoreConfig(url=cluster.url)) as store:
        assert isinstance(store, RedisStore)
        proxy = await aiohttp_client(build_proxy_app(proxy_config(upstream.url, store_url=cluster.url), store))
        headers = {"Idempotency-Key": f"k-{type(error).__name__}"}
        raised = break_the_next_send(monkeypatch, error)

        with caplog.at_level(logging.ERROR, logger="idemproxy.store.redis"):
            refused = await proxy.post("/items", json={}, headers=headers)
        retried = await proxy.post("/items", json={}, headers=headers)

    assert raised == [error]
    await assert_problem(refused, 503, "ledger-unavailable")
    assert refused.headers["Retry-After"] == "1"
    assert upstream.count() == 1  # the retry's, and only it
    assert retried.status == 201
    logged = [r for r in caplog.records if r.name == "idemproxy.store.redis"]
    assert [r.getMessage() for r in logged] == ["the Redis client failed unexpectedly; treating it as an outage"]
    assert logged[0].exc_info is not None
    assert logged[0].exc_info[1] is error


async def test_a_lease_renewal_that_finds_the_record_gone_says_so_and_asks_for_an_epoch_check(
    losing_store: tuple[Store, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Item 21: not "another owner took the operation over" (nobody did), but the record vanished,
    counted under where="lease", and the ledger's epoch is checked at once (a lost ledger?)."""
    store, lose = losing_store
    keeper = LeaseKeeper(store)
    epoch_check = asyncio.Event()
    keeper.on_vanished = epoch_check.set
    requested_at = time.monotonic()
    record = make_record(new_op_id()).evolve(lease_until_ms=store.clock.latest_ms(requested_at) + 600)
    assert await store.reserve(record, reserved(record)) is None
    before = vanished("lease")
    lose()
    with caplog.at_level(logging.WARNING, logger="idemproxy.ledger.leases"):
        keeper.hold(record, lease_s=0.6, requested_at=requested_at)  # renewed after 0.2 s
        keeper.start()
        try:
            await asyncio.wait_for(epoch_check.wait(), 10)
        finally:
            await keeper.close()

    assert vanished("lease") == before + 1
    assert not keeper.still_held(record.op_id)
    messages = [r.getMessage() for r in caplog.records]
    assert any("record vanished while its attempt was in flight" in message for message in messages), messages
    assert not any("another owner took the operation over" in message for message in messages)
