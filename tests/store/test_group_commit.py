"""Group commit in the embedded ledger (``idemproxy.store.group_commit``): writes that arrive
while a commit is in flight share the next one, each is still checked against what it
expects, one that fails is undone alone, and a caller hears back only once its write is
committed.

A commit is held "in flight" by parking the store's one thread on an event, so what
queues meanwhile is known exactly."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from idemproxy.cli import main
from idemproxy.config.settings import ConfigError, parse_config
from idemproxy.lifecycle.records import State
from idemproxy.store import RecordMissing, StoreUnavailable, open_store
from idemproxy.store.base import RecordNotStorable
from idemproxy.store.group_commit import GroupCommit
from idemproxy.store.sqlite import SqliteStore
from tests.support.records import make_record, make_response, move, new_op_id, outcome, reserve_new, reserved


@dataclass(frozen=True)
class Commits:
    """What ``idemproxy_ledger_commit_writes`` counted: commits, the writes they held, and
    how many held one write alone."""

    commits: float
    writes: float
    alone: float

    @classmethod
    def now(cls) -> Commits:
        def sample(suffix: str, **labels: str) -> float:
            return REGISTRY.get_sample_value(f"idemproxy_ledger_commit_writes{suffix}", labels) or 0.0

        return cls(sample("_count"), sample("_sum"), sample("_bucket", le="1.0"))


class CommitCounter:
    def __init__(self) -> None:
        self._before = Commits.now()

    def since(self) -> Commits:
        now, before = Commits.now(), self._before
        return Commits(now.commits - before.commits, now.writes - before.writes, now.alone - before.alone)


@pytest.fixture
def commits() -> CommitCounter:
    """The commit metric from here on (it counts for the whole process)."""
    return CommitCounter()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "ledger.db")
    await opened.start()
    yield opened
    await opened.close()


@contextmanager
def store_thread_parked(store: SqliteStore) -> Iterator[None]:
    """The store's thread waits until the block ends: what is sent to it meanwhile queues."""
    release = threading.Event()
    parked = threading.Event()

    def park() -> None:
        parked.set()
        release.wait(10)

    store._executor.submit(park)
    assert parked.wait(10)
    try:
        yield
    finally:
        release.set()


def on_disk(path: Path) -> set[str]:
    """The op ids another connection reads from the file: what is committed."""
    with sqlite3.connect(path) as other:
        return {row[0] for row in other.execute("SELECT op_id FROM operations")}


async def queued(commits: GroupCommit, count: int) -> None:
    """Let the writers just started take their first step (each queues its write there), then
    check that ``count`` writes wait for the next commit."""
    await asyncio.sleep(0)  # one turn of the loop: every task made ready runs once
    assert len(commits._queued) == count


async def test_writes_that_arrive_during_a_commit_share_the_next_one(
    store: SqliteStore, tmp_path: Path, commits: CommitCounter
) -> None:
    records = [make_record(new_op_id()) for _ in range(20)]
    with store_thread_parked(store):
        writes = [asyncio.create_task(store.reserve(record, reserved(record))) for record in records]
        await queued(store._commits, 19)  # the first is in flight (behind the parked thread)
        assert not any(write.done() for write in writes)
    assert await asyncio.gather(*writes) == [None] * 20

    assert commits.since() == Commits(commits=2, writes=20, alone=1)  # the first, then 19 together
    assert on_disk(tmp_path / "ledger.db") == {record.op_id for record in records}


async def test_each_write_in_a_shared_commit_is_checked_against_what_it_expects(store: SqliteStore) -> None:
    """Two owners race for one op id and two fenced transitions race for one record, all in
    one commit: as if they had run one after another."""
    owned = await reserve_new(store, "instance-a:1")
    rival = make_record(new_op_id(), "instance-b:1")
    twin = make_record(rival.op_id, "instance-c:1")
    done = move(outcome(owned, State.COMPLETED, response=make_response(b"{}")), fence=owned.fence)
    stale = move(outcome(owned, State.RELEASED), fence=owned.fence)  # expects PENDING, as the first did
    with store_thread_parked(store):
        writes = asyncio.gather(
            store.reserve(rival, reserved(rival)),
            store.reserve(twin, reserved(twin)),
            store.transition(done),
            store.transition(stale),
        )
        await queued(store._commits, 3)
    first, second, completed, refused = await writes

    assert first is None  # created
    assert second == rival.evolve(evidence=())  # finds the first one's record, in the same commit
    assert completed is None
    assert refused is not None
    assert refused.state is State.COMPLETED
    stored = await store.get(owned.op_id)
    assert stored is not None
    assert stored.state is State.COMPLETED


async def test_a_write_that_fails_is_undone_alone_and_only_its_caller_hears_of_it(
    store: SqliteStore, tmp_path: Path, commits: CommitCounter
) -> None:
    kept = [make_record(new_op_id()) for _ in range(3)]
    too_big = make_record(new_op_id()).evolve(fingerprint="x" * 2000)
    lost = make_record(new_op_id())
    missing = move(outcome(lost, State.RELEASED), fence=lost.fence)
    await asyncio.get_running_loop().run_in_executor(
        store._executor, store._conn().setlimit, sqlite3.SQLITE_LIMIT_LENGTH, 1000
    )
    with store_thread_parked(store):
        writes = asyncio.gather(
            store.reserve(kept[0], reserved(kept[0])),
            store.reserve(too_big, reserved(too_big)),
            store.reserve(kept[1], reserved(kept[1])),
            store.transition(missing),
            store.reserve(kept[2], reserved(kept[2])),
            return_exceptions=True,
        )
        await queued(store._commits, 4)
    results = await writes

    assert results[0] is None
    assert isinstance(results[1], RecordNotStorable)
    assert results[2] is None
    assert isinstance(results[3], RecordMissing)
    assert results[4] is None
    assert commits.since() == Commits(commits=2, writes=5, alone=1)
    assert on_disk(tmp_path / "ledger.db") == {record.op_id for record in kept}


