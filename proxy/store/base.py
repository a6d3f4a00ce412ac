"""The store contract: what every ledger backend persists, atomically.

A store does not decide anything. It creates a record if none exists
(``reserve``), and applies a transition only if the record is still in one of
the expected states with the expected fencing token, and, for a transition that
takes an operation from its holder, once the holder's lease has ended by the
store's own clock (``transition``; ``store.clock``). The
decisions and transitions live in ``idemproxy.lifecycle``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from idemproxy.lifecycle.records import Evidence, OperationRecord, State
from idemproxy.lifecycle.transitions import Transition
from idemproxy.store.clock import StoreClock


class StoreError(Exception):
    """Base class of store failures."""


class StoreUnavailable(StoreError, ConnectionError):
    """The store could not be reached or did not answer in time."""


class NotDurable(StoreUnavailable):
    """The write was applied, but fewer replicas than required acknowledged it in time
    (``min_replicas_ack``): a failover could lose it. A reservation refused so is
    released by the ledger, never forwarded."""

    def __init__(self, acked: int, required: int, timeout_s: float) -> None:
        super().__init__(f"redis: {acked} of {required} replicas acknowledged the reservation within {timeout_s:g}s")
        self.acked = acked
        self.required = required


class RecordNotStorable(StoreError, ValueError):
    """The store cannot hold this record as it is (a value its layout cannot encode, a
    size over its limit); nothing was written. Unlike ``StoreUnavailable``, writing the
    same record again fails the same way."""


class RecordMissing(StoreError, KeyError):
    """A transition named an operation that has no record."""


class StoreUnsafe(StoreError):
    """The store is configured so that it can lose records (``Hazard``), and the
    operator did not accept that: it refuses to start. The message is one line
    naming the node, the setting and the fix."""


@dataclass(frozen=True, slots=True)
class Hazard:
    """A store setting under which records can be lost without anyone deleting them.

    ``reason`` is a metric label (``eviction``); ``detail`` is one line naming the
    node, the setting and the fix. ``accepted``: the operator opted out of the
    refusal (``store.allow_eviction``), so it is reported but fails nothing."""

    reason: str
    detail: str
    accepted: bool = False


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease renewal: if ``owner`` still holds ``op_id`` with ``fence`` and its lease has
    not ended, it ends ``term_ms`` from now by the store's clock."""

    op_id: str
    fence: int
    owner: str
    term_ms: int


@dataclass(frozen=True, slots=True)
class OpsQuery:
    """Which operations an operator wants to see."""

    state: State | None = None
    route: str | None = None
    task: str | None = None
    updated_before_ms: int | None = None
    limit: int = 100
    caller: str | None = None


@dataclass(frozen=True, slots=True)
class Counter:
    """A budget counter: at most ``limit`` charges in any ``window_ms`` (a sliding window).

    ``name`` says whose budget it is (``identity:NAME``, ``task:ID``); stores
    may hash it."""

    name: str
    limit: int
    window_ms: int


@dataclass(frozen=True, slots=True)
class Full:
    """A counter with no room for a charge, and how long until one frees: until the
    charge that keeps it full is a window old (``retry_after_ms``, at least 1)."""

    counter: Counter
    retry_after_ms: int


