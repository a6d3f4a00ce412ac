"""Noticing that the ledger itself was lost or replaced, and failing closed until a person says so.

A store can lose every record at once without anyone deleting one: ``FLUSHALL``,
a Redis restarted without persistence, a failover to an empty replica, a store
swapped for another one. Retries of operations that completed would then be
forwarded again. So the first instance writes an epoch
marker into the store (an id and a generation), every instance remembers the
one it saw, and reads it again every second and whenever a record vanished:

- no marker, a marker of another id at a generation not above the one
  remembered, or a marker another instance flagged as lost: the ledger was
  lost. The instance flags the marker as lost (so an instance started later
  fails closed too), forgets the completed answers it keeps in memory, and
  refuses every new reservation with ``503 ledger-lost`` until an operator
  confirms (``idemproxy ops confirm-ledger``);
- a marker of a higher generation: an operator confirmed a loss; accepted.

An instance that never saw a marker accepts the one it finds (or writes the
first). Every write of the marker is a compare-and-set against what was read, so
a flag never undoes a confirmation, nor lowers the generation. What this cannot
see is in docs/stores.md ("Ledger loss").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from idemproxy import background, metrics
from idemproxy.store import Store, StoreUnavailable

log = logging.getLogger(__name__)

MARKER = "epoch"
_ID = re.compile(r"[0-9a-z-]{1,64}")
_MAX_TEXT = 500
#: How often every instance reads the marker again.
CHECK_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class Epoch:
    id: str
    generation: int
    lost: str | None = None  # why an instance found the ledger lost; None while it is trusted
    confirmed_by: str | None = None  # who confirmed the loss that started this generation

    def encode(self) -> bytes:
        return orjson.dumps(
            {"id": self.id, "generation": self.generation, "lost": self.lost, "confirmed_by": self.confirmed_by}
        )

    @classmethod
    def decode(cls, raw: bytes) -> Epoch:
        """The marker as stored; one that idemproxy did not write (or that is damaged) reads
        as a lost ledger, never as a trusted epoch. Its text is checked before anyone sees it."""
        try:
            data = orjson.loads(raw)
            epoch = cls(data["id"], data["generation"], data.get("lost"), data.get("confirmed_by"))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            epoch = None
        if epoch is None or not epoch._well_formed():
            return cls("unreadable", 0, f"the epoch marker is not one idemproxy wrote: {_shown(raw)}")
        return epoch

    def _well_formed(self) -> bool:
        return (
            isinstance(self.id, str)
            and _ID.fullmatch(self.id) is not None
            and type(self.generation) is int
            and self.generation >= 0
            and (self.lost is None or (isinstance(self.lost, str) and len(self.lost) <= _MAX_TEXT))
            and (
                self.confirmed_by is None
                or (isinstance(self.confirmed_by, str) and len(self.confirmed_by) <= _MAX_TEXT)
            )
        )


def _shown(raw: bytes) -> str:
    return raw[:80].decode("ascii", "backslashreplace")


def new_epoch(generation: int, confirmed_by: str | None = None) -> Epoch:
    return Epoch(secrets.token_hex(8), generation, None, confirmed_by)


class LostLedger(StoreUnavailable):
    """The ledger was lost or replaced (``EpochWatch``); nothing is reserved until an
    operator confirms."""


class EpochWatch:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.known: Epoch | None = None
        self.lost: str | None = None
        #: Called once when the ledger is found lost (the completed-answer cache empties itself).
        self.on_lost: list[Callable[[], None]] = []
        #: Set while the ledger is found lost.
        self.found_lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        """Read (or write the first) marker; keep checking it in the background."""
        if self._task is not None:
            return
        with contextlib.suppress(StoreUnavailable):  # checked again every second
            await self.check()
        self._task = asyncio.create_task(self._watch(), name="idemproxy-epoch")

    async def close(self) -> None:
        task, self._task = self._task, None
        await background.stop(task)

    def check_soon(self) -> None:
        """A record vanished: look at the marker now rather than within the second."""
        self._wake.set()

    def refuse_if_lost(self) -> None:
        if self.lost is not None:
            raise LostLedger(self.lost)

    async def check(self) -> None:
        known = self.known
        raw = await self.store.read_marker(MARKER)
        if raw is None and known is None:  # the first instance of a new ledger
            raw = await self.store.swap_marker(MARKER, None, new_epoch(1).encode())
        if self.known is not known:
            return  # a confirmation landed while this read was in flight: read again next time
        current = None if raw is None else Epoch.decode(raw)
        if current is None:
            await self._found_lost("the ledger's epoch marker is gone: the store lost every record", raw, current)
        elif current.lost is not None:
            await self._found_lost(current.lost, raw, current)
        elif known is None or current.id == known.id or current.generation > known.generation:
            self._trust(current)
        else:
            reason = (
                f"the ledger was replaced: epoch {current.id} (generation {current.generation}) "
                f"where {known.id} (generation {known.generation}) was"
            )
            await self._found_lost(reason, raw, current)

    async def confirm(self, by: str) -> Epoch:
        """An operator accepts that the records are gone: a new generation every instance
        trusts. Retries of operations the lost records answered will be forwarded again."""
        for _ in range(5):  # another instance may flag or confirm at the same moment
            raw = await self.store.read_marker(MARKER)
            current = None if raw is None else Epoch.decode(raw)
            floor = max(current.generation if current else 0, self.known.generation if self.known else 0)
            confirmed = new_epoch(floor + 1, confirmed_by=by)
            encoded = confirmed.encode()
            if await self.store.swap_marker(MARKER, raw, encoded) == encoded:
                log.warning("ledger loss confirmed; reservations resume", extra={"by": by, "generation": floor + 1})
                self._trust(confirmed)
                return confirmed
        raise StoreUnavailable("the epoch marker kept changing while it was being confirmed; try again")

    def _trust(self, epoch: Epoch) -> None:
        if self.lost is not None:
            log.warning("the ledger's epoch was confirmed; reservations resume", extra={"epoch": epoch.id})
        self.known = epoch
        self.lost = None
        self.found_lost.clear()
        metrics.LEDGER_LOST.set(0)

    async def _found_lost(self, reason: str, raw: bytes | None, current: Epoch | None) -> None:
        if self.lost is None:
            log.error(
                "the ledger was lost; refusing new reservations until an operator confirms "
                "(idemproxy ops confirm-ledger)",
                extra={"reason": reason},
            )
            for forget in self.on_lost:
                forget()
        self.lost = reason
        self.found_lost.set()
        metrics.LEDGER_LOST.set(1)
        if current is not None and current.lost is not None:
            return  # flagged already
        # Flag the marker, so that an instance started later refuses too: on every check until
        # it holds (a write can fail, or be lost with the store again), never over a change made
        # meanwhile (a confirmation), and never lowering the generation.
        known = self.known
        generation = max(known.generation if known else 0, current.generation if current else 0)
        flagged = Epoch(known.id if known else "lost", generation, reason, None)
        with contextlib.suppress(StoreUnavailable):
            await self.store.swap_marker(MARKER, raw, flagged.encode())

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), CHECK_INTERVAL_S)
            self._wake.clear()
            try:
                await self.check()
            except StoreUnavailable:
                pass  # an outage is not a loss; the reservations themselves fail closed meanwhile
            except Exception:  # this task must outlive any one bad read
                log.exception("checking the ledger's epoch failed")


_WATCHES: weakref.WeakKeyDictionary[Store, EpochWatch] = weakref.WeakKeyDictionary()


def epoch_watch(store: Store) -> EpochWatch:
    """The one watch of ``store``'s epoch in this process: the proxy listener refuses by it,
    the admin listener reports and confirms through it."""
    watch = _WATCHES.get(store)
    if watch is None:
        watch = _WATCHES[store] = EpochWatch(store)
    return watch
