"""The store contract: what every ledger backend persists, atomically.

A store does not decide anything. It creates a record if none exists
(``reserve``), and applies a transition only if the record is still in one of
the expected states with the expected fencing token (``transition``). The
decisions live in ``idemproxy.decisions``.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from idemproxy.records import UNRESOLVED_STATES, Evidence, OperationRecord, State


class StoreError(Exception):
    """Base class of store failures."""


class StoreUnavailable(StoreError, ConnectionError):
    """The store could not be reached or did not answer in time."""


class RecordMissing(StoreError, KeyError):
    """A transition named an operation that has no record."""


@dataclass(frozen=True, slots=True)
class Transition:
    """Replace the record with ``new`` if it is in ``expect_states`` with ``expect_fence``.

    ``ttl_s`` is how long the new record is kept (``None``: until resolved;
    unresolved states are never given a TTL). ``evidence`` is appended.
    """

    new: OperationRecord
    expect_fence: int
    expect_states: frozenset[State]
    evidence: Evidence
    ttl_s: float | None = None

    @property
    def ttl_ms(self) -> int:
        """The expiry to set in ms, 0 for none: an unresolved record never expires."""
        if self.new.state in UNRESOLVED_STATES or not self.ttl_s:
            return 0
        return round(self.ttl_s * 1000)


class Store(ABC):
    """A durable operation ledger backend."""

    #: How often a waiter re-reads a record even without a notification. Stores
    #: whose notifications cross processes make this a rare safety net.
    poll_interval_s: float = 1.0

    def __init__(self) -> None:
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._subscriptions: dict[str, asyncio.Future[None]] = {}

    @abstractmethod
    async def reserve(self, record: OperationRecord, evidence: Evidence) -> OperationRecord | None:
        """Create ``record`` if no record has its op id. ``None`` when created
        (or already created by this very owner); otherwise the existing record."""

    @abstractmethod
    async def transition(self, transition: Transition) -> OperationRecord | None:
        """Apply ``transition``. ``None`` when applied; otherwise the current
        record (``None`` fields aside, it shows why the guard failed)."""

    @abstractmethod
    async def get(self, op_id: str) -> OperationRecord | None:
        """The record, with its evidence, or ``None``."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the store answers."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; calling it twice is harmless."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections and start background work."""

    # -- change notifications -------------------------------------------------------

    @asynccontextmanager
    async def watch(self, op_id: str) -> AsyncIterator[asyncio.Event]:
        """An event set whenever ``op_id``'s record may have changed.

        Subscribe before reading the record, so a change between the read and
        the wait is never missed.
        """
        event = asyncio.Event()
        watchers = self._watchers.get(op_id)
        if watchers is None:
            watchers = self._watchers[op_id] = set()
            self._subscriptions[op_id] = asyncio.ensure_future(self._subscribe(op_id))
        watchers.add(event)
        subscribed = self._subscriptions[op_id]
        try:
            # Every watcher waits for the one subscription, so none reads the
            # record before notifications for it can arrive.
            await asyncio.shield(subscribed)
            yield event
        finally:
            watchers.discard(event)
            if not watchers:
                del self._watchers[op_id]
                del self._subscriptions[op_id]
                if subscribed.done() and not subscribed.cancelled() and subscribed.exception() is None:
                    await self._unsubscribe(op_id)

    def _notify_local(self, op_id: str) -> None:
        for event in self._watchers.get(op_id, ()):
            event.set()

    async def _subscribe(self, op_id: str) -> None:  # noqa: B027 - optional hook
        """Start receiving other processes' change notifications for ``op_id``."""

    async def _unsubscribe(self, op_id: str) -> None:  # noqa: B027 - optional hook
        """Stop receiving them."""
