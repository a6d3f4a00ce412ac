"""The Redis store's safety settings, against real redis-server processes.

- Eviction: a ledger Redis must run ``maxmemory-policy noeviction``. The store
  reads the policy of every node holding ledger keys when it starts (refusing
  any other, unless ``store.allow_eviction``) and again while it runs: an
  unsafe policy fails ``/readyz`` and sets ``idemproxy_store_unsafe``. The
  re-checks wait on a sleep the tests drive (``Ticks``), never on a timer.
- Replica acknowledgments: without ``store.min_replicas_ack`` a reservation
  waits for one replica wherever the store has replicas (Sentinel, Cluster, a
  plain master with connected replicas), and ``check-config`` says what an
  explicit 0 gives up.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from idemproxy.app import build_admin_app, build_metrics_app
from idemproxy.cli import main
from idemproxy.config.settings import ConfigError, StoreConfig, parse_config
from idemproxy.protocol import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_PREFIX
from idemproxy.store import StoreError, StoreUnavailable, StoreUnsafe, open_store
from idemproxy.store.redis import RedisStore
from tests.conftest import proxy_config
from tests.support.records import make_record, reserve_new, reserved
from tests.support.redis_server import RedisServer, free_port
from tests.support.topologies import RedisClusterTopology, RedisNode, SentinelTopology
from tests.support.topologies import started_store as started
from tests.support.upstream import Upstream

Client = TestClient[Any, Any]
UNAVAILABLE = f"{PROBLEM_TYPE_PREFIX}ledger-unavailable"
#: Bound of every wait on the store's background task or a child process.
LIMIT_S = 20.0
SENTINEL_URL = "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster"
CLUSTER_URL = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"
ROUTES = [{"prefix": "/", "upstream": "http://tool.test"}]


def set_policy(port: int, policy: str) -> None:
    with redis.Redis(port=port) as client:
        client.config_set("maxmemory-policy", policy)


def address(port: int) -> str:
    """How messages name the node listening on ``port``."""
    return f"127.0.0.1:{port}"


@pytest.fixture
def ledger_redis(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The session's Redis, flushed; its policy is put back to noeviction afterwards."""
    redis_server.flush()
    yield redis_server
    set_policy(redis_server.port, "noeviction")


class Ticks:
    """What the store's background re-checks wait on instead of a timer."""

    def __init__(self) -> None:
        self.waits: asyncio.Queue[float] = asyncio.Queue()
        self._go: asyncio.Queue[None] = asyncio.Queue()

    async def sleep(self, seconds: float) -> None:
        self.waits.put_nowait(seconds)
        await self._go.get()

    async def waiting(self) -> float:
        """Until the background task waits for its next re-check; how long it asked to wait."""
        return await asyncio.wait_for(self.waits.get(), LIMIT_S)

    async def tick(self) -> None:
        """Run one re-check: return once the task waits again, its check done."""
        self._go.put_nowait(None)
        await self.waiting()


async def unsafe_gauge(client: Client) -> float:
    """``idemproxy_store_unsafe{reason="eviction"}`` as ``/metrics`` exposes it."""
    exposition = await (await client.get("/metrics")).text()
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "idemproxy_store_unsafe" and sample.labels == {"reason": "eviction"}:
                return sample.value
    raise AssertionError("idemproxy_store_unsafe{reason='eviction'} is not exposed")


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and text in record.getMessage()
    ]


# -- eviction: at start -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru", "allkeys-random", "volatile-ttl"])
async def test_the_store_refuses_to_start_on_a_redis_that_evicts(ledger_redis: RedisServer, policy: str) -> None:
    set_policy(ledger_redis.port, policy)
    store = open_store(StoreConfig(url=ledger_redis.url))

    with pytest.raises(StoreUnsafe) as refused:
        await store.start()
    with pytest.raises(StoreUnavailable, match="closed"):  # a refused store releases what it opened
        await store.ping()
    await store.close()  # and closing it again is harmless

    message = str(refused.value)
    assert isinstance(refused.value, StoreError)
    assert "\n" not in message
    assert f"redis {address(ledger_redis.port)} has maxmemory-policy {policy}" in message
    assert "CONFIG SET maxmemory-policy noeviction" in message
    assert "'maxmemory-policy noeviction' in redis.conf" in message
    assert "store.allow_eviction: true" in message


