"""Issue 22's flow-control and ledger faults through the real process (``python -m idemproxy
run``), with real components: a pipelining caller on a raw socket (item 6), a redis-server
restarted without persistence under a running proxy (item 15), and a redis-server switched to
an evicting ``maxmemory-policy`` (item 16). The request-level items are in
``test_trust_edges_process.py``.

Item 16's process runs under libfaketime at ten times the speed of real time: the store
re-reads Redis's settings every 30 s (``idemproxy.store.redis.SAFETY_CHECK_S``, not
configurable), which the test would otherwise wait for twice. Only the child's clocks run
faster; Redis, the sockets and the test run in real time.
"""

from __future__ import annotations

import asyncio
import glob
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import redis

from idemproxy.protocol import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_PREFIX
from idemproxy.wire.http_server import MAX_PIPELINED
from tests.support.ops_cli import idemproxy_ops
from tests.support.problems import assert_problem
from tests.support.processes import WAIT_S, RunningProxy, idemproxy_run, served, until_true
from tests.support.redis_server import RedisServer, free_port, restartable_port
from tests.support.upstream import Upstream
from tests.support.wire import Connection, connected, request

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: The answer to each pipelined request: larger than every buffer between the proxy and a
#: caller that reads nothing, so the proxy's writer stalls on the first one.
ANSWER = 1 << 20
#: What the pipelining caller writes, without reading: far more than the kernel buffers on both
#: sides hold, so all of it is taken only by a proxy that keeps reading.
PIPELINED_BYTES = 48 << 20
#: The flow process's ``client_header_timeout``: how long a caller may read nothing.
STALL_S = 1.0
#: The flow process's ``max_connections``.
MAX_CONNECTIONS = 2
SPEEDUP = 10


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def upstream() -> AsyncIterator[Upstream]:
    tool = Upstream()
    async with served(tool.app()) as url:
        tool.url = url
        yield tool


@pytest_asyncio.fixture(loop_scope="module")
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def gauge(session: aiohttp.ClientSession, proxy: RunningProxy, name: str, **labels: str) -> float:
    return (await proxy.scrape(session)).value(name, **labels)


async def until_gauge(
    session: aiohttp.ClientSession, proxy: RunningProxy, value: float, name: str, **labels: str
) -> None:
    """Polls ``/metrics`` until ``name`` reads ``value``."""

    async def reads() -> bool:
        return await gauge(session, proxy, name, **labels) == value

    await until_true(reads, WAIT_S, f"{name} {labels or ''} of {value}")


# -- 6: pipelining and the connection limit -------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def flow(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningProxy]:
    directory = tmp_path_factory.mktemp("flow")
    settings = {
        "shutdown_grace": "1s",
        "client_header_timeout": f"{STALL_S}s",
        "max_connections": MAX_CONNECTIONS,
        "routes": [{"name": "big", "prefix": "/big", "upstream": upstream.url}],
    }
    async with idemproxy_run(settings, directory, store=f"sqlite:///{directory / 'ledger.db'}") as proxy:
        yield proxy