class Store(ABC):
    """A durable operation ledger backend."""

    #: How often a waiter re-reads a record even without a notification. Stores
    #: whose notifications cross processes make this a rare safety net.
    poll_interval_s: float = 1.0

    def __init__(self) -> None:
        #: The clock every lease, settle window and probe schedule in this store is measured on.
        self.clock = StoreClock()
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._subscriptions: dict[str, asyncio.Future[None]] = {}
        #: Called when the store starts following another copy of the ledger (a replica
        #: promoted in a failover), which may lack writes the old one acknowledged: what was
        #: read from the old one may be gone. Quick and synchronous; they must not raise.
        self.on_ledger_moved: list[Callable[[], None]] = []

    @abstractmethod
    async def reserve(self, record: OperationRecord, evidence: Evidence) -> OperationRecord | None:
        """Create ``record`` if no record has its op id. ``None`` when created
        (or already created by this very owner); otherwise the existing record,
        without its evidence (``get`` has it)."""

    @abstractmethod
    async def transition(self, transition: Transition) -> OperationRecord | None:
        """Apply ``transition``. ``None`` when applied; otherwise the current
        record without its evidence: it shows why the guard failed (the
        state, the fence, or, for ``after_the_lease``, a lease that has not
        ended by the store's own clock).
        ``RecordNotStorable`` when the new record cannot be held (nothing changed)."""

    @abstractmethod
    async def get(self, op_id: str) -> OperationRecord | None:
        """The record, with its evidence, or ``None``."""

    @abstractmethod
    async def renew(self, leases: list[Lease]) -> list[bool]:
        """Extend each lease still held by its owner, and not yet ended by the store's clock
        (one round trip for all); ``False`` where the owner lost the record."""

    @abstractmethod
    async def note(self, op_id: str, evidence: Evidence) -> bool:
        """Append ``evidence`` without changing the record (``False``: no record)."""

    @abstractmethod
    async def due(self, now_ms: int, limit: int) -> list[str]:
        """Op ids the reconciler must look at by ``now_ms``, most overdue first."""

    @abstractmethod
    async def query(self, query: OpsQuery) -> list[OperationRecord]:
        """Records matching ``query``, most recently updated first.

        Unresolved states are listed from an index; COMPLETED and RELEASED
        (or no state) need a bounded scan, for operators only."""

    @abstractmethod
    async def ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        """At most ``limit`` op ids that start with ``prefix`` (lower-case hex), in order: an
        operator's shortened id. A scan where the store keeps no order of ids (Redis)."""

    @abstractmethod
    async def count_unresolved(self) -> dict[State, int]:
        """How many records are PENDING, UNKNOWN and NEEDS_ATTENTION, across instances."""

    @abstractmethod
    async def remember_once(self, name: str, ttl_s: float) -> bool:
        """Remember ``name`` for ``ttl_s`` seconds; ``False`` if it is already remembered
        (by any instance sharing the store). Used to refuse replayed signatures."""

    @abstractmethod
    async def charge(self, counters: Sequence[Counter], charge_id: str, now_ms: int) -> list[Full]:
        """Charge one unit at ``now_ms`` to every counter in ``counters``, or to
        none: atomically, across every instance sharing the store. ``[]`` when
        charged; otherwise every counter that is full, and nothing was charged.
        A retried call with the same ``charge_id`` is charged once."""

    @abstractmethod
    async def unreserve(self, op_id: str, owner: str, fence: int) -> bool:
        """Delete ``op_id``'s record if it is still PENDING, held by ``owner`` with
        ``fence``: a fresh reservation nothing was sent for. Waiters are notified.
        ``False`` when the record is not in that state (or already gone)."""

    @abstractmethod
    async def read_marker(self, name: str) -> bytes | None:
        """The value of the store-wide marker ``name`` (the ledger's epoch), or ``None``."""

    @abstractmethod
    async def swap_marker(self, name: str, expected: bytes | None, value: bytes) -> bytes | None:
        """Set the marker ``name`` to ``value`` if it is still ``expected`` (``None``: there is
        none), atomically; it never expires. Its value afterwards: ``value`` when swapped."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the store answers."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; calling it twice is harmless."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections and start background work."""

    async def read_clock(self) -> None:  # noqa: B027 - optional hook
        """Take a reading of the store's clock (``clock``), for a clock that has none recent
        (``StoreClock.fresh``); ``StoreUnavailable`` when the store does not answer."""

    def hazards(self) -> tuple[Hazard, ...]:
        """What can make this store lose records, as last checked (``/readyz`` fails
        while one is not ``accepted``). Stores that check nothing have none."""
        return ()

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

    async def wait_for(
        self, op_id: str, deadline: float, until: Callable[[OperationRecord | None], bool]
    ) -> OperationRecord | None:
        """The record once ``until(record)`` holds, or as it is at ``deadline``
        (``time.monotonic()``); woken by change notifications, not polling."""
        async with self.watch(op_id) as changed:
            while True:
                changed.clear()
                current = await self.get(op_id)
                remaining = deadline - time.monotonic()
                if until(current) or remaining <= 0:
                    return current
                wake_in = min(remaining, self.poll_interval_s)
                if current is not None and current.lease_until_ms:
                    # Wake when a lease runs out, so its expiry is seen without a notification.
                    wake_in = min(wake_in, max(0.001, (current.lease_until_ms - self.clock.earliest_ms()) / 1000))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), wake_in)

    def _ledger_moved(self) -> None:
        for moved in list(self.on_ledger_moved):
            moved()

    def _notify_local(self, op_id: str) -> None:
        for event in self._watchers.get(op_id, ()):
            event.set()

    async def _subscribe(self, op_id: str) -> None:  # noqa: B027 - optional hook
        """Start receiving other processes' change notifications for ``op_id``."""

    async def _unsubscribe(self, op_id: str) -> None:  # noqa: B027 - optional hook
        """Stop receiving them."""


def matches(record: OperationRecord, query: OpsQuery) -> bool:
    """Whether ``record`` belongs in the answer to ``query`` (shared by the stores)."""
    return (
        (query.state is None or record.state is query.state)
        and (query.route is None or record.scope.route == query.route)
        and (query.task is None or record.scope.task == query.task)
        and (query.caller is None or record.scope.caller == query.caller)
        and (query.updated_before_ms is None or record.updated_ms < query.updated_before_ms)
    )