async def test_the_store_starts_on_noeviction_and_reports_nothing_unsafe(
    ledger_redis: RedisServer, aiohttp_client: Callable[..., Awaitable[Client]], upstream: Upstream
) -> None:
    async with started(StoreConfig(url=ledger_redis.url)) as store:
        admin = await aiohttp_client(build_admin_app(store, proxy_config(upstream.url, ledger_redis.url)))

        assert store.hazards() == ()
        assert await unsafe_gauge(admin) == 0
        assert (await admin.get("/readyz")).status == 200
        await reserve_new(store)
        await admin.close()


@pytest.mark.slow
async def test_with_config_disabled_the_policy_is_read_from_info(tmp_path: Path) -> None:
    """Managed Redis services disable CONFIG; INFO memory still says the policy."""
    server = RedisServer(
        tmp_path / "redis", extra_args=("--rename-command", "CONFIG", "", "--maxmemory-policy", "volatile-lfu")
    )
    server.start()
    try:
        store = open_store(StoreConfig(url=server.url))
        with pytest.raises(StoreUnsafe, match=f"redis {address(server.port)} has maxmemory-policy volatile-lfu"):
            await store.start()
        await store.close()
    finally:
        server.kill()


@pytest.mark.slow
async def test_an_unreadable_policy_is_warned_about_once_and_does_not_block(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither CONFIG nor INFO answers (an ACL, a service that hides both): the
    proxy cannot tell, says so once, and starts."""
    server = RedisServer(
        tmp_path / "redis",
        extra_args=(
            "--rename-command",
            "CONFIG",
            "",
            "--rename-command",
            "INFO",
            "",
            "--maxmemory-policy",
            "allkeys-lru",
        ),
    )
    server.start()
    try:
        with caplog.at_level(logging.WARNING):
            async with started(StoreConfig(url=server.url)) as store:
                assert store.hazards() == ()
                assert await store.check_safety() == ()
                await reserve_new(store)
    finally:
        server.kill()

    (warning,) = warnings_about(caplog, "maxmemory-policy")
    assert f"cannot read the maxmemory-policy of redis {address(server.port)}" in warning
    assert "noeviction" in warning


# -- eviction: while running ---------------------------------------------------------------------------


async def test_a_running_proxy_turns_unready_while_its_redis_evicts(
    ledger_redis: RedisServer, aiohttp_client: Callable[..., Awaitable[Client]], upstream: Upstream
) -> None:
    """``CONFIG SET maxmemory-policy allkeys-lru`` on a running deployment: the next
    re-check fails /readyz (admin and metrics listeners) with the reason and sets
    the gauge; switched back, the next one clears both."""
    ticks = Ticks()
    store = RedisStore.from_url(ledger_redis.url, sleep=ticks.sleep)
    await store.start()
    try:
        config = proxy_config(upstream.url, ledger_redis.url)
        admin = await aiohttp_client(build_admin_app(store, config))
        probes = await aiohttp_client(build_metrics_app(store, config))
        assert await ticks.waiting() == 30.0  # the background re-check, every 30 s
        assert (await admin.get("/readyz")).status == 200

        set_policy(ledger_redis.port, "allkeys-lru")
        await ticks.tick()

        for client in (admin, probes):
            refused = await client.get("/readyz")
            assert refused.status == 503
            problem = await refused.json(content_type=PROBLEM_CONTENT_TYPE)
            assert problem["type"] == UNAVAILABLE
            assert problem["reason"] == "eviction"
            assert f"redis {address(ledger_redis.port)} has maxmemory-policy allkeys-lru" in problem["detail"]
            assert await unsafe_gauge(client) == 1

        set_policy(ledger_redis.port, "noeviction")
        await ticks.tick()

        assert (await admin.get("/readyz")).status == 200
        assert (await probes.get("/readyz")).status == 200
        assert await unsafe_gauge(admin) == 0
        await admin.close()
        await probes.close()
    finally:
        await store.close()


async def test_allow_eviction_starts_with_a_warning_and_stays_ready(
    ledger_redis: RedisServer,
    aiohttp_client: Callable[..., Awaitable[Client]],
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The opt-out: the proxy starts and stays ready, but says so loudly, and the
    gauge (and its alert) still report the policy."""
    set_policy(ledger_redis.port, "allkeys-lru")
    with caplog.at_level(logging.WARNING):
        async with started(StoreConfig(url=ledger_redis.url, allow_eviction=True)) as store:
            admin = await aiohttp_client(build_admin_app(store, proxy_config(upstream.url, ledger_redis.url)))
            (hazard,) = store.hazards()
            assert (hazard.reason, hazard.accepted) == ("eviction", True)
            assert (await admin.get("/readyz")).status == 200
            assert await unsafe_gauge(admin) == 1
            assert await store.check_safety() == (hazard,)  # the same hazard: not warned about again
            await reserve_new(store)
            await admin.close()

    (warning,) = warnings_about(caplog, "maxmemory-policy allkeys-lru")
    assert "store.allow_eviction" in warning


@pytest.mark.slow
async def test_idemproxy_run_refuses_an_evicting_redis_with_one_line(ledger_redis: RedisServer, tmp_path: Path) -> None:
    set_policy(ledger_redis.port, "allkeys-lru")
    config = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin_listen": f"127.0.0.1:{free_port()}",
        "store": ledger_redis.url,
        "routes": ROUTES,
    }
    path = tmp_path / "idemproxy.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "idemproxy", "run", "--config", str(path), stderr=asyncio.subprocess.PIPE
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), LIMIT_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert process.returncode == 1
    lines = stderr.decode().splitlines()
    assert "Traceback" not in stderr.decode()
    assert lines[-1].startswith("idemproxy: ")  # after the JSON log lines, one line for a person
    assert f"redis {address(ledger_redis.port)} has maxmemory-policy allkeys-lru" in lines[-1]


