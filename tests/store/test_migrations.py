"""Stores written by the previous layout open, read and keep their guarantees (issue 21, item 4).

The fixtures were written by the version before the readable layouts
(``layout_v1``): an SQLite file of schema version 1 (columns ``s f fp a o l m b q
e``) and a Redis dump. Opening the SQLite file renames its columns in one
transaction (schema version 2); the Redis record was always positional, so its
bytes are exactly what this version writes and nothing needs migrating.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis

from idemproxy.app import build_proxy_app
from idemproxy.lifecycle.records import Evidence, OperationRecord, State, StoredResponse
from idemproxy.lifecycle.transitions import Transition
from idemproxy.store import Store, codec, redis_record, sqlite
from idemproxy.store.base import Lease, OpsQuery, StoreUnavailable
from idemproxy.store.redis import RedisStore
from idemproxy.store.sqlite import SqliteStore
from tests.conftest import proxy_config
from tests.store.layout_v1 import (
    BY_NAME,
    COMPLETED_BODY,
    COMPLETED_KEY,
    PENDING_KEY,
    REQUEST_BODY,
    REQUEST_HEADERS,
    REQUEST_PATH,
    REQUEST_QUERY,
    V1_RECORDS,
    WRITTEN,
)
from tests.support.redis_server import RedisServer
from tests.support.upstream import Upstream

FIXTURES = Path(__file__).parent / "fixtures"
V1_SQLITE = FIXTURES / "ledger-v1.sqlite3"
V1_RDB = "ledger-v1.rdb"
UNRESOLVED = {State.PENDING: 1, State.UNKNOWN: 1, State.NEEDS_ATTENTION: 1}
NOW_MS = 1_900_000_000_000  # after every fixture time, before the pending record's lease ends (2100)


@pytest.fixture
def v1_file(tmp_path: Path) -> Path:
    """A copy of the version-1 SQLite file, not yet opened by this version."""
    path = tmp_path / "ledger.sqlite3"
    shutil.copyfile(V1_SQLITE, path)
    return path


@pytest.fixture
def v1_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server that loaded the version-1 dump."""
    directory = tmp_path / "redis"
    directory.mkdir()
    shutil.copyfile(FIXTURES / V1_RDB, directory / V1_RDB)
    server = RedisServer(directory, extra_args=("--appendonly", "no", "--dbfilename", V1_RDB))
    server.start()
    yield server
    server.kill()


@pytest.fixture(params=["sqlite", "redis"])
async def v1_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Store, str]]:
    """A started store over the version-1 data, and its URL."""
    if request.param == "sqlite":
        path: Path = request.getfixturevalue("v1_file")
        url = f"sqlite:///{path}"
        store: Store = SqliteStore(path)
    else:
        server: RedisServer = request.getfixturevalue("v1_redis")
        url = server.url
        store = RedisStore.from_url(url)
    await store.start()
    yield store, url
    await store.close()


def rows(path: Path) -> dict[str, dict[str, Any]]:
    """Every operation row of the file at ``path``, by op id, under its own column names."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        return {row["op_id"]: dict(row) for row in db.execute("SELECT * FROM operations")}


def user_version(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        version: int = db.execute("PRAGMA user_version").fetchone()[0]
    return version


def schema(path: Path) -> dict[str, Any]:
    """What the file's schema consists of, its text's layout aside."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        indexes = {
            name: " ".join(sql.split())
            for name, sql in db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
        }
        return {
            "columns": {table: db.execute(f"PRAGMA table_xinfo({table})").fetchall() for table in tables},
            "indexes": indexes,
        }


# -- every record reads back the same, in both stores ---------------------------------------------


async def test_every_record_the_previous_version_wrote_reads_back_the_same(v1_store: tuple[Store, str]) -> None:
    store, _ = v1_store

    for op_id, expected in V1_RECORDS.items():
        assert await store.get(op_id) == expected, op_id
    assert await store.count_unresolved() == UNRESOLVED
    listed = await store.query(OpsQuery(state=State.COMPLETED, limit=10))
    assert {record.op_id for record in listed} == {
        op_id for op_id, record in V1_RECORDS.items() if record.state is State.COMPLETED
    }
    due = await store.due(NOW_MS * 10, 10)
    assert set(due) == {BY_NAME["pending"].op_id, BY_NAME["unknown"].op_id}