async def test_a_commit_that_fails_fails_every_write_of_its_batch_and_keeps_none(
    store: SqliteStore, tmp_path: Path
) -> None:
    """SQLite rolls a whole transaction back on some errors (a full disk, an I/O error):
    then no write of the batch happened, and every caller is told so."""
    records = [make_record(new_op_id()) for _ in range(3)]

    def fails_like_a_full_disk() -> None:
        db = store._conn()
        db.execute("ROLLBACK")  # what SQLite does itself on SQLITE_FULL
        raise sqlite3.OperationalError("database or disk is full")

    first = make_record(new_op_id())
    with store_thread_parked(store):
        alone = asyncio.ensure_future(store.reserve(first, reserved(first)))
        writes = asyncio.gather(
            store.reserve(records[0], reserved(records[0])),
            store._write(fails_like_a_full_disk),
            store.reserve(records[1], reserved(records[1])),
            store.reserve(records[2], reserved(records[2])),
            return_exceptions=True,
        )
        await queued(store._commits, 4)
    assert await alone is None
    results = await writes

    assert all(isinstance(result, StoreUnavailable) for result in results), results
    assert on_disk(tmp_path / "ledger.db") == {first.op_id}
    assert await store.reserve(records[0], reserved(records[0])) is None  # the store goes on


async def test_a_write_alone_commits_alone(store: SqliteStore, tmp_path: Path, commits: CommitCounter) -> None:
    for _ in range(3):
        await reserve_new(store)
    assert commits.since() == Commits(commits=3, writes=3, alone=3)
    assert len(on_disk(tmp_path / "ledger.db")) == 3


async def test_a_cancelled_caller_does_not_undo_its_write_or_stall_the_others(
    store: SqliteStore, tmp_path: Path
) -> None:
    records = [make_record(new_op_id()) for _ in range(3)]
    with store_thread_parked(store):
        writes = [asyncio.create_task(store.reserve(record, reserved(record))) for record in records]
        await queued(store._commits, 2)
        writes[1].cancel()
    assert await writes[0] is None
    assert await writes[2] is None
    assert writes[1].cancelled()
    assert on_disk(tmp_path / "ledger.db") == {record.op_id for record in records}


async def test_closing_waits_for_queued_writes(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "ledger.db")
    await store.start()
    records = [make_record(new_op_id()) for _ in range(5)]
    with store_thread_parked(store):
        writes = [asyncio.create_task(store.reserve(record, reserved(record))) for record in records]
        await queued(store._commits, 4)
        closing = asyncio.create_task(store.close())
        await asyncio.sleep(0)  # one turn of the loop: close() begins, and waits for the queue
        assert store._closed
        assert not closing.done()
    await closing
    assert [write.result() for write in writes] == [None] * 5
    assert on_disk(tmp_path / "ledger.db") == {record.op_id for record in records}


@pytest.mark.parametrize("mode", ["full", "normal"])
async def test_the_store_runs_with_the_configured_synchronous_mode(tmp_path: Path, mode: str) -> None:
    store = SqliteStore(tmp_path / "ledger.db", synchronous=mode)
    await store.start()
    try:
        level = await store._run(lambda: store._conn().execute("PRAGMA synchronous").fetchone()[0])
        assert level == {"full": 2, "normal": 1}[mode]
    finally:
        await store.close()


def test_an_unknown_synchronous_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous must be one of full, normal, got 'off'"):
        SqliteStore(tmp_path / "ledger.db", synchronous="off")


def test_sqlite_synchronous_is_read_checked_and_reaches_the_store(tmp_path: Path) -> None:
    routes = [{"prefix": "/", "upstream": "http://tool:9000"}]
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    config = parse_config({"store": {"url": url, "sqlite_synchronous": "normal"}, "routes": routes})
    assert config.store.sqlite_synchronous == "normal"
    store = open_store(config.store)
    assert isinstance(store, SqliteStore)
    assert store.synchronous == "normal"
    assert parse_config({"store": url, "routes": routes}).store.sqlite_synchronous == "full"
    with pytest.raises(ConfigError, match=r"store\.sqlite_synchronous: expected full or normal, got str 'off'"):
        parse_config({"store": {"url": url, "sqlite_synchronous": "off"}, "routes": routes})


def test_check_config_says_what_normal_gives_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "idemproxy.yaml"
    store = {"url": "sqlite:///ledger.db", "sqlite_synchronous": "normal"}
    path.write_text(yaml.safe_dump({"store": store, "routes": [{"prefix": "/", "upstream": "http://tool:9000"}]}))
    assert main(["check-config", str(path)]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "sqlite_synchronous" in line]
    assert "power loss" in line
    assert "run the call again" in line