# -- Redis Cluster: every master ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bare_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterTopology]:
    """Three masters without replicas: the cheapest cluster."""
    topology = RedisClusterTopology(tmp_path_factory.mktemp("cluster"), replicas=0)
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()


@pytest.mark.slow
async def test_every_cluster_master_is_checked(bare_cluster: RedisClusterTopology) -> None:
    masters = bare_cluster.master_nodes()
    evicting = masters[-1]
    set_policy(evicting.port, "volatile-lru")
    try:
        store = open_store(StoreConfig(url=bare_cluster.url))
        with pytest.raises(StoreUnsafe) as refused:
            await store.start()
        await store.close()
    finally:
        set_policy(evicting.port, "noeviction")

    assert f"redis {address(evicting.port)} has maxmemory-policy volatile-lru" in str(refused.value)
    for master in masters[:-1]:
        assert address(master.port) not in str(refused.value)


@pytest.mark.slow
async def test_a_cluster_waits_for_one_replica_by_default_and_warns_when_a_master_has_none(
    bare_cluster: RedisClusterTopology, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        async with started(StoreConfig(url=bare_cluster.url, replica_ack_timeout_s=0.1)) as store:
            assert store.min_replicas_ack == 1
            record = make_record("ab" * 16)
            with pytest.raises(StoreUnavailable, match="0 of 1 replicas acknowledged"):
                await store.reserve(record, reserved(record))

    warnings = warnings_about(caplog, "connected replica")
    assert len(warnings) == bare_cluster.MASTERS
    assert all("min_replicas_ack is 1" in warning for warning in warnings)


# -- replica acknowledgments: the default ------------------------------------------------------------------


@pytest.mark.parametrize("url", [SENTINEL_URL, CLUSTER_URL, "rediss+sentinel://s1/m", "rediss+cluster://n1"])
async def test_sentinel_and_cluster_urls_wait_for_one_replica_unless_set(url: str) -> None:
    unset = parse_config({"store": url, "routes": ROUTES}).store
    explicit = parse_config({"store": {"url": url, "min_replicas_ack": 0}, "routes": ROUTES}).store
    assert unset.min_replicas_ack is None  # not set: the store decides

    for config, expected in ((unset, 1), (explicit, 0)):
        store = open_store(config)  # not started: nothing connects
        assert isinstance(store, RedisStore)
        assert store.min_replicas_ack == expected
        await store.close()


@pytest.mark.slow
async def test_a_plain_master_waits_for_a_replica_by_default_only_if_it_has_one(
    replicated: tuple[RedisNode, RedisNode], ledger_redis: RedisServer
) -> None:
    master, replica = replicated
    url = f"redis://127.0.0.1:{master.port}/0"
    async with (
        started(StoreConfig(url=url)) as store,
        started(StoreConfig(url=url, min_replicas_ack=0)) as explicit,
        started(StoreConfig(url=ledger_redis.url)) as lone,
    ):
        assert store.min_replicas_ack == 1
        assert explicit.min_replicas_ack == 0
        assert lone.min_replicas_ack == 0
        await reserve_new(lone)
        await reserve_new(store)

        replica.kill()  # the default really waits: without the replica, nothing is forwarded
        record = make_record("cd" * 16)
        with pytest.raises(StoreUnavailable, match="0 of 1 replicas acknowledged"):
            await store.reserve(record, reserved(record))
        await reserve_new(explicit)


@pytest.mark.slow
async def test_a_sentinel_store_waits_for_the_replica_by_default(tmp_path: Path) -> None:
    topology = SentinelTopology(tmp_path / "sentinel")
    try:
        await asyncio.to_thread(topology.start)
        async with started(StoreConfig(url=topology.url)) as store:
            assert store.min_replicas_ack == 1
            record = await reserve_new(store)
            # WAIT returned: the replica has it already, without waiting for replication here.
            assert topology.replica.call("EXISTS", store.keys.record(record.op_id)) == 1
    finally:
        topology.stop()


# -- configuration and check-config -----------------------------------------------------------------------


def test_allow_eviction_is_read_and_checked() -> None:
    config = parse_config({"store": {"url": "redis://r", "allow_eviction": True}, "routes": ROUTES})
    assert config.store.allow_eviction is True
    assert parse_config({"store": "redis://r", "routes": ROUTES}).store.allow_eviction is False
    with pytest.raises(ConfigError, match=r"store\.allow_eviction: expected true or false"):
        parse_config({"store": {"url": "redis://r", "allow_eviction": "yes"}, "routes": ROUTES})


@pytest.mark.parametrize(
    "store",
    [
        {"url": CLUSTER_URL, "socket_timeout": "500ms"},  # the default WAIT (1s) outlasts the socket
        {"url": SENTINEL_URL, "replica_ack_timeout": "2s"},
        {"url": "redis://r", "min_replicas_ack": 1, "socket_timeout": "1s"},
    ],
)
def test_a_replica_wait_must_end_before_the_socket_times_out(store: dict[str, Any]) -> None:
    """A WAIT the socket timeout cuts off is retried on another connection (in a
    cluster, possibly to another master), where it answers at once with replicas
    that never saw the reservation."""
    with pytest.raises(ConfigError, match=r"store\.replica_ack_timeout: must be shorter than socket_timeout"):
        parse_config({"store": store, "routes": ROUTES})
    # Without a wait (explicitly, or a lone plain Redis by default) any timeouts go.
    parse_config({"store": {**store, "min_replicas_ack": 0}, "routes": ROUTES})
    parse_config({"store": {"url": "redis://r", "socket_timeout": "500ms"}, "routes": ROUTES})


def check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str], store: dict[str, Any]) -> list[str]:
    path = tmp_path / "idemproxy.yaml"
    path.write_text(yaml.safe_dump({"store": store, "routes": ROUTES}), encoding="utf-8")
    assert main(["check-config", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    return [line.strip() for line in lines if line.strip().startswith("store")]


def test_check_config_says_what_an_explicit_zero_gives_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (line,) = check_config(tmp_path, capsys, {"url": SENTINEL_URL, "min_replicas_ack": 0})
    assert "min_replicas_ack 0 (set explicitly)" in line
    assert "lost" in line
    assert "failover" in line
    assert "runs the call again" in line
    assert check_config(tmp_path, capsys, {"url": "sqlite:///ledger.db"}) == []  # SQLite has no replicas


@pytest.mark.parametrize(
    ("store", "says"),
    [
        ({"url": SENTINEL_URL}, "min_replicas_ack 1 (the default for Sentinel)"),
        ({"url": CLUSTER_URL}, "min_replicas_ack 1 (the default for Cluster)"),
        ({"url": CLUSTER_URL, "min_replicas_ack": 2}, "min_replicas_ack 2"),
        ({"url": "redis://r:6379/0"}, "min_replicas_ack decided at start"),
    ],
)
def test_check_config_says_how_many_replicas_a_reservation_waits_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], store: dict[str, Any], says: str
) -> None:
    (line,) = check_config(tmp_path, capsys, store)
    assert says in line
    if "decided" not in says:
        wanted = store.get("min_replicas_ack", 1) + 1
        assert f"{wanted} replicas per master" in line