async def test_item_6_a_caller_pipelining_without_reading_is_read_no_further_and_cut_off(
    flow: RunningProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    """Item 6. Injects: one connection that writes 48 MiB of pipelined GETs (each answered with
    1 MiB) and reads nothing. Asserts: the proxy never takes the whole stream (the write fails:
    it stopped reading), it cuts the caller off after ``client_header_timeout`` with at most
    ``MAX_PIPELINED`` requests queued, and it keeps serving others."""
    upstream.effects.clear()
    one = request("GET", f"/big/{ANSWER}", close=False, length=False)
    count = PIPELINED_BYTES // len(one)
    async with connected(flow.port, rcvbuf=8192, limit=8192) as pipelining:
        async with asyncio.timeout(WAIT_S):
            sent_whole = await pipelining.send(one * count)  # returns when the proxy cut it off
        cut_off = await flow.until_logged("closed a connection whose caller stopped reading its answers")
        assert await pipelining.closed_by_server()

    assert sent_whole is False
    assert cut_off["timeout_s"] == STALL_S
    assert cut_off["queued"] <= MAX_PIPELINED
    assert 1 <= upstream.count() < count
    async with session.get(f"{flow.url}/big/10") as response:
        assert (response.status, await response.read()) == (200, b"x" * 10)


async def test_item_6_a_connection_past_max_connections_is_closed_at_once_and_counted(
    flow: RunningProxy, session: aiohttp.ClientSession
) -> None:
    """Item 6. Injects: ``max_connections`` (2) open connections, then a third, then a fourth
    after one closed. Asserts: the third is closed without an answer and counted in
    ``idemproxy_refused_connections_total``; the fourth is served."""

    async def answered(connection: Connection) -> bool:
        await connection.send(request("GET", "/elsewhere", close=False))
        return (await connection.read_reply()).status == 404  # no route: the proxy answers itself

    await until_gauge(session, flow, 0, "idemproxy_open_connections")
    refused_before = await gauge(session, flow, "idemproxy_refused_connections_total")
    first, second = await Connection.open(flow.port), await Connection.open(flow.port)
    try:
        assert await answered(first)
        assert await answered(second)
        async with connected(flow.port) as third:
            third_reply = await third.read_reply()
        refused = await gauge(session, flow, "idemproxy_refused_connections_total") - refused_before
        await first.close()
        await until_gauge(session, flow, 1, "idemproxy_open_connections")
        async with connected(flow.port) as fourth:
            fourth_answered = await answered(fourth)
    finally:
        await first.close()
        await second.close()

    assert (third_reply.status, third_reply.closed) == (0, True)
    assert refused == 1
    assert flow.logged("max_connections are open")
    assert fourth_answered


# -- 15: a Redis restarted without persistence under a running proxy -------------------------------------


@pytest_asyncio.fixture(loop_scope="module")
async def ledger_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", port=restartable_port())
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def test_item_15_a_redis_restarted_without_persistence_is_a_lost_ledger_until_confirmed(
    ledger_redis: RedisServer, upstream: Upstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Item 15. Injects: under a running ``idemproxy run``, its redis-server restarted on the same
    port without persistence (empty). Asserts: the process finds the ledger lost
    (``idemproxy_ledger_lost`` 1, ``/readyz`` 503); the retry of the completed operation and a
    new one get 503 ``ledger-lost`` and are not forwarded; ``idemproxy ops ledger`` shows the
    loss; after ``idemproxy ops confirm-ledger`` reservations resume (the retry runs again, as
    the operator accepted)."""
    upstream.effects.clear()
    settings = {"shutdown_grace": "1s", "routes": [{"name": "tools", "prefix": "/", "upstream": upstream.url}]}
    paid = {"Idempotency-Key": "k-paid"}
    async with idemproxy_run(settings, tmp_path, store=ledger_redis.url) as proxy:
        for _ in range(2):
            async with session.post(f"{proxy.url}/items", json={"amount": 5}, headers=paid) as response:
                assert response.status == 201
        assert upstream.count() == 1

        ledger_redis.stop()
        restarted = RedisServer(ledger_redis.directory, ledger_redis.port, ("--appendonly", "no"))
        restarted.start()
        try:
            with redis.Redis(port=restarted.port) as client:
                assert client.dbsize() == 0  # what a restart without persistence leaves
            await until_gauge(session, proxy, 1, "idemproxy_ledger_lost")
            async with session.post(f"{proxy.url}/items", json={"amount": 5}, headers=paid) as retry:
                problem = await assert_problem(retry, 503, "ledger-lost")
            fresh = {"Idempotency-Key": "k-new"}
            async with session.post(f"{proxy.url}/items", json={"amount": 7}, headers=fresh) as new:
                await assert_problem(new, 503, "ledger-lost")
            assert "idemproxy ops ledger" in problem["detail"]
            assert upstream.count() == 1
            async with session.get(f"{proxy.admin_url}/readyz") as ready:
                await assert_problem(ready, 503, "ledger-lost")

            shown = await idemproxy_ops(proxy.admin_url, "ledger")
            confirmed = await idemproxy_ops(proxy.admin_url, "confirm-ledger", "--by", "oncall")
            assert shown.code == 0, shown.err
            assert "LOST: the ledger's epoch marker is gone" in shown.out
            assert confirmed.code == 0, confirmed.err
            assert "reservations resume" in confirmed.out

            assert await gauge(session, proxy, "idemproxy_ledger_lost") == 0
            async with session.post(f"{proxy.url}/items", json={"amount": 7}, headers=fresh) as new:
                assert new.status == 201
            async with session.post(f"{proxy.url}/items", json={"amount": 5}, headers=paid) as again:
                assert again.status == 201
                assert "Idempotent-Replayed" not in again.headers  # forwarded again, as the operator accepted
            assert upstream.count() == 3
        finally:
            restarted.kill()


# -- 16: an evicting Redis under a running proxy ------------------------------------------------------------


def faster_clock() -> dict[str, str]:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        pytest.fail("libfaketime is not installed: apt-get install libfaketime (scripts/bootstrap.sh test-tools)")
    return {"LD_PRELOAD": found[0], "FAKETIME": f"+0 x{SPEEDUP}"}


def set_policy(server: RedisServer, policy: str) -> None:
    with redis.Redis(port=server.port) as client:
        client.config_set("maxmemory-policy", policy)


async def test_item_16_a_idemproxy_run_turns_unready_while_its_redis_can_evict(
    ledger_redis: RedisServer, upstream: Upstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Item 16. Injects: ``CONFIG SET maxmemory-policy allkeys-lru`` on the redis-server under a
    running ``idemproxy run``, then back to ``noeviction``. Asserts: ``/readyz`` on the admin and
    the metrics listener turns 503 ``ledger-unavailable`` with reason ``eviction`` and a detail
    naming the node and its policy, ``idemproxy_store_unsafe{reason="eviction"}`` is 1 and an
    error is logged; after ``noeviction`` both are ready again and the gauge is 0."""
    metrics_port = free_port()
    settings: dict[str, Any] = {
        "shutdown_grace": "1s",
        "metrics_listen": f"127.0.0.1:{metrics_port}",
        "routes": [{"name": "tools", "prefix": "/", "upstream": upstream.url}],
    }
    store = {"url": ledger_redis.url, "socket_timeout": f"{2 * SPEEDUP}s"}  # 2 s of real time
    async with idemproxy_run(settings, tmp_path, store=store, env=faster_clock()) as proxy:
        probes = [f"{proxy.admin_url}/readyz", f"http://127.0.0.1:{metrics_port}/readyz"]

        async def statuses() -> list[int]:
            found = []
            for url in probes:
                async with session.get(url) as response:
                    found.append(response.status)
            return found

        async def statuses_are(status: int) -> bool:
            return await statuses() == [status, status]

        assert await statuses() == [200, 200]
        set_policy(ledger_redis, "allkeys-lru")
        try:
            await until_true(lambda: statuses_are(503), WAIT_S, "503 from both /readyz")
            problems = []
            for url in probes:
                async with session.get(url) as response:
                    problems.append(await response.json(content_type=PROBLEM_CONTENT_TYPE))
            unsafe = await gauge(session, proxy, "idemproxy_store_unsafe", reason="eviction")
        finally:
            set_policy(ledger_redis, "noeviction")
        await until_true(lambda: statuses_are(200), WAIT_S, "200 from both /readyz")
        safe_again = await gauge(session, proxy, "idemproxy_store_unsafe", reason="eviction")

    for problem in problems:
        assert problem["type"] == f"{PROBLEM_TYPE_PREFIX}ledger-unavailable"
        assert problem["reason"] == "eviction"
        assert f"redis 127.0.0.1:{ledger_redis.port} has maxmemory-policy allkeys-lru" in problem["detail"]
    assert (unsafe, safe_again) == (1, 0)
    assert proxy.logged("the ledger can lose records; /readyz fails until this is fixed")
