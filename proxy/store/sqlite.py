"""The embedded ledger: one SQLite file in WAL mode, so ``idemproxy run`` needs nothing else.

Every write is committed with ``synchronous=FULL`` (or ``NORMAL``, if configured)
before its caller hears of it: a record is on disk before the request is forwarded.
Writes that arrive while a commit is in flight share the next one
(``idemproxy.store.group_commit``). SQLite calls run on one dedicated thread so the
event loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from idemproxy import background
from idemproxy.config.settings import SQLITE_SYNCHRONOUS_MODES
from idemproxy.lifecycle.records import UNRESOLVED_STATES, Evidence, OperationRecord, State
from idemproxy.lifecycle.transitions import Transition
from idemproxy.store import codec
from idemproxy.store.base import (
    Counter,
    Full,
    Lease,
    OpsQuery,
    RecordMissing,
    RecordNotStorable,
    Store,
    StoreUnavailable,
    matches,
)
from idemproxy.store.clock import AnchoredClock, anchor_for_this_boot
from idemproxy.store.group_commit import GroupCommit

T = TypeVar("T")

#: The schema, as statements that leave what exists alone (run in one transaction).
#: The record columns are ``codec``'s (named after the record's fields); the others
#: are the store's own.
_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS operations (
    op_id          TEXT PRIMARY KEY,
    state          TEXT NOT NULL,
    fence          INTEGER NOT NULL,
    fingerprint    TEXT NOT NULL,
    attempt        INTEGER NOT NULL,
    owner          TEXT NOT NULL,
    lease_until_ms INTEGER NOT NULL,
    meta           BLOB NOT NULL,
    response_body  BLOB,
    request_body   BLOB,
    evidence       BLOB NOT NULL,
    due_ms         INTEGER,  -- when the reconciler must look at it; NULL: not due
    updated_ms     INTEGER NOT NULL,
    expires_ms     INTEGER   -- NULL: kept until resolved
) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS operations_due ON operations (due_ms) WHERE due_ms IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS operations_expiry ON operations (expires_ms) WHERE expires_ms IS NOT NULL",
    """CREATE INDEX IF NOT EXISTS operations_unresolved ON operations (state, updated_ms)
    WHERE state IN ('PENDING', 'UNKNOWN', 'NEEDS_ATTENTION')""",
    """CREATE TABLE IF NOT EXISTS seen (   -- names remembered once (remember_once), until expires_ms
    name       TEXT PRIMARY KEY,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS budget_charges (  -- charges to budget counters, until they slide out
    counter    TEXT NOT NULL,    -- SHA-256 of the counter's name
    charge_id  TEXT NOT NULL,
    at_ms      INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL, -- at_ms + the window it was charged under
    PRIMARY KEY (counter, charge_id)
) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS budget_charges_time ON budget_charges (counter, at_ms)",
    "CREATE INDEX IF NOT EXISTS budget_charges_expiry ON budget_charges (expires_ms)",
    """CREATE TABLE IF NOT EXISTS clock (  -- the store's clock: the host's monotonic clock, per boot
    boot         TEXT PRIMARY KEY,      -- the kernel's boot id
    wall_ms      INTEGER NOT NULL,      -- the wall clock when the first process of the boot opened it,
    monotonic_ms INTEGER NOT NULL       -- and the monotonic clock then
) WITHOUT ROWID""",
)
#: 1: the record columns named ``s f fp a o l m b q e`` (``codec.V1_COLUMNS``); 2: as above.
_SCHEMA_VERSION = 2
#: ``ALTER TABLE ... RENAME COLUMN``, which the migration from version 1 uses.
_RENAME_COLUMN_SQLITE = (3, 25, 0)
_COLUMNS = (*codec.WRITTEN_FIELDS, codec.EVIDENCE)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM operations WHERE op_id = ? AND (expires_ms IS NULL OR expires_ms > ?)"
_INSERT_COLUMNS = (
    f"INTO operations (op_id, {', '.join(_COLUMNS)}, due_ms, updated_ms, expires_ms)"
    f" VALUES (?, {', '.join('?' * len(_COLUMNS))}, ?, ?, NULL)"
)
_INSERT_NEW = f"INSERT OR IGNORE {_INSERT_COLUMNS}"
_REPLACE_EXPIRED = f"INSERT OR REPLACE {_INSERT_COLUMNS}"
_UPDATE = (
    f"UPDATE operations SET {', '.join(f'{name} = ?' for name in codec.WRITTEN_FIELDS)},"
    f" {codec.EVIDENCE} = {codec.EVIDENCE} || ?, due_ms = ?, updated_ms = ?, expires_ms = ?"
    " WHERE op_id = ? AND (expires_ms IS NULL OR expires_ms > ?) AND fence = ? AND state IN ({states})"
    " AND NOT (state = ? AND fence = ? AND owner = ?)"  # already there: a retried transition
)
_PURGE_BATCH = 500
_PURGE_INTERVAL_S = 60.0


