"""The Redis store on a real Redis Cluster started on loopback (three masters with a replica
each, started once for this module): the contract across two instances, slots, index
spread, notifications across nodes, lost scripts, a master failover, and budget counters
across slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.crc import key_slot

from idemproxy.config.settings import StoreConfig
from idemproxy.ledger.ledger import Ledger, OperationRequest
from idemproxy.lifecycle.records import State
from idemproxy.store import RecordMissing
from idemproxy.store.base import Counter as BudgetCounter
from idemproxy.store.base import Full, Lease, NotDurable, OpsQuery
from idemproxy.store.redis import RedisStore
from idemproxy.store.redis_schema import INDEXED_STATES, NOTE, RENEW, RESERVE, TRANSITION, RedisKeys
from tests.support.records import (
    LEASE_MS,
    WAKE_TIMEOUT_S,
    complete,
    make_record,
    make_response,
    move,
    new_op_id,
    now_ms,
    outcome,
    reserve_new,
    reserved,
    take_over,
)
from tests.support.topologies import (
    RedisClusterTopology,
    RedisNode,
    op_id_on,
    started,
    wait_in_sync,
    wait_until,
)

HANG_LIMIT_S = 10.0
slow = pytest.mark.slow


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
    assert await b.renew([Lease(first.op_id, 1, "instance-a:1", 60_000)]) == [True]
    assert await b.renew([Lease(first.op_id, 1, "instance-b:1", 60_000)]) == [False]
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
    assert await a.renew([Lease(r.op_id, 1, r.owner, 60_000) for r in records]) == [True] * 6  # RENEW
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
            request = OperationRequest(
                blocked.op_id, blocked.scope, blocked.fingerprint, blocked.method, blocked.target, 30.0, 0.0, 3
            )
            # The store reports it; the ledger releases the reservation (the store decides nothing).
            with pytest.raises(NotDurable, match="0 of 1 replicas acknowledged the reservation within 1s"):
                await Ledger(store, "instance-a").begin(request)
            fine = make_record(op_id_on(cluster, masters[1], store))
            assert await store.reserve(fine, reserved(fine)) is None
        finally:
            stalled.process.send_signal(signal.SIGCONT)

        released = await store.get(blocked.op_id)
        assert released is not None
        assert (released.state, released.attempt, released.fence) == (State.RELEASED, 0, 1)
        assert [entry.kind for entry in released.evidence] == ["reserved", "not-durable"]
        assert released.evidence[-1].detail == {"replicas": 0, "required": 1, "owner": "instance-a:1"}
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
async def test_a_slot_moved_between_masters_is_no_failover(cluster: RedisClusterTopology, cluster_url: str) -> None:
    """A slot resharded from one master to another (its keys migrated) changes no master: the
    client follows the slot, and the answers kept in memory are not forgotten
    (``on_ledger_moved`` is not called), since no acknowledged write was lost."""
    async with started(cluster_url, socket_timeout_s=0.5, min_replicas_ack=0) as store:
        ledger_moved: list[None] = []
        store.on_ledger_moved.append(lambda: ledger_moved.append(None))
        source, target = cluster.master_nodes()[:2]
        before = make_record(op_id_on(cluster, source, store))
        assert await store.reserve(before, reserved(before)) is None  # the client knows the slots now
        slot = key_slot(store.keys.record(before.op_id).encode())
        await asyncio.to_thread(cluster.migrate_slot, slot, source, target)
        try:
            after = make_record(f"{before.op_id[:2]}{new_op_id()[2:]}")  # the same hash tag: the same slot
            assert await store.reserve(after, reserved(after)) is None
            moved_with_its_slot = await store.get(before.op_id)
            assert moved_with_its_slot is not None
            assert moved_with_its_slot.owner == before.owner
            assert target.call("EXISTS", store.keys.record(after.op_id)) == 1
            assert ledger_moved == []
        finally:
            await asyncio.to_thread(cluster.migrate_slot, slot, target, source)


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

        ledger_moved: list[None] = []
        writer.on_ledger_moved.append(lambda: ledger_moved.append(None))
        promoted = await asyncio.to_thread(cluster.kill_master, listener)

        stored = await asyncio.wait_for(writer.get(before.op_id), HANG_LIMIT_S)
        assert stored is not None
        assert stored.owner == before.owner
        after = make_record(op_id_on(cluster, promoted, writer))
        assert await asyncio.wait_for(writer.reserve(after, reserved(after)), HANG_LIMIT_S) is None
        assert ledger_moved  # the client found another master: answers kept in memory are forgotten
        async with watcher.watch(after.op_id) as changed:
            assert await listening_node(cluster, watcher, after.op_id) is not listener
            done = outcome(after, State.COMPLETED, response=make_response(b"after the failover"))
            assert await writer.transition(move(done, fence=1)) is None
            await asyncio.wait_for(changed.wait(), WAKE_TIMEOUT_S)
        assert await watcher.count_unresolved() == {State.PENDING: 1, State.UNKNOWN: 0, State.NEEDS_ATTENTION: 0}
    await asyncio.to_thread(cluster.rejoin, listener)


# -- budget counters in a cluster (appended for idemproxy.edge.budgets) ------------------------------------


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
