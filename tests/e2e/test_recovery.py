"""Crashed, paused and competing proxy processes sharing one Redis.

Real ``idemproxy run`` processes are SIGKILLed, SIGSTOPped and raced; after
each scenario the tool performed each operation's side effect at most once
and the ledger agrees with the tool.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from idemproxy.config.settings import StoreConfig
from idemproxy.lifecycle.records import Evidence, OperationRecord, State
from idemproxy.protocol.keys import Scope, operation_id
from idemproxy.store import Store, open_store
from tests.support.processes import read_until
from tests.support.redis_server import free_port
from tests.support.upstream import Effect, Upstream

pytestmark = pytest.mark.slow

LEASE = {"connect_timeout": "500ms", "read_timeout": "2s", "lease": "3s"}
RECONCILE = {
    "probe": {"url": "{upstream}/lookup?key={key}", "match": "matches[0]"},
    "found": {"status": 201},
    "settle": "500ms",  # absence counts 0.5 s after the dead owner's lease ended
}


class ProxyProcess:
    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process = process
        self.url = url

    async def post(self, path: str, key: str) -> tuple[int, bytes, dict[str, str]]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{self.url}{path}", json={}, headers={"Idempotency-Key": key}) as response,
        ):
            return response.status, await response.read(), dict(response.headers)


Launcher = Callable[..., Awaitable[ProxyProcess]]


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[Store]:
    store = open_store(StoreConfig(url=redis_url))
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def launch(redis_url: str, upstream: Upstream, tmp_path: Path) -> AsyncIterator[Launcher]:
    processes: list[asyncio.subprocess.Process] = []

    async def start(**route: Any) -> ProxyProcess:
        listen, admin = free_port(), free_port()
        config = {
            "listen": f"127.0.0.1:{listen}",
            "admin_listen": f"127.0.0.1:{admin}",
            "store": redis_url,
            "routes": [{"prefix": "/", "name": "root", "upstream": upstream.url, **LEASE, **route}],
        }
        path = tmp_path / f"proxy-{listen}.yaml"
        path.write_text(yaml.safe_dump(config))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "idemproxy", "run", "--config", str(path), stderr=asyncio.subprocess.PIPE
        )
        processes.append(process)
        assert process.stderr is not None
        await read_until(process.stderr, b"idemproxy listening")
        # Keep reading its log so a full pipe can never block it.
        asyncio.get_running_loop().create_task(process.stderr.read())
        return ProxyProcess(process, f"http://127.0.0.1:{listen}")

    yield start
    for process in processes:
        if process.returncode is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
            await process.wait()


def op_id(key: str) -> str:
    return operation_id(Scope(caller="anonymous", route="root", key=key))


async def settled(store: Store, key: str, states: set[State], within_s: float = 30) -> OperationRecord:
    record = await store.wait_for(
        op_id(key), time.monotonic() + within_s, lambda current: current is not None and current.state in states
    )
    assert record is not None
    assert record.state in states, record
    return record


@pytest.mark.parametrize("committed", [True, False], ids=["tool-committed", "tool-did-not-commit"])
async def test_proxy_killed_between_forward_and_record(
    launch: Launcher, upstream: Upstream, redis_store: Store, committed: bool
) -> None:
    path = "/gate" if committed else "/flaky"  # /gate performs its effect on arrival, /flaky never does
    first = await launch(reconcile=RECONCILE)
    request = asyncio.create_task(first.post(path, "op-1"))
    await upstream.arrived.wait()
    first.process.kill()  # SIGKILL: the outcome is never recorded
    await first.process.wait()
    with pytest.raises(aiohttp.ClientError):
        await request
    upstream.release.set()
    upstream.flaky_ok = True

    fresh = await launch(reconcile=RECONCILE)
    status, _body, headers = await fresh.post(path, "op-1")  # waits out the dead owner's lease

    assert status == 201
    record = await redis_store.get(op_id("op-1"))
    assert record is not None
    assert record.state is State.COMPLETED
    if committed:
        assert headers["Idempotent-Reconciled"] == "true"
        assert record.reconciled
    else:
        assert record.attempt == 2  # proven absent, so forwarded again
    assert upstream.count() == 1


async def test_zombie_instance_cannot_overwrite_the_new_owners_outcome(
    launch: Launcher, upstream: Upstream, redis_store: Store
) -> None:
    zombie = await launch(reconcile=RECONCILE)
    await launch(reconcile=RECONCILE)  # the healthy instance: its background reconciler takes over
    request = asyncio.create_task(zombie.post("/gate", "op-1"))
    await upstream.arrived.wait()
    zombie.process.send_signal(signal.SIGSTOP)  # paused past its lease: it cannot renew

    taken_over = await settled(redis_store, "op-1", {State.COMPLETED})
    zombie.process.send_signal(signal.SIGCONT)
    upstream.release.set()
    status, _, _ = await request  # the zombie's own late answer reaches its caller...
    record = await redis_store.wait_for(
        op_id("op-1"),
        time.monotonic() + 20,
        lambda current: current is not None and "late-outcome" in [e.kind for e in current.evidence],
    )

    # On waking, its read timer may fire before the tool's answer is read: either way it
    # reports its own view (201, or 504 "outcome unknown") and never a conflicting success.
    assert status in (201, 504)
    assert record is not None
    assert taken_over.reconciled
    assert "reconciler" in taken_over.owner
    # ...but the record keeps the new owner's outcome; the late one is only evidence.
    assert (record.state, record.fence, record.owner) == (State.COMPLETED, taken_over.fence, taken_over.owner)
    assert record.response == taken_over.response
    assert upstream.count() == 1


async def test_two_instances_reconcile_a_batch_of_crashed_operations_exactly_once(
    launch: Launcher, upstream: Upstream, redis_store: Store
) -> None:
    now = int(time.time() * 1000)
    keys = [f"crashed-{n}" for n in range(40)]
    for n, key in enumerate(keys):
        record = OperationRecord(
            op_id=op_id(key),
            scope=Scope(caller="anonymous", route="root", key=key),
            state=State.PENDING,
            fence=1,
            fingerprint="f",
            attempt=1,
            owner="crashed-instance:1",
            lease_until_ms=now - 60_000,  # crashed a minute ago
            method="POST",
            target="/items",
            created_ms=now - 60_000,
            updated_ms=now - 60_000,
            attempt_ms=now - 60_000,
        )
        assert await redis_store.reserve(record, Evidence(now - 60_000, "reserved")) is None
        if n % 2 == 0:  # the crashed instance's request reached the tool for half of them
            upstream.effects.append(Effect("POST", "/items", {"Idempotency-Key": key}, b"{}"))

    await launch(reconcile=RECONCILE)
    await launch(reconcile=RECONCILE)
    records = [await settled(redis_store, key, {State.COMPLETED, State.RELEASED}) for key in keys]

    for n, record in enumerate(records):
        kinds = [evidence.kind for evidence in record.evidence]
        assert kinds.count("claimed") == 1, kinds
        assert kinds.count("probe") == 1, kinds
        assert record.state is (State.COMPLETED if n % 2 == 0 else State.RELEASED)
    owners = {record.owner.split(":reconciler:")[0] for record in records}
    assert upstream.lookups == len(keys)
    assert len(owners) >= 1
    assert upstream.count() == len(keys) // 2