class SqliteStore(Store):
    #: Notifications reach waiters in this process at once; waiters in other
    #: processes sharing the file see changes on their next poll.
    poll_interval_s = 0.1

    def __init__(self, path: str | Path, *, synchronous: str = "full") -> None:
        super().__init__()
        if synchronous not in SQLITE_SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS_MODES)}, got {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idemproxy-sqlite")
        self._commits = GroupCommit(self._executor, self._conn)
        self._db: sqlite3.Connection | None = None
        self._purger: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def from_url(cls, url: str, *, synchronous: str = "full") -> SqliteStore:
        if not url.startswith("sqlite:///") or url == "sqlite:///":
            raise ValueError(f"expected sqlite:///PATH, got {url!r}")
        return cls(url.removeprefix("sqlite:///"), synchronous=synchronous)

    async def start(self) -> None:
        await self._run(self._open)
        self._purger = asyncio.create_task(self._purge_forever(), name="idemproxy-sqlite-purge")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await background.stop(self._purger)
        await self._commits.drain()
        if self._db is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._db.close)
        self._executor.shutdown(wait=True)

    # -- the contract ------------------------------------------------------------------

    async def reserve(self, record: OperationRecord, evidence: Evidence) -> OperationRecord | None:
        return await self._write(self._reserve, record, evidence)

    async def transition(self, transition: Transition) -> OperationRecord | None:
        current = await self._write(self._transition, transition)
        if current is None:
            self._notify_local(transition.new.op_id)
        return current

    async def get(self, op_id: str) -> OperationRecord | None:
        return await self._run(self._get, op_id)

    async def renew(self, leases: list[Lease]) -> list[bool]:
        return await self._write(self._renew, leases) if leases else []

    async def note(self, op_id: str, evidence: Evidence) -> bool:
        return await self._write(self._note, op_id, evidence)

    async def due(self, now_ms: int, limit: int) -> list[str]:
        rows = await self._run(
            lambda: (
                self._conn()
                .execute(
                    "SELECT op_id FROM operations WHERE due_ms IS NOT NULL AND due_ms <= ? ORDER BY due_ms LIMIT ?",
                    (now_ms, limit),
                )
                .fetchall()
            )
        )
        return [row[0] for row in rows]

    async def query(self, query: OpsQuery) -> list[OperationRecord]:
        clauses = ["(expires_ms IS NULL OR expires_ms > ?)"]
        params: list[Any] = [self.clock.now_ms()]
        if query.state is not None:
            clauses.append("state = ?")
            params.append(query.state.value)
        if query.updated_before_ms is not None:
            clauses.append("updated_ms < ?")
            params.append(query.updated_before_ms)
        sql = (
            f"SELECT op_id, {', '.join(_COLUMNS)} FROM operations WHERE {' AND '.join(clauses)}"
            " ORDER BY updated_ms DESC"
        )

        def run() -> list[OperationRecord]:
            found: list[OperationRecord] = []
            for row in self._conn().execute(sql, params):
                record = _decode(row[0], row[1:])
                if matches(record, query):
                    found.append(record)
                    if len(found) >= query.limit:
                        break
            return found

        return await self._run(run)

    async def ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        rows = await self._run(
            lambda: (
                self._conn()
                .execute(
                    "SELECT op_id FROM operations WHERE op_id >= ? AND op_id < ?"
                    " AND (expires_ms IS NULL OR expires_ms > ?) ORDER BY op_id LIMIT ?",
                    (prefix, prefix + "g", self.clock.now_ms(), limit),  # "g" follows every hex digit
                )
                .fetchall()
            )
        )
        return [row[0] for row in rows]

    async def count_unresolved(self) -> dict[State, int]:
        rows = await self._run(
            lambda: (
                self._conn()
                .execute(
                    "SELECT state, COUNT(*) FROM operations"
                    " WHERE state IN ('PENDING', 'UNKNOWN', 'NEEDS_ATTENTION') GROUP BY state"
                )
                .fetchall()
            )
        )
        counts = dict.fromkeys(UNRESOLVED_STATES, 0)
        counts.update({State(state): count for state, count in rows})
        return counts

    async def remember_once(self, name: str, ttl_s: float) -> bool:
        return await self._write(self._remember_once, name, max(1, round(ttl_s * 1000)))

    async def charge(self, counters: Sequence[Counter], charge_id: str, now_ms: int) -> list[Full]:
        return await self._write(self._charge, counters, charge_id, now_ms) if counters else []

    async def unreserve(self, op_id: str, owner: str, fence: int) -> bool:
        deleted = await self._write(self._unreserve, op_id, owner, fence)
        if deleted:
            self._notify_local(op_id)
        return deleted

    async def read_marker(self, name: str) -> bytes | None:
        return await self._run(self._read_marker, name)

    async def swap_marker(self, name: str, expected: bytes | None, value: bytes) -> bytes | None:
        return await self._write(self._swap_marker, name, expected, value)

    async def ping(self) -> None:
        await self._run(lambda: self._conn().execute("SELECT 1").fetchone())

    # -- on the store thread -------------------------------------------------------------

    def _markers(self) -> sqlite3.Connection:
        db = self._conn()
        db.execute("CREATE TABLE IF NOT EXISTS markers (name TEXT PRIMARY KEY, value BLOB NOT NULL)")
        return db

    def _read_marker(self, name: str) -> bytes | None:
        row = self._markers().execute("SELECT value FROM markers WHERE name = ?", (name,)).fetchone()
        return None if row is None else bytes(row[0])

    def _swap_marker(self, name: str, expected: bytes | None, value: bytes) -> bytes | None:
        db = self._markers()
        row = db.execute("SELECT value FROM markers WHERE name = ?", (name,)).fetchone()
        current = None if row is None else bytes(row[0])
        if current != expected:
            return current
        db.execute("INSERT OR REPLACE INTO markers (name, value) VALUES (?, ?)", (name, value))
        return value

    def _open(self) -> None:
        if self.path.parent != Path():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        db.execute("PRAGMA busy_timeout=5000")
        try:
            with _immediate(db):  # one transaction: a second process opening the file waits for it
                _prepare(db, self.path)
                self.clock = _anchored_clock(db)
        except BaseException:
            db.close()
            raise
        self._db = db

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreUnavailable("the SQLite store is not open")
        return self._db

    def _reserve(self, record: OperationRecord, evidence: Evidence) -> OperationRecord | None:
        db = self._conn()
        fields = codec.encode(record)
        values = (
            record.op_id,
            *_written(fields),
            codec.encode_evidence(evidence),
            record.lease_until_ms,
            record.updated_ms,
        )
        # A new op id (the usual case) is one statement; the record is read only when there is one.
        if db.execute(_INSERT_NEW, values).rowcount == 1:
            return None
        row = db.execute(_SELECT, (record.op_id, self.clock.now_ms())).fetchone()
        if row is not None:
            existing = _decode(record.op_id, row)
            return None if existing.owner == record.owner else existing.evolve(evidence=())
        db.execute(_REPLACE_EXPIRED, values)  # expired, not yet purged: as if it were gone
        return None

    def _transition(self, transition: Transition) -> OperationRecord | None:
        db = self._conn()
        new = transition.new
        now = self.clock.now_ms()
        fields = codec.encode(new)
        ttl_ms = transition.ttl_ms
        expected = sorted(state.value for state in transition.expect_states)
        # The update checks what the transition expects itself: the record is read (and
        # decoded) only when it does not apply, to say why.
        applied = db.execute(
            _update_where(len(expected), after_the_lease=transition.after_the_lease),
            (
                *_written(fields),
                b"\n" + codec.encode_evidence(transition.evidence),
                transition.due_at_ms or None,
                new.updated_ms,
                now + ttl_ms if ttl_ms else None,
                new.op_id,
                now,
                transition.expect_fence,
                *expected,
                new.state.value,
                new.fence,
                new.owner,
                *((now,) if transition.after_the_lease else ()),
            ),
        ).rowcount
        if applied == 1:
            return None
        row = db.execute(_SELECT, (new.op_id, now)).fetchone()
        if row is None:
            raise RecordMissing(new.op_id)
        current = _decode(new.op_id, row)
        if current.state is new.state and current.fence == new.fence and current.owner == new.owner:
            return None  # a retried call whose first try was applied
        return current.evolve(evidence=())

    def _renew(self, leases: list[Lease]) -> list[bool]:
        db = self._conn()
        renewed: list[bool] = []
        now = self.clock.now_ms()
        for lease in leases:
            until_ms = now + lease.term_ms
            cursor = db.execute(
                "UPDATE operations SET lease_until_ms = ?, due_ms = ? WHERE op_id = ? AND fence = ?"
                " AND owner = ? AND state IN ('PENDING', 'UNKNOWN') AND lease_until_ms > ?",
                (until_ms, until_ms, lease.op_id, lease.fence, lease.owner, now),
            )
            renewed.append(cursor.rowcount == 1)
        return renewed

    def _note(self, op_id: str, evidence: Evidence) -> bool:
        db = self._conn()
        cursor = db.execute(
            "UPDATE operations SET evidence = evidence || ? WHERE op_id = ?",
            (b"\n" + codec.encode_evidence(evidence), op_id),
        )
        return cursor.rowcount == 1

    def _get(self, op_id: str) -> OperationRecord | None:
        row = self._conn().execute(_SELECT, (op_id, self.clock.now_ms())).fetchone()
        return _decode(op_id, row) if row is not None else None

    def _remember_once(self, name: str, ttl_ms: int) -> bool:
        db = self._conn()
        now = self.clock.now_ms()
        db.execute("DELETE FROM seen WHERE name = ? AND expires_ms <= ?", (name, now))
        cursor = db.execute("INSERT OR IGNORE INTO seen (name, expires_ms) VALUES (?, ?)", (name, now + ttl_ms))
        return cursor.rowcount == 1

    def _charge(self, counters: Sequence[Counter], charge_id: str, now: int) -> list[Full]:
        db = self._conn()
        names = [hashlib.sha256(counter.name.encode()).hexdigest() for counter in counters]
        retried = db.execute(
            "SELECT 1 FROM budget_charges WHERE counter = ? AND charge_id = ?", (names[0], charge_id)
        ).fetchone()
        if retried is not None:
            return []
        full: list[Full] = []
        for name, counter in zip(names, counters, strict=True):
            slid_out = now - counter.window_ms
            db.execute("DELETE FROM budget_charges WHERE counter = ? AND at_ms <= ?", (name, slid_out))
            (used,) = db.execute("SELECT COUNT(*) FROM budget_charges WHERE counter = ?", (name,)).fetchone()
            if used >= counter.limit:
                # The charge whose sliding out leaves room for one more.
                (blocking,) = db.execute(
                    "SELECT at_ms FROM budget_charges WHERE counter = ? ORDER BY at_ms LIMIT 1 OFFSET ?",
                    (name, used - counter.limit),
                ).fetchone()
                full.append(Full(counter, max(1, blocking + counter.window_ms - now)))
        if not full:
            rows = [(name, charge_id, now, now + c.window_ms) for name, c in zip(names, counters, strict=True)]
            db.executemany(
                "INSERT INTO budget_charges (counter, charge_id, at_ms, expires_ms) VALUES (?, ?, ?, ?)", rows
            )
        return full

    def _unreserve(self, op_id: str, owner: str, fence: int) -> bool:
        db = self._conn()
        cursor = db.execute(
            "DELETE FROM operations WHERE op_id = ? AND state = 'PENDING' AND fence = ? AND owner = ?",
            (op_id, fence, owner),
        )
        return cursor.rowcount == 1

    def _purge_expired(self) -> int:
        db = self._conn()
        db.execute(
            "DELETE FROM budget_charges WHERE (counter, charge_id) IN"
            " (SELECT counter, charge_id FROM budget_charges WHERE expires_ms <= ? LIMIT ?)",
            (self.clock.now_ms(), _PURGE_BATCH),
        )
        db.execute(
            "DELETE FROM seen WHERE name IN (SELECT name FROM seen WHERE expires_ms <= ? LIMIT ?)",
            (self.clock.now_ms(), _PURGE_BATCH),
        )
        cursor = db.execute(
            "DELETE FROM operations WHERE op_id IN (SELECT op_id FROM operations"
            " WHERE expires_ms IS NOT NULL AND expires_ms <= ? LIMIT ?)",
            (self.clock.now_ms(), _PURGE_BATCH),
        )
        return cursor.rowcount

    # -- plumbing ------------------------------------------------------------------------

    async def _purge_forever(self) -> None:
        while True:
            await asyncio.sleep(_PURGE_INTERVAL_S)
            try:
                while await self._write(self._purge_expired) == _PURGE_BATCH:
                    pass
            except StoreUnavailable:
                continue

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the store thread, outside any transaction (reads)."""
        if self._closed:
            raise StoreUnavailable("the SQLite store is closed")
        with _store_errors():
            return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _write(self, body: Callable[..., T], *args: Any) -> T:
        """``body(*args)`` on the store thread in a write transaction, once committed."""
        if self._closed:
            raise StoreUnavailable("the SQLite store is closed")
        with _store_errors():
            return await self._commits.write(body, *args)


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    try:
        yield
    except sqlite3.DataError as too_big:  # SQLITE_TOOBIG: a value over the length limit, rolled back
        raise RecordNotStorable(f"sqlite: {too_big}") from too_big
    except sqlite3.Error as failed:  # named apart: mypyc gives a name one type per function
        raise StoreUnavailable(f"sqlite: {failed}") from failed


class _immediate:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")


@functools.cache
def _update_where(states: int, *, after_the_lease: bool) -> str:
    """The fenced update of a transition expecting one of ``states`` states; ``after_the_lease``:
    only once the holder's lease has ended."""
    sql = _UPDATE.format(states=", ".join("?" * states))
    return sql + " AND lease_until_ms <= ?" if after_the_lease else sql