async def test_non_utf8_header_bytes_of_the_previous_version_come_back_as_they_were_sent(
    v1_store: tuple[Store, str],
) -> None:
    store, _ = v1_store

    completed = await store.get(BY_NAME["completed"].op_id)
    assert completed is not None
    assert completed.response is not None
    sent = [(name.encode(), value.encode("utf-8", "surrogateescape")) for name, value in completed.response.headers]
    assert (b"X-Foo", b"\xff\xfe") in sent
    assert (b"X-High", bytes(range(0x80, 0x100))) in sent
    big = await store.get(BY_NAME["reconciled-big"].op_id)
    assert big is not None
    assert big.request is not None
    assert (b"X-\xff", "\u2713".encode()) in [
        (name.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape"))
        for name, value in big.request.headers
    ]


# -- and keeps the proxy's guarantees ---------------------------------------------------------------


async def test_a_completed_record_of_the_previous_version_replays_without_reaching_the_tool(
    v1_store: tuple[Store, str], aiohttp_client: Any, upstream: Upstream
) -> None:
    store, url = v1_store
    client = await aiohttp_client(build_proxy_app(proxy_config(upstream.url, url, wait="0s"), store))

    replay = await client.post(
        f"{REQUEST_PATH}?{REQUEST_QUERY}",
        data=REQUEST_BODY,
        headers={**REQUEST_HEADERS, "Idempotency-Key": COMPLETED_KEY},
    )

    assert (replay.status, await replay.read()) == (201, COMPLETED_BODY)
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert (b"X-Foo", b"\xff\xfe") in replay.raw_headers
    assert (b"X-High", bytes(range(0x80, 0x100))) in replay.raw_headers
    assert upstream.count() == 0


async def test_a_pending_record_of_the_previous_version_is_in_progress_and_finished_with_its_fence(
    v1_store: tuple[Store, str], aiohttp_client: Any, upstream: Upstream
) -> None:
    store, url = v1_store
    pending = V1_RECORDS[BY_NAME["pending"].op_id]
    client = await aiohttp_client(build_proxy_app(proxy_config(upstream.url, url, wait="0s"), store))
    target = f"{REQUEST_PATH}?{REQUEST_QUERY}"
    headers = {**REQUEST_HEADERS, "Idempotency-Key": PENDING_KEY}

    busy = await client.post(target, data=REQUEST_BODY, headers=headers)
    assert busy.status == 409
    problem = await busy.json(content_type="application/problem+json")
    assert problem["type"] == "urn:idemproxy:problem:operation-in-flight"
    assert upstream.count() == 0

    lease = Lease(pending.op_id, pending.fence, pending.owner, 600_000)
    stale = Lease(pending.op_id, pending.fence - 1, pending.owner, 600_000)
    assert await store.renew([lease, stale]) == [True, False]
    renewed = await store.get(pending.op_id)
    assert renewed is not None
    assert renewed.lease_until_ms >= store.clock.earliest_ms() + 590_000
    body = b'{"id":"tkt_2"}'
    response = StoredResponse(201, (("Content-Type", "application/json"),), body, len(body), "0" * 64)
    done = pending.evolve(state=State.COMPLETED, response=response, lease_until_ms=0, updated_ms=NOW_MS, evidence=())
    finished = Evidence(NOW_MS, "completed", {"status": 201})
    late = Transition(done, pending.fence - 1, frozenset({State.PENDING}), finished)
    assert await store.transition(late) == pending.evolve(lease_until_ms=renewed.lease_until_ms, evidence=())
    assert await store.transition(Transition(done, pending.fence, frozenset({State.PENDING}), finished)) is None

    stored = await store.get(pending.op_id)
    assert stored == done.evolve(evidence=(*pending.evidence, finished))
    replay = await client.post(target, data=REQUEST_BODY, headers=headers)
    assert (replay.status, await replay.read()) == (201, body)
    assert upstream.count() == 0


# -- SQLite: the migration on open ------------------------------------------------------------------


async def test_opening_a_version_1_file_renames_its_columns_and_keeps_every_value(
    v1_file: Path, tmp_path: Path
) -> None:
    before = rows(v1_file)
    assert user_version(v1_file) == 1
    store = SqliteStore(v1_file)
    await store.start()
    await store.close()
    fresh = SqliteStore(tmp_path / "fresh.sqlite3")
    await fresh.start()
    await fresh.close()

    after = rows(v1_file)
    assert user_version(v1_file) == 2
    assert schema(v1_file) == schema(fresh.path)
    assert after.keys() == before.keys() == V1_RECORDS.keys()
    for op_id, old in before.items():
        renamed = {codec.V1_COLUMNS.get(name, name): value for name, value in old.items()}
        assert after[op_id] == renamed, op_id


async def test_the_migration_is_one_transaction(v1_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure part way leaves the file as version 1 wrote it; the next open migrates it."""
    before = rows(v1_file)
    monkeypatch.setattr(sqlite, "_SCHEMA", (*sqlite._SCHEMA, "SELECT no_such_function()"))
    failing = SqliteStore(v1_file)
    with pytest.raises(StoreUnavailable):
        await failing.start()
    await failing.close()

    assert (user_version(v1_file), rows(v1_file)) == (1, before)
    monkeypatch.undo()
    store = SqliteStore(v1_file)
    await store.start()
    try:
        assert await store.get(BY_NAME["completed"].op_id) == V1_RECORDS[BY_NAME["completed"].op_id]
    finally:
        await store.close()
    assert user_version(v1_file) == 2


async def test_a_migrated_file_opens_as_it_is(v1_file: Path) -> None:
    for _ in range(2):
        store = SqliteStore(v1_file)
        await store.start()
        await store.close()
        migrated = (user_version(v1_file), schema(v1_file), rows(v1_file))
    assert migrated[0] == 2
    store = SqliteStore(v1_file)
    await store.start()
    await store.close()
    assert (user_version(v1_file), schema(v1_file), rows(v1_file)) == migrated


async def test_two_processes_opening_a_version_1_file_at_once_migrate_it_once(v1_file: Path) -> None:
    stores = [SqliteStore(v1_file), SqliteStore(v1_file)]
    try:
        await asyncio.gather(*(store.start() for store in stores))
        for store in stores:
            assert await store.get(BY_NAME["pending"].op_id) == V1_RECORDS[BY_NAME["pending"].op_id]
    finally:
        for store in stores:
            await store.close()
    assert user_version(v1_file) == 2


async def test_a_file_of_a_newer_schema_is_refused_and_left_alone(v1_file: Path) -> None:
    with contextlib.closing(sqlite3.connect(v1_file)) as db:
        db.execute("PRAGMA user_version=3")
    before = (schema(v1_file), rows(v1_file))
    store = SqliteStore(v1_file)

    with pytest.raises(StoreUnavailable, match="schema version 3"):
        await store.start()
    await store.close()
    assert (user_version(v1_file), schema(v1_file), rows(v1_file)) == (3, *before)


async def test_an_instance_of_the_previous_version_never_reads_a_migrated_file(v1_file: Path) -> None:
    """Rolling upgrade: version 1 reads its columns by name (``s``, ``f``, ...), so a
    connection it already had fails its next statement once the columns are renamed
    (``StoreUnavailable``: 503, nothing forwarded), and it refuses to open the file
    again (it reads only ``user_version`` 0 and 1)."""
    old_select = "SELECT s, f, fp, a, o, l, m, b, q, e FROM operations WHERE op_id = ?"
    op_id = BY_NAME["pending"].op_id
    with contextlib.closing(sqlite3.connect(v1_file, isolation_level=None)) as old:
        assert old.execute(old_select, (op_id,)).fetchone()[0] == "PENDING"
        store = SqliteStore(v1_file)
        await store.start()
        try:
            with pytest.raises(sqlite3.OperationalError, match="no such column"):
                old.execute(old_select, (op_id,)).fetchone()
            assert await store.get(op_id) == V1_RECORDS[op_id]
        finally:
            await store.close()
    assert user_version(v1_file) not in (0, 1)


# -- Redis: the previous version's values are this version's ------------------------------------


def test_each_redis_value_of_the_previous_version_is_byte_for_byte_what_this_version_writes(
    v1_redis: RedisServer,
) -> None:
    """Only positions are stored (``redis_record.FIELDS`` names them in code), so the
    readable names change no byte: both versions read and write the same values during a
    rolling upgrade, and there is nothing to migrate. (The evidence element is the one the
    scripts re-pack on every transition, with ``cmsgpack``'s own string header: compared
    by its content.)"""
    keys = RedisStore.from_url(v1_redis.url).keys
    with redis.Redis(port=v1_redis.port) as client:
        for written in WRITTEN:
            value = client.get(keys.record(written.op_id))
            assert isinstance(value, bytes)
            expected = written.expected
            head = redis_record.pack_head(expected)
            assert value[: len(head)] == head, written.name
            evidence = b"".join(redis_record.pack_evidence(entry) for entry in expected.evidence)
            assert msgpack.unpackb(value[len(head) :], raw=True) == evidence, written.name


def test_the_scripts_name_the_positions_the_record_is_packed_in() -> None:
    record: OperationRecord = V1_RECORDS[BY_NAME["pending"].op_id]
    unpacked = msgpack.unpackb(redis_record.pack(record, b"e"), raw=True)
    by_name = dict(zip(redis_record.FIELDS, unpacked, strict=True))
    assert (by_name["state"], by_name["fence"], by_name["owner"], by_name["lease_until_ms"], by_name["evidence"]) == (
        b"PENDING",
        record.fence,
        record.owner.encode(),
        record.lease_until_ms,
        b"e",
    )
    assert [redis_record.LUA_POSITIONS[name] - 1 for name in redis_record.FIELDS] == list(range(8))
