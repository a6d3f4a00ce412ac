"""Redis failovers under a real ``idemproxy run`` process (the trust issue, items 17 to 20).

A real topology (Sentinel: one master, one replica, three sentinels; or a Redis Cluster of
three masters with a replica each), one proxy process in front of a tool that counts its
effects, and the failover the review ran, on one master: while operations keep coming, its
replica is cut off (paused, its link killed with ``CLIENT KILL TYPE replica``), so the
master takes writes no replica has; then the master is SIGKILLed, the replica that missed
them is woken and promoted, and the old master rejoins as its replica. Just before the cut,
a few operations are held at the tool, so their outcomes are written only after it (the
failover loses those outcomes, not their reservations), and each is then asked again, so
the proxy keeps its answer in memory.

What must hold, on the shipped defaults (``min_replicas_ack`` is 1 with replicas):

- item 17: every operation answered 201 still has its record on the promoted replica; once
  every key is retried until it is answered 201, each key had exactly one effect at the
  tool, and every 201 for a key is its first one (status and body);
- item 18: once the proxy follows the new master, no answer comes from memory that the
  ledger no longer holds: every 201 from then on is the key's final record (its body, and
  ``Idempotent-Reconciled`` exactly when the record was reconciled: an outcome the failover
  lost is found again by a probe);
- items 19 and 20: no answer is a 500 (a store-client failure is a 503 before the forward,
  and an unknown outcome after it).

Checked to fail: with ``min_replicas_ack: 0`` (records lost with the old master, effects
twice), and with the completed-answer cache no longer cleared when the store follows a new
master (answers from memory for outcomes the failover lost).
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.crc import key_slot

from idemproxy.lifecycle.records import OperationRecord, State
from idemproxy.protocol import RECONCILED_HEADER
from idemproxy.store import redis_record
from idemproxy.store.redis_schema import RedisKeys
from tests.chaos.tool import effect_body, reconcile_config
from tests.support.processes import RunningProxy, idemproxy_run, log_line
from tests.support.records import op_id_for
from tests.support.topologies import RedisClusterTopology, RedisNode, SentinelTopology, running, wait_in_sync

pytestmark = pytest.mark.slow

ROUTE = "tool"
KEYS = RedisKeys("idem")
#: What the proxy logs once it follows the promoted replica (``Ledger._ledger_moved``).
MOVED = "the ledger moved to another master"
#: Operations held at the tool across the cut.
HELD = 6
#: Any one request, or wait for a condition, ends within this.
HANG_LIMIT_S = 20.0
AGENTS = 4


class Tool:
    """The tool: one effect per request it completes, answered 201 with a body that its
    ``/effects?key=K`` lookup (the proxy's reconcile probe) re-encodes byte for byte.
    While ``hold`` is on, arriving requests wait before they take effect."""

    def __init__(self) -> None:
        self.url = ""
        self.effects: dict[str, list[int]] = {}
        self.arrived: set[str] = set()
        self._count = 0
        self._released = asyncio.Event()
        self._released.set()

    def hold(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    async def act(self, request: web.Request) -> web.Response:
        await request.read()
        key = request.headers.get("Idempotency-Key", "")
        self.arrived.add(key)
        await self._released.wait()
        self._count += 1
        self.effects.setdefault(key, []).append(self._count)
        return web.Response(body=effect_body(self._count, key), status=201, content_type="application/json")

    async def lookup(self, request: web.Request) -> web.Response:
        key = request.query.get("key", "")
        return web.json_response({"matches": [{"effect_id": n, "key": key} for n in self.effects.get(key, [])]})

    async def until_arrived(self, keys: list[str]) -> None:
        deadline = time.monotonic() + HANG_LIMIT_S
        while not self.arrived.issuperset(keys):
            assert time.monotonic() < deadline, f"not at the tool: {set(keys) - self.arrived}"
            await asyncio.sleep(0.02)  # polling the condition

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/act", self.act)
        app.router.add_get("/effects", self.lookup)
        return app


@pytest.fixture
async def tool(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Tool:
    served = Tool()
    server = await aiohttp_server(served.app())
    served.url = str(server.make_url("")).rstrip("/")
    return served


class Failover(Protocol):
    """One topology's store URL and the steps of the review's failover, on one master."""

    url: str

    def owns(self, key: str) -> bool:
        """Whether ``key``'s operation lives on the master that fails over."""

    def cut(self) -> None:
        """Pause the master's replica and kill its replication link."""

    def fail_over(self) -> RedisNode:
        """Kill the master, wake its replica; once promoted, the replica."""

    def rejoin(self) -> None:
        """Restart the old master as the promoted replica's replica, in sync."""


class SentinelFailover:
    def __init__(self, topology: SentinelTopology) -> None:
        self.topology = topology
        self.url = topology.url
        self._old: RedisNode | None = None
        self._new: RedisNode | None = None

    def owns(self, key: str) -> bool:
        return True

    def cut(self) -> None:
        self.topology.replica.signal(signal.SIGSTOP)
        self.topology.master.call("CLIENT", "KILL", "TYPE", "replica")

    def fail_over(self) -> RedisNode:
        self._old, self._new = self.topology.failover(kill=True, resume=self.topology.replica)
        return self._new

    def rejoin(self) -> None:
        assert self._old is not None
        assert self._new is not None
        self._old.replicate(self._new.port)
        wait_in_sync(self._new, self._old)


class ClusterFailover:
    def __init__(self, cluster: RedisClusterTopology) -> None:
        self.cluster = cluster
        self.url = cluster.url
        self.master = cluster.master_nodes()[0]
        self.replica = cluster.replica_of(self.master)
        shards = self.master.call("CLUSTER", "SLOTS")
        assert isinstance(shards, list)
        self._slots = [(int(low), int(high)) for low, high, owner, *_ in shards if int(owner[1]) == self.master.port]

    def owns(self, key: str) -> bool:
        slot = key_slot(KEYS.record(op_id_for(key, route=ROUTE)).encode())
        return any(low <= slot <= high for low, high in self._slots)

    def cut(self) -> None:
        self.replica.signal(signal.SIGSTOP)
        self.master.call("CLIENT", "KILL", "TYPE", "replica")

    def fail_over(self) -> RedisNode:
        return self.cluster.kill_master(self.master, paused=self.replica)

    def rejoin(self) -> None:
        self.cluster.rejoin(self.master)
        wait_in_sync(self.replica, self.master)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    reconciled: bool
    sent: float  # time.monotonic() when the request was sent


@dataclass
class Traffic:
    """Operations through the proxy, each answer kept by key; ``start`` adds agents that post
    new operations (on the failing master) until stopped."""

    session: aiohttp.ClientSession
    proxy: RunningProxy
    failover: Failover
    answers: dict[str, list[Answer]] = field(default_factory=dict)
    _numbers: Iterator[int] = field(default_factory=itertools.count)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _agents: list[asyncio.Task[None]] = field(default_factory=list)

    def new_keys(self, prefix: str, count: int) -> list[str]:
        keys = (f"{prefix}-{n}" for n in self._numbers)
        return list(itertools.islice((key for key in keys if self.failover.owns(key)), count))

    async def post(self, key: str) -> Answer:
        sent = time.monotonic()
        headers = {"Idempotency-Key": key}
        async with self.session.post(f"{self.proxy.url}/act", json={"key": key}, headers=headers) as response:
            reconciled = response.headers.get(RECONCILED_HEADER) == "true"
            answer = Answer(response.status, await response.read(), reconciled, sent)
        self.answers.setdefault(key, []).append(answer)
        return answer

    async def post_all(self, keys: list[str]) -> list[Answer]:
        return list(await asyncio.gather(*(self.post(key) for key in keys)))

    async def _agent(self, name: int) -> None:
        while not self._stop.is_set():
            (key,) = self.new_keys(f"agent-{name}", 1)
            if (await self.post(key)).status != 201:
                await asyncio.sleep(0.1)  # pacing: a failing store answers at once

    def start(self) -> None:
        self._agents = [asyncio.create_task(self._agent(name)) for name in range(AGENTS)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._agents)

    def statuses(self) -> Counter[int]:
        return Counter(answer.status for answers in self.answers.values() for answer in answers)

    async def until(self, condition: Callable[[Counter[int]], bool], what: str) -> None:
        deadline = time.monotonic() + HANG_LIMIT_S
        while not condition(self.statuses()):
            assert time.monotonic() < deadline, f"{what}: {self.statuses()}"
            await asyncio.sleep(0.05)  # polling the condition

    async def settle(self, key: str) -> None:
        """Retry ``key`` until it is answered 201 (bounded)."""
        deadline = time.monotonic() + HANG_LIMIT_S
        while (await self.post(key)).status != 201:
            assert time.monotonic() < deadline, (key, [answer.status for answer in self.answers[key]])
            await asyncio.sleep(0.2)  # polling the condition


def proxy_settings(tool: Tool) -> dict[str, Any]:
    return {
        "store": {"socket_timeout": "1s", "replica_ack_timeout": "500ms"},
        "routes": [
            {
                "name": ROUTE,
                "prefix": "/",
                "upstream": tool.url,
                "connect_timeout": "500ms",
                "read_timeout": "2s",
                "lease": "3s",
                "wait": "5s",
                "reconcile": reconcile_config(max_probes=20),
            }
        ],
    }


async def record_on(node: RedisNode, key: str) -> OperationRecord | None:
    op_id = op_id_for(key, route=ROUTE)
    async with aioredis.Redis(port=node.port) as client:
        raw = await client.get(KEYS.record(op_id))
    assert raw is None or isinstance(raw, bytes)
    return None if raw is None else redis_record.unpack(op_id, raw)


async def the_review_failover(failover: Failover, tool: Tool, directory: Path) -> None:
    """The scenario of the module docstring, and its assertions."""
    timeout = aiohttp.ClientTimeout(total=HANG_LIMIT_S)
    async with (
        idemproxy_run(proxy_settings(tool), directory, store=failover.url) as proxy,
        aiohttp.ClientSession(timeout=timeout) as session,
    ):
        traffic = Traffic(session, proxy, failover)
        warm = traffic.new_keys("warm", 8)
        assert {answer.status for answer in await traffic.post_all(warm)} == {201}
        assert {answer.status for answer in await traffic.post_all(warm)} == {201}  # kept in memory from now on
        traffic.start()

        held = traffic.new_keys("held", HELD)
        tool.hold()
        firsts = asyncio.gather(*(traffic.post(key) for key in held))
        await tool.until_arrived(held)  # reserved (a replica acknowledged it) and forwarded
        await asyncio.to_thread(failover.cut)
        tool.release()
        assert {answer.status for answer in await firsts} == {201}  # recorded on the master alone
        assert {answer.status for answer in await traffic.post_all(held)} == {201}  # and kept in memory
        answered = sum(traffic.statuses().values())
        await traffic.until(lambda statuses: sum(statuses.values()) >= answered + 8, "traffic during the cut")

        offset = (await asyncio.to_thread(proxy.log.stat)).st_size
        promoted = await asyncio.to_thread(failover.fail_over)
        await log_line(proxy.log, MOVED, HANG_LIMIT_S, after=offset)
        moved_at = time.monotonic()
        assert (await proxy.scrape(session)).value("idemproxy_ledger_failovers_total") >= 1
        for key, answers in list(traffic.answers.items()):
            if any(answer.status == 201 for answer in answers):
                assert await record_on(promoted, key) is not None, f"{key} was answered 201, its record is gone"

        await asyncio.to_thread(failover.rejoin)  # reservations are acknowledged again
        answered_201 = traffic.statuses()[201]
        await traffic.until(lambda statuses: statuses[201] >= answered_201 + 5, "201s once the old master rejoined")
        await traffic.stop()
        await asyncio.gather(*(traffic.settle(key) for key in list(traffic.answers)))

    # Refused before a forward (503) or while an attempt is in flight (409): never a 500, nor a 502.
    assert {status for status in traffic.statuses() if status >= 500} <= {503}, traffic.statuses()
    effects = {key: len(ids) for key, ids in tool.effects.items()}
    assert effects == dict.fromkeys(traffic.answers, 1), {key: n for key, n in effects.items() if n != 1}
    for key, answers in traffic.answers.items():
        ok = [answer for answer in answers if answer.status == 201]
        assert {answer.body for answer in ok} == {ok[0].body}, key
        record = await record_on(promoted, key)
        assert record is not None, key
        assert record.state is State.COMPLETED, (key, record.state)
        assert record.response is not None
        for answer in ok:
            if answer.sent > moved_at:
                assert (answer.body, answer.reconciled) == (record.response.body, record.reconciled), (
                    f"{key}: answered from memory what the ledger no longer holds"
                )
    # The scenario did what it says: the failover lost the held operations' outcomes (found again by a probe).
    held_records = [await record_on(promoted, key) for key in held]
    assert all(record is not None and record.reconciled for record in held_records), held_records


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[SentinelTopology]:
    with running(SentinelTopology(tmp_path / "sentinel")) as topology:
        yield topology


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterTopology]:
    with running(RedisClusterTopology(tmp_path / "cluster")) as topology:
        yield topology


async def test_a_sentinel_failover_to_a_replica_that_missed_writes_runs_every_operation_once(
    sentinel: SentinelTopology, tool: Tool, tmp_path: Path
) -> None:
    """The review's failover behind Sentinel (1 master, 1 replica, 3 sentinels): see the
    module docstring for what it injects and what it asserts."""
    await the_review_failover(SentinelFailover(sentinel), tool, tmp_path)


async def test_a_cluster_failover_to_a_replica_that_missed_writes_runs_every_operation_once(
    cluster: RedisClusterTopology, tool: Tool, tmp_path: Path
) -> None:
    """The review's failover of one master of a Redis Cluster (3 masters, 3 replicas), every
    operation on that master: see the module docstring for what it injects and asserts."""
    await the_review_failover(ClusterFailover(cluster), tool, tmp_path)