def _written(fields: dict[str, str | int | bytes]) -> list[str | int | bytes]:
    """The values of ``codec.WRITTEN_FIELDS``, in that order."""
    return [fields[name] for name in codec.WRITTEN_FIELDS]


def _prepare(db: sqlite3.Connection, path: Path) -> None:
    """Create the schema, or bring a file an earlier version wrote up to this one, inside
    the caller's transaction (nothing of it stays if any step fails).

    Version 1 differs only in the names of the record columns: they are renamed
    (``codec.V1_COLUMNS``), the values left as they are. An idemproxy that still
    reads version 1 refuses the file from then on, and one that had it open
    fails its next statement (no such column): it never reads a record under
    the wrong name."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, 1, _SCHEMA_VERSION):
        raise StoreUnavailable(
            f"{path} holds ledger schema version {version}; this idemproxy reads versions up to "
            f"{_SCHEMA_VERSION}. Use a new file or the matching idemproxy version."
        )
    old = [name for name in _columns(db) if name in codec.V1_COLUMNS]
    if old and sqlite3.sqlite_version_info < _RENAME_COLUMN_SQLITE:
        raise StoreUnavailable(
            f"{path} holds ledger schema version 1, which needs SQLite 3.25 or later to migrate "
            f"(this Python has {sqlite3.sqlite_version})"
        )
    for name in old:
        db.execute(f"ALTER TABLE operations RENAME COLUMN {name} TO {codec.V1_COLUMNS[name]}")
    for statement in _SCHEMA:
        db.execute(statement)
    db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")


def _columns(db: sqlite3.Connection) -> list[str]:
    """The ``operations`` table's column names, none when there is no such table yet."""
    return [row[1] for row in db.execute("PRAGMA table_info(operations)")]


def _anchored_clock(db: sqlite3.Connection) -> AnchoredClock:
    """This boot's clock, anchored by the first process of the boot to open the file (inside
    the caller's transaction, so processes opening it together agree on the anchor)."""
    boot, wall_ms, monotonic_ms = anchor_for_this_boot()
    db.execute("DELETE FROM clock WHERE boot <> ?", (boot,))  # no process of an earlier boot is left
    db.execute(
        "INSERT OR IGNORE INTO clock (boot, wall_ms, monotonic_ms) VALUES (?, ?, ?)", (boot, wall_ms, monotonic_ms)
    )
    wall_ms, monotonic_ms = db.execute("SELECT wall_ms, monotonic_ms FROM clock WHERE boot = ?", (boot,)).fetchone()
    return AnchoredClock(wall_ms, monotonic_ms)


def _decode(op_id: str, row: tuple[Any, ...]) -> OperationRecord:
    return codec.decode(op_id, dict(zip(_COLUMNS, row, strict=True)))
