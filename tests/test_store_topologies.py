"""The Redis store on real topologies started on loopback: a Redis Cluster of
three masters with a replica each (the contract across two instances, slots,
index spread, notifications across nodes, lost scripts, a master failover),
Sentinel with one master, one replica and three sentinels (failovers, also
mid-traffic through the proxy), and replica acknowledgments
(``store.min_replicas_ack``). The URL forms are checked first, without servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from idemproxy.app import build_proxy_app
from idemproxy.config import ConfigError, StoreConfig, parse_config
from idemproxy.records import OperationRecord, State
from idemproxy.store import RecordMissing, StoreUnavailable, redis_record
from idemproxy.store.base import Counter as BudgetCounter
from idemproxy.store.base import Full, Lease, OpsQuery
from idemproxy.store.redis import RedisStore
from idemproxy.store.redis_schema import INDEXED_STATES, NOTE, RENEW, RESERVE, TRANSITION, RedisKeys
from idemproxy.store.redis_urls import Address, ClusterUrl, SentinelUrl, parse_topology_url, redacted
from tests.support.topologies import (
    RedisClusterTopology,
    RedisNode,
    SentinelTopology,
    role,
    started_store,
    wait_in_sync,
    wait_until,
)
from tests.support.upstream import Upstream
from tests.test_duplicates import op_id_for
from tests.test_store_contract import (
    LEASE_MS,
    WAKE_TIMEOUT_S,
    make_record,
    make_response,
    move,
    new_op_id,
    now_ms,
    outcome,
    reserve_new,
    reserved,
    take_over,
    wait_for_subscribers,
)

Client = TestClient[Any, Any]
HANG_LIMIT_S = 10.0
UNAVAILABLE = "urn:idemproxy:problem:ledger-unavailable"
PROBLEM = "application/problem+json"
LOOKUP = {"url": "{upstream}/lookup?key={key}", "match": "matches[0]"}
slow = pytest.mark.slow

# -- URL forms (no servers) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        (
            "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380,[::1]:26381/mymaster",
            SentinelUrl((Address("127.0.0.1", 26379), Address("127.0.0.1", 26380), Address("::1", 26381)), "mymaster"),
        ),
        (
            "rediss+sentinel://:p%40ss@s1,s2:5000/my-master.1/3?sentinel_password=x",
            SentinelUrl(
                (Address("s1", 26379), Address("s2", 5000)),
                "my-master.1",
                db=3,
                password="p@ss",
                sentinel_password="x",
                tls=True,
            ),
        ),
        (
            "redis+cluster://alice:secret@10.0.0.1:7000,10.0.0.2",
            ClusterUrl((Address("10.0.0.1", 7000), Address("10.0.0.2", 6379)), "alice", "secret"),
        ),
        ("rediss+cluster://node:7000/", ClusterUrl((Address("node", 7000),), tls=True)),
    ],
)
def test_topology_urls_parse(url: str, parsed: SentinelUrl | ClusterUrl) -> None:
    assert parse_topology_url(url) == parsed
    assert parse_config({"store": url, "routes": [{"prefix": "/", "upstream": "http://t"}]}).store.url == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://", "at least one HOST[:PORT]"),
        ("redis+sentinel://s1:26379", "/MASTER_NAME[/DB]"),
        ("redis+sentinel://s1:26379/", "/MASTER_NAME[/DB]"),
        ("redis+sentinel://s1:26379/name/x", "database number"),
        ("redis+sentinel://s1:26379/a/1/2", "/MASTER_NAME[/DB]"),
        ("redis+sentinel://s1:26379/bad name", "master name"),
        ("redis+sentinel://s1:99999/m", "port from 1 to 65535"),
        ("redis+sentinel://s1:x/m", "HOST[:PORT] items"),
        ("redis+sentinel://s1,,s2/m", "HOST[:PORT] items"),
        ("redis+sentinel://s1,s1/m", "listed twice"),
        ("redis+sentinel://s1/m?ssl=true", "unknown store URL option 'ssl'"),
        ("redis+cluster://n1:7000/2", "only database 0"),
        ("redis+cluster://n1:7000?sentinel_password=x", "takes no options"),
        ("redis+cluster://:hunter2@n1:7000/5", "only database 0"),
    ],
)
def test_bad_topology_urls_are_named_by_check_config(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"store": url, "routes": [{"prefix": "/", "upstream": "http://t"}]})
    (problem,) = caught.value.problems
    assert problem.startswith("store.url: ")
    assert message in problem
    assert "hunter2" not in problem


def test_redacted_hides_every_password() -> None:
    assert redacted("redis+sentinel://u:pw@s1,s2/m?sentinel_password=spw") == (
        "redis+sentinel://u:***@s1,s2/m?sentinel_password=***"
    )
    assert redacted("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert redacted("sqlite:///ledger.db") == "sqlite:///ledger.db"


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ({"min_replicas_ack": -1}, "store.min_replicas_ack: expected a whole number of replicas"),
        ({"min_replicas_ack": True}, "store.min_replicas_ack: expected a whole number of replicas"),
        ({"min_replicas_ack": 1}, "store.min_replicas_ack: needs a Redis store"),
        ({"url": "redis://r", "replica_ack_timeout": 0}, "store.replica_ack_timeout: expected a duration"),
    ],
)
def test_replica_ack_settings_are_checked(store: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"store": store, "routes": [{"prefix": "/", "upstream": "http://t"}]})


def test_replica_ack_settings_are_read() -> None:
    store = {"url": "redis+cluster://n1", "min_replicas_ack": 2, "replica_ack_timeout": "250ms"}
    config = parse_config({"store": store, "routes": [{"prefix": "/", "upstream": "http://t"}]})
    assert config.store == StoreConfig(url="redis+cluster://n1", min_replicas_ack=2, replica_ack_timeout_s=0.25)


# -- helpers ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def started(url: str, **settings: Any) -> AsyncIterator[RedisStore]:
    async with started_store(StoreConfig(url=url, **settings)) as store:
        yield store


def op_id_on(cluster: RedisClusterTopology, master: RedisNode, store: RedisStore) -> str:
    """A fresh op id whose keys live on ``master``."""
    while True:
        op_id = new_op_id()
        if cluster.node_for_key(store.keys.record(op_id)) is master:
            return op_id


async def complete(store: RedisStore, owned: OperationRecord, body: bytes) -> OperationRecord:
    """Record a COMPLETED outcome for ``owned`` (fence 1); the record as stored."""
    assert await store.transition(move(outcome(owned, State.COMPLETED, response=make_response(body)), fence=1)) is None
    stored = await store.get(owned.op_id)
    assert stored is not None
    return stored


# -- Redis Cluster -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterTopology]:
    topology = RedisClusterTopology(tmp_path_factory.mktemp("cluster"))
    try:
        topology.start()
        yield topology
    finally:
        for node in topology.nodes:
            if node.process is not None:
                node.process.send_signal(signal.SIGCONT)  # in case a test left one stopped
        topology.stop()


@pytest.fixture
def cluster_url(cluster: RedisClusterTopology) -> str:
    for node in cluster.master_nodes():
        node.call("FLUSHALL")
    return cluster.url


@pytest.fixture
async def cluster_stores(cluster_url: str) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two stores on one cluster, as two proxy processes."""
    async with started(cluster_url) as one, started(cluster_url) as two:
        yield one, two


