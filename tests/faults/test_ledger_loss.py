"""The ledger losing every record at once (``FLUSHALL``, a restart without persistence, a
restore from an older backup): the instances notice by the epoch marker and refuse new
reservations until an operator confirms, so no completed operation runs again (the trust
issue, items 15 and 18)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from idemproxy.app import ProxyApp, build_admin_app, build_proxy_app
from idemproxy.config.settings import StoreConfig
from idemproxy.ledger.epoch import MARKER, Epoch, epoch_watch
from idemproxy.store import Store, open_store
from tests.conftest import proxy_config
from tests.support.ops_cli import idemproxy_ops
from tests.support.problems import assert_problem
from tests.support.proxy_server import proxy_app
from tests.support.topologies import RedisNode
from tests.support.upstream import Upstream

pytestmark = pytest.mark.slow

KEY = {"Idempotency-Key": "k-paid"}


class Ledger:
    """One store's storage, opened by as many instances as a test needs."""

    def __init__(self, url: str, lose: Callable[[], None]) -> None:
        self.url = url
        self.lose = lose
        self.stack = AsyncExitStack()

    async def instance(self) -> Store:
        store = open_store(StoreConfig(url=self.url))
        await store.start()
        self.stack.push_async_callback(store.close)
        return store


@pytest.fixture(params=["sqlite", "redis"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    if request.param == "sqlite":
        path = tmp_path / "ledger.sqlite3"

        def delete_every_row() -> None:
            with sqlite3.connect(path) as db:
                for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                    db.execute(f'DELETE FROM "{table}"')

        shared = Ledger(f"sqlite:///{path}", delete_every_row)
        async with shared.stack:
            yield shared
        return
    server = RedisNode(tmp_path / "redis")
    server.start()
    try:
        shared = Ledger(server.url, lambda: server.call("FLUSHALL"))
        async with shared.stack:
            yield shared
    finally:
        server.kill()


async def proxy_on(aiohttp_client: Any, upstream: Upstream, store: Store) -> Any:
    return await aiohttp_client(build_proxy_app(proxy_config(upstream.url), store))


def lost_gauge() -> float:
    return REGISTRY.get_sample_value("idemproxy_ledger_lost") or 0.0


async def test_a_flushed_ledger_refuses_every_reservation_until_an_operator_confirms(
    aiohttp_client: Any, upstream: Upstream, ledger: Ledger
) -> None:
    store = await ledger.instance()
    proxy = await proxy_on(aiohttp_client, upstream, store)
    admin = await aiohttp_client(build_admin_app(store, proxy_config(upstream.url)))
    app: ProxyApp = proxy_app(proxy)
    paid = await proxy.post("/items", json={"amount": 5}, headers=KEY)
    replayed = await proxy.post("/items", json={"amount": 5}, headers=KEY)  # now in the completed cache
    assert (paid.status, replayed.status) == (201, 201)
    assert app.ledger.completed is not None
    assert len(app.ledger.completed) == 1

    ledger.lose()
    await app.epoch.check()

    retry = await proxy.post("/items", json={"amount": 5}, headers=KEY)
    fresh = await proxy.post("/items", json={"amount": 7}, headers={"Idempotency-Key": "k-new"})
    body = await assert_problem(retry, 503, "ledger-lost")
    await assert_problem(fresh, 503, "ledger-lost")
    assert "idemproxy ops ledger" in body["detail"]
    assert upstream.count("/items") == 1
    assert len(app.ledger.completed) == 0  # no answer lives on in memory alone
    assert lost_gauge() == 1
    await assert_problem(await admin.get("/readyz"), 503, "ledger-lost")
    shown = await (await admin.get("/_idem/ledger")).json()
    assert "epoch marker is gone" in shown["lost"]

    confirmed = await admin.post("/_idem/ledger/confirm", json={"by": "oncall"})
    assert confirmed.status == 200
    assert (await confirmed.json())["generation"] == 2
    after = await proxy.post("/items", json={"amount": 5}, headers=KEY)
    assert after.status == 201  # the operator accepted that it runs again
    assert upstream.count("/items") == 2
    assert lost_gauge() == 0
    assert (await admin.get("/readyz")).status == 200


async def test_an_instance_started_after_the_loss_refuses_too(
    aiohttp_client: Any, upstream: Upstream, ledger: Ledger
) -> None:
    first_store = await ledger.instance()
    first = await proxy_on(aiohttp_client, upstream, first_store)
    assert (await first.post("/items", json={}, headers=KEY)).status == 201
    ledger.lose()
    await proxy_app(first).epoch.check()  # it knew the ledger: flags the marker lost

    later = await proxy_on(aiohttp_client, upstream, await ledger.instance())

    await assert_problem(await later.post("/items", json={}, headers=KEY), 503, "ledger-lost")
    assert upstream.count("/items") == 1


async def test_a_ledger_swapped_for_another_is_a_loss(aiohttp_client: Any, upstream: Upstream, ledger: Ledger) -> None:
    store = await ledger.instance()
    proxy = await proxy_on(aiohttp_client, upstream, store)
    watch = proxy_app(proxy).epoch
    known = watch.known
    assert known is not None
    await watch.confirm("drill")  # generation 2, as after an earlier confirmed loss
    current = await store.read_marker(MARKER)
    await store.swap_marker(MARKER, current, Epoch("another-ledger", 1).encode())  # another store's marker

    await watch.check()

    assert watch.lost is not None
    assert "was replaced" in watch.lost
    await assert_problem(await proxy.post("/items", json={}, headers=KEY), 503, "ledger-lost")
    assert upstream.count("/items") == 0


async def test_the_background_check_notices_a_loss_without_any_request(
    aiohttp_client: Any, upstream: Upstream, ledger: Ledger
) -> None:
    store = await ledger.instance()
    proxy = await proxy_on(aiohttp_client, upstream, store)
    watch = epoch_watch(store)
    assert watch is proxy_app(proxy).epoch
    assert watch.lost is None

    ledger.lose()

    async with asyncio.timeout(10):  # the watch reads the marker every second
        await watch.found_lost.wait()
    assert watch.lost is not None
    assert lost_gauge() == 1


async def test_the_ops_cli_shows_the_loss_and_confirms_it(
    aiohttp_client: Any, upstream: Upstream, tmp_path: Path
) -> None:

    path = tmp_path / "ledger.sqlite3"
    store = open_store(StoreConfig(url=f"sqlite:///{path}"))
    await store.start()
    try:
        proxy = await proxy_on(aiohttp_client, upstream, store)
        admin = await aiohttp_client(build_admin_app(store, proxy_config(upstream.url)))
        admin_url = str(admin.make_url("")).rstrip("/")
        with sqlite3.connect(path) as db:
            db.execute("DELETE FROM markers")
        await proxy_app(proxy).epoch.check()

        shown = await idemproxy_ops(admin_url, "ledger")
        confirmed = await idemproxy_ops(admin_url, "confirm-ledger", "--by", "oncall")
        after = await idemproxy_ops(admin_url, "ledger")
    finally:
        await store.close()

    assert shown.code == 0, shown.err
    assert "LOST: the ledger's epoch marker is gone" in shown.out
    assert "idemproxy ops confirm-ledger" in shown.out
    assert confirmed.code == 0, confirmed.err
    assert confirmed.out.startswith("confirmed: epoch ")
    assert "(generation 2); reservations resume" in confirmed.out
    assert "LOST" not in after.out


async def test_the_lost_flag_is_written_again_until_it_holds(
    aiohttp_client: Any, upstream: Upstream, ledger: Ledger
) -> None:
    first = await proxy_on(aiohttp_client, upstream, await ledger.instance())
    watch = proxy_app(first).epoch
    ledger.lose()
    await watch.check()
    ledger.lose()  # the flag was lost too (or its write failed)

    await watch.check()
    later = await proxy_on(aiohttp_client, upstream, await ledger.instance())

    await assert_problem(await later.post("/items", json={}, headers=KEY), 503, "ledger-lost")


async def test_a_stale_flag_never_undoes_a_confirmation(
    aiohttp_client: Any, upstream: Upstream, ledger: Ledger
) -> None:
    store = await ledger.instance()
    proxy = await proxy_on(aiohttp_client, upstream, store)
    admin = await aiohttp_client(build_admin_app(store, proxy_config(upstream.url)))
    watch = proxy_app(proxy).epoch
    ledger.lose()
    await watch.check()

    confirmed = await admin.post("/_idem/ledger/confirm", json={"by": None})  # `ops` without $USER
    await watch._found_lost("a check that read the marker before the confirmation", None, None)
    await watch.check()

    assert confirmed.status == 200
    assert (await confirmed.json())["confirmed_by"] == "unknown"
    raw = await store.read_marker(MARKER)
    assert raw is not None
    assert Epoch.decode(raw).lost is None
    assert Epoch.decode(raw).generation == 2
    assert watch.lost is None


@pytest.mark.parametrize(
    "raw",
    [b"not json", b'{"id": "x\\u001b[31m", "generation": 1}', b'{"id": "a", "generation": "1"}', b"[]"],
    ids=["garbage", "escape-in-id", "string-generation", "a-list"],
)
def test_a_marker_idemproxy_did_not_write_reads_as_lost_and_printable(raw: bytes) -> None:
    epoch = Epoch.decode(raw)

    assert epoch.lost is not None
    assert epoch.lost.isprintable()
    assert "\x1b" not in epoch.lost
