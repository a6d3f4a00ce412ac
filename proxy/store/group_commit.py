"""Group commit for the embedded ledger: writes that arrive while a commit is on its way
to disk share the next one.

With ``synchronous=FULL`` every commit waits for the disk (the WAL is synced), and
that wait, not the statements, bounds how many transitions one SQLite file takes
per second. So writes queue here, on the event loop, while one transaction is in
flight; when it is on disk, everything queued meanwhile goes into the next one
(one ``BEGIN IMMEDIATE ... COMMIT``, one sync). Nothing waits on purpose to fill
a batch: at one write at a time each commits alone, as before.

Inside a shared transaction each write runs in its own savepoint, so one that
fails (a transition that finds its record gone, a value over SQLite's length
limit) is undone alone and its caller alone gets the error; the others commit.
Each write still reads what it changes inside the transaction and checks it
against what it expects, exactly as when it had the transaction to itself. A
caller is answered only once the commit holding its write returned, so what it
was told is on disk is on disk; if the commit itself fails, every write of the
batch is reported failed and none of them happened.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from idemproxy import metrics

T = TypeVar("T")

#: What a write gave: its result, or the exception it raised (its savepoint undone).
_Outcome = tuple[Any, BaseException | None]


class GroupCommit:
    def __init__(self, executor: Executor, connection: Callable[[], sqlite3.Connection]) -> None:
        self._executor = executor
        self._connection = connection
        self._queued: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self._in_flight: asyncio.Future[list[_Outcome]] | None = None

    async def write(self, body: Callable[..., T], *args: Any) -> T:
        """Run ``body(*args)`` on the store thread inside a write transaction; its result
        once that transaction is committed."""
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queued.append((functools.partial(body, *args), done))
        if self._in_flight is None:
            self._commit_queued()
        return await done

    async def drain(self) -> None:
        """Until every write queued so far is committed (or failed)."""
        while self._in_flight is not None:
            await asyncio.wait([self._in_flight])

    def _commit_queued(self) -> None:
        batch, self._queued = self._queued, []
        metrics.LEDGER_COMMIT_WRITES.observe(len(batch))
        loop = asyncio.get_running_loop()
        self._in_flight = loop.run_in_executor(self._executor, self._apply, [body for body, _ in batch])
        self._in_flight.add_done_callback(functools.partial(self._answer, batch))

    def _answer(self, batch: list[tuple[Callable[[], Any], asyncio.Future[Any]]], commit: asyncio.Future[Any]) -> None:
        self._in_flight = None
        failure = commit.exception() if not commit.cancelled() else asyncio.CancelledError()
        outcomes: list[_Outcome] = [(None, failure)] * len(batch) if failure is not None else commit.result()
        for (_, done), (result, error) in zip(batch, outcomes, strict=True):
            if done.done():  # its caller was cancelled; the write happened all the same
                continue
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)
        if self._queued:
            self._commit_queued()

    def _apply(self, batch: list[Callable[[], Any]]) -> list[_Outcome]:
        """On the store thread: the batch in one transaction, each write in its own savepoint."""
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            if len(batch) == 1:  # alone in its transaction: no savepoint needed
                outcomes = [_run_alone(db, batch[0])]
            else:
                outcomes = [_run_in_savepoint(db, body) for body in batch]
            if db.in_transaction:
                db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return outcomes


def _run_alone(db: sqlite3.Connection, body: Callable[[], Any]) -> _Outcome:
    try:
        return body(), None
    except Exception as exc:
        if db.in_transaction:
            db.execute("ROLLBACK")
        return None, exc


def _run_in_savepoint(db: sqlite3.Connection, body: Callable[[], Any]) -> _Outcome:
    db.execute("SAVEPOINT write")
    try:
        outcome: _Outcome = (body(), None)
    except Exception as exc:
        if not db.in_transaction:  # SQLite rolled the whole transaction back (a full disk, I/O)
            raise
        db.execute("ROLLBACK TO write")
        outcome = (None, exc)
    db.execute("RELEASE write")
    return outcome