@slow
async def test_cluster_store_keeps_the_contract_across_two_instances(
    cluster_stores: tuple[RedisStore, RedisStore],
) -> None:
    a, b = cluster_stores
    first = await reserve_new(a, "instance-a:1")
    assert await b.get(first.op_id) == first
    rival = make_record(first.op_id, "instance-b:1")
    assert await b.reserve(rival, reserved(rival)) == first.evolve(evidence=())
    retried = make_record(first.op_id, "instance-a:1")
    assert await a.reserve(retried, reserved(retried)) is None  # a retried call counts as created
    assert await b.get(first.op_id) == first

    # Concurrent reserves of one op id through both instances: one winner.
    op_id = new_op_id()
    records = [make_record(op_id, f"instance-{n}:1") for n in range(20)]
    results = await asyncio.gather(
        *((a if n % 2 else b).reserve(record, reserved(record)) for n, record in enumerate(records))
    )
    assert sum(result is None for result in results) == 1

    # Renew, note, and the fencing token across instances.
    assert await b.renew([Lease(first.op_id, 1, "instance-a:1", first.lease_until_ms + 1000)]) == [True]
    assert await b.renew([Lease(first.op_id, 1, "instance-b:1", first.lease_until_ms + 2000)]) == [False]
    assert await a.note(first.op_id, reserved(first))
    released = outcome(first, State.RELEASED)
    assert await a.transition(move(released, fence=1, ttl_s=60)) is None
    taken = take_over(released, "instance-b:1")
    assert await b.transition(move(taken, fence=1, states={State.RELEASED}, kind="reserved")) is None
    zombie = move(outcome(first, State.COMPLETED, response=make_response(b"A's answer")), fence=1)
    b_pending = await b.get(first.op_id)
    assert b_pending is not None
    assert await a.transition(zombie) == b_pending.evolve(evidence=())
    assert await b.transition(move(outcome(taken, State.COMPLETED, response=make_response(b"B")), fence=2)) is None
    final = await a.get(first.op_id)
    assert final is not None
    assert (final.state, final.owner, final.fence) == (State.COMPLETED, "instance-b:1", 2)
    assert [entry.kind for entry in final.evidence] == ["reserved", "reserved", "released", "reserved", "completed"]
    with pytest.raises(RecordMissing):
        await a.transition(move(outcome(make_record(new_op_id()), State.COMPLETED), fence=1))


@slow
def test_cluster_keys_of_one_operation_share_a_slot(cluster: RedisClusterTopology) -> None:
    layout = RedisKeys(StoreConfig().key_prefix)
    for _ in range(64):
        keys = layout.script_keys(new_op_id())
        slots = {cluster.running()[0].call("CLUSTER", "KEYSLOT", key) for key in keys}
        assert len(slots) == 1, keys


@slow
async def test_cluster_indexes_are_spread_over_every_master(
    cluster: RedisClusterTopology, cluster_stores: tuple[RedisStore, RedisStore]
) -> None:
    a, _ = cluster_stores
    masters = {node.port for node in cluster.master_nodes()}
    shards = [a.keys.due_shards(), *(a.keys.state_shards(state) for state in INDEXED_STATES)]
    for index in shards:
        owners = Counter(cluster.node_for_key(shard).port for shard in index)
        assert set(owners) == masters
        assert min(owners.values()) >= len(index) // 6, owners  # no master holds (almost) none
    for _ in range(48):
        await reserve_new(a)
    assert all(int(str(node.call("DBSIZE"))) > 0 for node in cluster.master_nodes())


@slow
async def test_cluster_due_query_and_counts_read_every_master(
    cluster: RedisClusterTopology, cluster_stores: tuple[RedisStore, RedisStore]
) -> None:
    a, b = cluster_stores
    reserved_ops = [await reserve_new(a) for _ in range(24)]
    assert len({cluster.node_for_key(a.keys.record(record.op_id)).port for record in reserved_ops}) == 3
    unknown, attention, done, pending = reserved_ops[:5], reserved_ops[5:8], reserved_ops[8:12], reserved_ops[12:]
    for record in unknown + attention:
        assert await a.transition(move(outcome(record, State.UNKNOWN), fence=1)) is None
    for record in attention:
        escalated = outcome(record, State.NEEDS_ATTENTION)
        assert await a.transition(move(escalated, fence=1, states={State.UNKNOWN})) is None
    for record in done:
        await complete(a, record, b"done")

    assert await b.count_unresolved() == {State.PENDING: 12, State.UNKNOWN: 5, State.NEEDS_ATTENTION: 3}
    due = await b.due(now_ms() + 2 * LEASE_MS, 100)
    assert sorted(due) == sorted(record.op_id for record in pending)
    assert due == [op_id for _, op_id in sorted((record.lease_until_ms, record.op_id) for record in pending)]
    assert await b.due(now_ms(), 100) == []
    listed = await b.query(OpsQuery(state=State.UNKNOWN))
    assert {record.op_id for record in listed} == {record.op_id for record in unknown}
    everything = await b.query(OpsQuery(limit=100))  # a SCAN of every master
    assert {record.op_id for record in everything} == {record.op_id for record in reserved_ops}
    completed = await b.query(OpsQuery(state=State.COMPLETED))
    assert {record.op_id for record in completed} == {record.op_id for record in done}


async def listening_node(cluster: RedisClusterTopology, store: RedisStore, op_id: str) -> RedisNode:
    """The node whose connection carries ``store``'s subscription to ``op_id``'s channel."""
    channel = store.keys.channel(op_id)

    def subscribers() -> list[RedisNode]:
        found = []
        for node in cluster.running():
            with node.client() as client:
                if dict(client.pubsub_numsub(channel)).get(channel.encode()):
                    found.append(node)
        return found

    await asyncio.to_thread(wait_until, lambda: len(subscribers()) == 1, "the watch is subscribed")
    (node,) = subscribers()
    return node


@slow
async def test_cluster_watch_is_woken_by_a_transition_on_another_node(
    cluster: RedisClusterTopology, cluster_stores: tuple[RedisStore, RedisStore]
) -> None:
    """The watcher listens on one node; the script PUBLISHes on the key's master:
    the cluster bus carries the message across."""
    writer, watcher = cluster_stores
    probe = new_op_id()
    async with watcher.watch(probe):
        listener = await listening_node(cluster, watcher, probe)
    others = [master for master in cluster.master_nodes() if master is not listener]
    assert len(others) >= 2
    for master in others:
        op_id = op_id_on(cluster, master, writer)
        record = make_record(op_id)
        assert await writer.reserve(record, reserved(record)) is None
        async with watcher.watch(op_id) as changed:
            assert await listening_node(cluster, watcher, op_id) is listener
            done = outcome(record, State.COMPLETED, response=make_response(b"done"))
            assert await writer.transition(move(done, fence=1)) is None
            await asyncio.wait_for(changed.wait(), WAKE_TIMEOUT_S)
        stored = await watcher.get(op_id)
        assert stored is not None
        assert stored.state is State.COMPLETED


@slow
async def test_cluster_scripts_are_reloaded_after_script_flush_on_every_node(
    cluster: RedisClusterTopology, cluster_stores: tuple[RedisStore, RedisStore]
) -> None:
    a, _ = cluster_stores
    records = [await reserve_new(a) for _ in range(6)]
    for node in cluster.nodes:
        node.call("SCRIPT", "FLUSH")

    fresh = await reserve_new(a)  # RESERVE
    assert await a.renew([Lease(r.op_id, 1, r.owner, r.lease_until_ms + 500) for r in records]) == [True] * 6  # RENEW
    assert await a.note(fresh.op_id, reserved(fresh))  # NOTE
    done = await complete(a, fresh, b"after the flush")  # TRANSITION
    assert done.response is not None
    assert done.response.body == b"after the flush"
    for master in cluster.master_nodes():
        for script in (RESERVE, TRANSITION, RENEW, NOTE):
            assert master.call("SCRIPT", "EXISTS", _sha(script)) == [1]


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


@slow
async def test_cluster_wait_asks_the_replicas_of_the_keys_master(
    cluster: RedisClusterTopology, cluster_url: str
) -> None:
    """``min_replicas_ack`` with a cluster: WAIT runs on the master that owns the
    key, so a stalled replica fails that master's reservations only."""
    masters = cluster.master_nodes()
    stalled = cluster.replica_of(masters[0])
    async with started(cluster_url, min_replicas_ack=1, replica_ack_timeout_s=1.0) as store:
        for master in masters:
            record = make_record(op_id_on(cluster, master, store))
            assert await store.reserve(record, reserved(record)) is None

        assert stalled.process is not None
        stalled.process.send_signal(signal.SIGSTOP)
        try:
            blocked = make_record(op_id_on(cluster, masters[0], store))
            with pytest.raises(StoreUnavailable, match="0 of 1 replicas acknowledged the reservation within 1s"):
                await store.reserve(blocked, reserved(blocked))
            fine = make_record(op_id_on(cluster, masters[1], store))
            assert await store.reserve(fine, reserved(fine)) is None
        finally:
            stalled.process.send_signal(signal.SIGCONT)

        released = await store.get(blocked.op_id)
        assert released is not None
        assert (released.state, released.attempt, released.fence) == (State.RELEASED, 0, 1)
        assert [entry.kind for entry in released.evidence] == ["reserved", "not-durable"]
        assert released.evidence[-1].detail == {"replicas": 0, "required": 1, "owner": blocked.owner}
        # The replica is back: the caller's retry takes the operation over, durably.
        retry = take_over(released, "instance-b:1")
        assert retry.attempt == 1
        assert await store.transition(move(retry, fence=1, states={State.RELEASED})) is None


@slow
async def test_cluster_store_waits_for_a_free_connection(cluster_url: str) -> None:
    """redis-py's cluster client fails when a node's pool is exhausted; the store
    makes callers wait instead, as the plain client's blocking pool does."""
    async with started(cluster_url, max_connections=2) as store:
        records = await asyncio.gather(*(reserve_new(store) for _ in range(40)))
        assert len({record.op_id for record in records}) == 40


@slow
async def test_cluster_store_survives_a_master_failover(cluster: RedisClusterTopology, cluster_url: str) -> None:
    """The master a watcher listens on is killed: its replica takes over, the
    store reaches the moved slots, and the listener moves to another node.
    (Last of the cluster tests: the killed node rejoins as a replica.) The promoted
    replica has no replica of its own, so the writer does not wait for one
    (``min_replicas_ack: 0``; by default its reservations there would get 503)."""
    async with contextlib.AsyncExitStack() as stack:
        writer = await stack.enter_async_context(started(cluster_url, socket_timeout_s=0.5, min_replicas_ack=0))
        for _ in range(30):  # a watcher that listens on a master (each store picks its node at random)
            watcher = await stack.enter_async_context(started(cluster_url, socket_timeout_s=0.5))
            probe = new_op_id()
            async with watcher.watch(probe):
                listener = await listening_node(cluster, watcher, probe)
            if listener in cluster.master_nodes():
                break
        else:
            pytest.fail("no store listened on a master")
        before = make_record(op_id_on(cluster, listener, writer))
        assert await writer.reserve(before, reserved(before)) is None
        await asyncio.to_thread(wait_in_sync, listener, cluster.replica_of(listener))

        promoted = await asyncio.to_thread(cluster.kill_master, listener)

        stored = await asyncio.wait_for(writer.get(before.op_id), HANG_LIMIT_S)
        assert stored is not None
        assert stored.owner == before.owner
        after = make_record(op_id_on(cluster, promoted, writer))
        assert await asyncio.wait_for(writer.reserve(after, reserved(after)), HANG_LIMIT_S) is None
        async with watcher.watch(after.op_id) as changed:
            assert await listening_node(cluster, watcher, after.op_id) is not listener
            done = outcome(after, State.COMPLETED, response=make_response(b"after the failover"))
            assert await writer.transition(move(done, fence=1)) is None
            await asyncio.wait_for(changed.wait(), WAKE_TIMEOUT_S)
        assert await watcher.count_unresolved() == {State.PENDING: 1, State.UNKNOWN: 0, State.NEEDS_ATTENTION: 0}
    await asyncio.to_thread(cluster.rejoin, listener)


# -- Sentinel -------------------------------------------------------------------------------------


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[SentinelTopology]:
    topology = SentinelTopology(tmp_path / "sentinel")
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()


@slow
async def test_sentinel_store_follows_the_master_through_a_failover(sentinel: SentinelTopology) -> None:
    """The same store object keeps working against the promoted replica (which has
    no replica left to wait for: ``min_replicas_ack: 0``)."""
    async with (
        started(sentinel.url, socket_timeout_s=0.5, min_replicas_ack=0) as store,
        started(sentinel.url) as watcher,
    ):
        first = await reserve_new(store)
        done = await complete(store, first, b'{"ticket": 1}')
        pending = await reserve_new(store)
        wait_in_sync(sentinel.master, sentinel.replica)

        old, new = await asyncio.to_thread(sentinel.failover)

        assert await asyncio.wait_for(store.get(first.op_id), HANG_LIMIT_S) == done
        assert await store.get(pending.op_id) == pending
        rival = make_record(first.op_id, "instance-b:1")
        assert await store.reserve(rival, reserved(rival)) == done.evolve(evidence=())
        second = await asyncio.wait_for(reserve_new(store), HANG_LIMIT_S)
        async with aioredis.Redis(port=new.port) as promoted:
            written = await promoted.get(store.keys.record(second.op_id))
            assert redis_record.unpack(second.op_id, written).owner == second.owner
        # Both pub/sub listeners followed the master too.
        async with aioredis.Redis(port=new.port) as promoted:
            await wait_for_subscribers(promoted, store.keys.keepalive_channel(), 2)
        async with watcher.watch(second.op_id) as changed:
            await complete(store, second, b"after the failover")
            await asyncio.wait_for(changed.wait(), WAKE_TIMEOUT_S)
        assert old.process is None


@slow
async def test_sentinel_lookups_keep_every_sentinel_when_one_is_down(sentinel: SentinelTopology) -> None:
    """Every new connection asks the sentinels for the master. With the first
    sentinel down, concurrent lookups all answer from another one; redis-py
    reorders its sentinel list across an await, which (unguarded) duplicates
    one sentinel in the list and drops another, with its open connections."""
    async with started(sentinel.url) as store:
        lookups = store._sentinel  # type: ignore[union-attr]
        first = lookups.sentinels[0].connection_pool.connection_kwargs["port"]  # the one asked first
        next(node for node in sentinel.sentinels if node.port == first).kill()
        # As many concurrent lookups as new connections after a failover.
        await asyncio.gather(*(lookups.discover_master(SentinelTopology.MASTER_NAME) for _ in range(30)))
        assert len({id(client) for client in lookups.sentinels}) == 3
        assert len(await asyncio.gather(*(reserve_new(store) for _ in range(20)))) == 20


@slow
async def test_sentinel_store_leaves_a_demoted_master_at_once(sentinel: SentinelTopology) -> None:
    """After ``SENTINEL FAILOVER`` the old master keeps accepting writes until
    the sentinels reconfigure it (some 8 s later), and then throws them away.
    The store moves its pooled connections to the new master within a second.
    (``min_replicas_ack: 0``: the new master has no replica until then.)"""
    async with started(sentinel.url, max_connections=4, min_replicas_ack=0) as store:
        # Several pooled connections; more callers than connections wait for one.
        await asyncio.gather(*(reserve_new(store) for _ in range(20)))
        old, new = await asyncio.to_thread(sentinel.failover, kill=False)
        assert role(old) == "master"  # not demoted yet
        await asyncio.sleep(1.0)
        async with aioredis.Redis(port=new.port) as promoted, aioredis.Redis(port=old.port) as demoted:
            records = await asyncio.gather(*(reserve_new(store) for _ in range(8)))
            for record in records:
                key = store.keys.record(record.op_id)
                assert await promoted.exists(key)
                assert not await demoted.exists(key)
            assert role(old) == "master"  # the old master was still taking writes


class Traffic:
    """Agents posting distinct side-effecting operations through the proxy until
    stopped; every answer is kept by key."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.answers: dict[str, list[int]] = {}
        self._stop = asyncio.Event()
        self._agents: list[asyncio.Task[None]] = []

    async def post(self, key: str) -> int:
        response = await self.client.post("/items", json={"key": key}, headers={"Idempotency-Key": key})
        if response.status == 503:
            assert (await response.json(content_type=PROBLEM))["type"] == UNAVAILABLE
        self.answers.setdefault(key, []).append(response.status)
        return response.status

    async def _agent(self, name: int) -> None:
        for n in range(100_000):
            if self._stop.is_set():
                return
            await self.post(f"agent-{name}-op-{n}")

    def start(self, agents: int = 6) -> None:
        self._agents = [asyncio.create_task(self._agent(name)) for name in range(agents)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._agents)

    def statuses(self) -> Counter[int]:
        return Counter(status for statuses in self.answers.values() for status in statuses)

    async def until(self, status: int, count: int) -> None:
        """Until ``count`` answers had ``status`` (bounded)."""
        deadline = time.monotonic() + HANG_LIMIT_S
        while self.statuses()[status] < count:
            assert time.monotonic() < deadline, self.statuses()
            await asyncio.sleep(0.05)

    async def settle(self, key: str) -> None:
        """Retry ``key`` until it is answered 201 (bounded)."""
        deadline = time.monotonic() + 20
        while await self.post(key) != 201:
            assert time.monotonic() < deadline, (key, self.answers[key])
            await asyncio.sleep(0.2)


@slow
@pytest.mark.parametrize("kill", [True, False], ids=["master-killed", "sentinel-failover"])
async def test_sentinel_failover_mid_traffic_never_forwards_without_a_record(
    sentinel: SentinelTopology, upstream: Upstream, aiohttp_client: Callable[..., Awaitable[Client]], kill: bool
) -> None:
    """Distinct operations stream through the proxy while the master fails
    over. Each answer is the tool's 201 or a fail-closed 503; every 201 has its
    record on the promoted master (``min_replicas_ack: 1``: without it, a
    reservation the old master acknowledged but never replicated is lost with
    it); retried with the same key afterwards, every operation ends COMPLETED
    with exactly one effect."""
    route = {
        "prefix": "/",
        "upstream": upstream.url,
        "connect_timeout": "1s",
        "read_timeout": "1s",
        "lease": "3s",
        "wait": "5s",
        "reconcile": {"probe": LOOKUP, "found": {"status": 201}},
    }
    durable = {"socket_timeout_s": 0.5, "min_replicas_ack": 1, "replica_ack_timeout_s": 1.0}
    async with started(sentinel.url, **durable) as store:
        config = parse_config({"store": sentinel.url, "routes": [route]})  # the app uses ``store`` as given
        traffic = Traffic(await aiohttp_client(build_proxy_app(config, store)))
        traffic.start()
        await traffic.until(201, 20)
        old, new = await asyncio.to_thread(sentinel.failover, kill=kill)
        await asyncio.sleep(0.5)
        await traffic.until(503, 1)
        await traffic.stop()

        assert set(traffic.statuses()) == {201, 503}, traffic.statuses()
        effects = Counter(effect.headers["Idempotency-Key"] for effect in upstream.effects)
        assert max(effects.values()) == 1
        async with aioredis.Redis(port=new.port) as promoted:
            for key, statuses in traffic.answers.items():
                if 201 in statuses:
                    assert await promoted.exists(store.keys.record(op_id_for(key))), key

        # The old master comes back as a replica: reservations are durable again.
        if kill:
            await asyncio.to_thread(old.replicate, new.port)
        else:  # what the sentinels do by themselves some 8 s later
            await asyncio.to_thread(old.call, "REPLICAOF", "127.0.0.1", new.port)
        await asyncio.to_thread(wait_in_sync, new, old)
        await asyncio.gather(*(traffic.settle(key) for key in list(traffic.answers)))

        effects = Counter(effect.headers["Idempotency-Key"] for effect in upstream.effects)
        assert effects == dict.fromkeys(traffic.answers, 1)
        for key in traffic.answers:
            record = await store.get(op_id_for(key))
            assert record is not None
            assert record.state is State.COMPLETED, (key, record.state)
        await traffic.client.close()  # the app's background work stops before the store closes


# -- replica acknowledgments (WAIT) ------------------------------------------------------------------


@slow
async def test_a_replica_refuses_reservations_as_unavailable(replicated: tuple[RedisNode, RedisNode]) -> None:
    """A store pointed at a replica (a demoted master) answers READONLY: the
    reservation fails as StoreUnavailable and nothing is recorded anywhere."""
    master, replica = replicated
    async with started(f"redis://127.0.0.1:{replica.port}/0", socket_timeout_s=0.5) as store:
        record = make_record(new_op_id())
        with pytest.raises(StoreUnavailable, match="read only replica"):
            await store.reserve(record, reserved(record))
        assert await store.get(record.op_id) is None
    async with aioredis.Redis(port=master.port) as client:
        assert await client.dbsize() == 0


@slow
async def test_min_replicas_ack_forwards_only_what_a_replica_acknowledged(
    replicated: tuple[RedisNode, RedisNode],
    upstream: Upstream,
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    master, replica = replicated
    url = f"redis://127.0.0.1:{master.port}/0"
    store_config = {"url": url, "min_replicas_ack": 1, "replica_ack_timeout": "1s"}
    config = parse_config({"store": store_config, "routes": [{"prefix": "/", "upstream": upstream.url}]})
    async with started(url, min_replicas_ack=1, replica_ack_timeout_s=1.0) as store:
        client = await aiohttp_client(build_proxy_app(config, store))
        assert (await client.post("/items", json={}, headers={"Idempotency-Key": "a"})).status == 201
        assert upstream.count() == 1

        replica.kill()
        for attempt in (1, 2):  # a fresh reservation, then a take-over of the released record
            refused = await client.post("/items", json={}, headers={"Idempotency-Key": "b"})
            assert refused.status == 503
            assert (await refused.json(content_type=PROBLEM))["type"] == UNAVAILABLE
            record = await store.get(op_id_for("b"))
            assert record is not None
            assert (record.state, record.attempt, record.fence) == (State.RELEASED, 0, attempt)
        assert upstream.count() == 1  # the tool saw nothing

        replica.replicate(master.port)
        await asyncio.to_thread(wait_in_sync, master, replica)
        accepted = await client.post("/items", json={}, headers={"Idempotency-Key": "b"})
        assert accepted.status == 201
        assert upstream.count() == 2
        record = await store.get(op_id_for("b"))
        assert record is not None
        assert (record.state, record.attempt) == (State.COMPLETED, 1)
        assert [entry.kind for entry in record.evidence] == [
            "reserved",
            "not-durable",
            "reserved",
            "not-durable",
            "reserved",
            "completed",
        ]
        await client.close()  # the app's background work stops before the store closes


# -- budget counters in a cluster (appended for idemproxy.budgets) ------------------------------------


@slow
async def test_cluster_charges_an_identity_and_a_task_counter_in_one_script(
    cluster: RedisClusterTopology, cluster_stores: tuple[RedisStore, RedisStore]
) -> None:
    """Every budget counter shares the hash tag {budget}: one slot, so one script charges an
    identity's and a task's counter together, all or none, through any instance."""
    a, b = cluster_stores
    names = [f"identity:agent-{n}" for n in range(16)] + [f"task:run-{n}" for n in range(16)]
    slots = {cluster.running()[0].call("CLUSTER", "KEYSLOT", a.keys.budget(name)) for name in names}
    assert len(slots) == 1

    identity, task = BudgetCounter("identity:agent-1", 2, 60_000), BudgetCounter("task:run-1", 3, 60_000)
    now = int(time.time() * 1000)
    assert await a.charge([identity, task], "one", now) == []
    assert await b.charge([identity, task], "two", now) == []
    assert await a.charge([identity, task], "three", now) == [Full(identity, 60_000)]
    assert await b.charge([task], "four", now) == []  # the refused charge reached no counter
    assert await a.charge([task], "five", now) == [Full(task, 60_000)]
