"""The ledger: reserve an operation before forwarding, record its outcome after.

It joins the pure decisions (``idemproxy.lifecycle.decisions``) to a store. ``begin``
either makes the caller the owner of a new attempt or says what the caller
gets instead (replay, wait result, conflict ...); ``finish`` records the
attempt's outcome, guarded by the owner's fencing token.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any, Protocol

from idemproxy import metrics
from idemproxy.ledger.completed_cache import CompletedCache
from idemproxy.ledger.epoch import EpochWatch
from idemproxy.ledger.leases import LeaseKeeper
from idemproxy.lifecycle import transitions
from idemproxy.lifecycle.decisions import Action, Outcome, decide
from idemproxy.lifecycle.records import Evidence, OperationRecord, State, StoredRequest, StoredResponse
from idemproxy.lifecycle.transitions import Transition, Unreserve
from idemproxy.protocol.keys import Scope
from idemproxy.store import Store, StoreUnavailable
from idemproxy.store.base import NotDurable, RecordMissing, RecordNotStorable

log = logging.getLogger(__name__)

_FINISH_RETRY_DELAYS_S = (0.05, 0.2, 0.5, 1.0)
#: The lease of a vanished record put back to write its outcome: only a crash in between
#: leaves it PENDING, and its expiry then hands it to the reconciler.
_RECREATE_LEASE_MS = 10_000
#: How long a reservation released for want of replica acknowledgments is kept when its
#: route keeps nothing (the default retention): its fingerprint and evidence stay visible.
_NOT_DURABLE_TTL_S = 86400.0
#: ``StoredResponse.not_stored_reason`` of a response recorded without its headers and body
#: (callers see it): the store refused it as it is, or failed otherwise.
NOT_STORABLE = "the store cannot hold it"
STORING_FAILED = "storing it failed"
#: How much of the error that kept an outcome from being stored its evidence quotes.
_CAUSE_MAX = 300


@dataclass(frozen=True, slots=True, init=False)
class Owned:
    """The caller owns ``record`` (PENDING, fresh lease) and must forward, then ``finish``."""

    record: OperationRecord

    def __init__(self, record: OperationRecord) -> None:  # compiled by mypyc, unlike a generated one
        object.__setattr__(self, "record", record)


@dataclass(frozen=True, slots=True)
class Answered:
    """The caller must not forward; ``action`` on ``record`` says what it gets."""

    action: Action
    record: OperationRecord
    waited: bool = False
    reconciled: bool = False  # reconciliation ran for this request


@dataclass(frozen=True, slots=True, init=False)
class OperationRequest:
    op_id: str
    scope: Scope
    fingerprint: str
    method: str
    target: str
    lease_s: float
    wait_s: float
    max_attempts: int
    stored_request: StoredRequest | None = None  # kept when the route reconciles with it
    retention_s: float = 0.0  # how long the route keeps a completed record (0: not kept in memory)

    def __init__(  # compiled by mypyc, unlike a generated one
        self,
        op_id: str,
        scope: Scope,
        fingerprint: str,
        method: str,
        target: str,
        lease_s: float,
        wait_s: float,
        max_attempts: int,
        stored_request: StoredRequest | None = None,
        retention_s: float = 0.0,
    ) -> None:
        object.__setattr__(self, "op_id", op_id)
        object.__setattr__(self, "scope", scope)
        object.__setattr__(self, "fingerprint", fingerprint)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "lease_s", lease_s)
        object.__setattr__(self, "wait_s", wait_s)
        object.__setattr__(self, "max_attempts", max_attempts)
        object.__setattr__(self, "stored_request", stored_request)
        object.__setattr__(self, "retention_s", retention_s)


class OnDemandReconciler(Protocol):
    async def on_demand(self, record: OperationRecord) -> OperationRecord: ...


def new_instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Ledger:
    def __init__(
        self,
        store: Store,
        instance_id: str | None = None,
        reconciler: OnDemandReconciler | None = None,
        completed: CompletedCache | None = None,
        epoch: EpochWatch | None = None,
    ) -> None:
        self.store = store
        self.completed = completed
        self.epoch = epoch
        if epoch is not None and completed is not None:
            epoch.on_lost.append(completed.clear)  # the answers it kept may be all that is left
        self.instance_id = instance_id or new_instance_id()
        self.reconciler = reconciler
        self.leases = LeaseKeeper(store)
        if epoch is not None:
            self.leases.on_vanished = epoch.check_soon  # one record vanished, or all of them?
        self._on_ledger_moved = self._ledger_moved  # one object, to be removed again by close
        store.on_ledger_moved.append(self._on_ledger_moved)
        self._attempts = itertools.count(1)

    def start(self) -> None:
        self.leases.start()

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.store.on_ledger_moved.remove(self._on_ledger_moved)
        await self.leases.close()

    def _ledger_moved(self) -> None:
        """The store follows another copy of the ledger (a failover): answers kept in memory
        may be ones it lost, and are forgotten (a retry asks the store again). The epoch is
        checked at once (was the whole ledger lost?)."""
        forgotten = 0
        if self.completed is not None:
            forgotten = len(self.completed)
            self.completed.clear()
        metrics.LEDGER_FAILOVERS.inc()
        log.warning(
            "the ledger moved to another master (a failover); answers kept in memory are forgotten",
            extra={"forgotten": forgotten},
        )
        if self.epoch is not None:
            self.epoch.check_soon()

    def _no_longer_waiting(self, record: OperationRecord | None, request: OperationRequest) -> bool:
        if record is None:
            return True
        return (
            decide(record, request.fingerprint, self.store.clock.earliest_ms(), request.max_attempts) is not Action.WAIT
        )

    def _new_owner(self) -> str:
        return f"{self.instance_id}:{next(self._attempts)}"

    def _own(self, record: OperationRecord, request: OperationRequest, requested_at: float) -> Owned:
        self.leases.hold(record, request.lease_s, requested_at)
        metrics.IN_FLIGHT.inc()
        return Owned(record)

    async def begin(self, request: OperationRequest) -> Owned | Answered:
        """Reserve ``request``'s operation, or say why it must not be forwarded."""
        if self.epoch is not None:
            self.epoch.refuse_if_lost()  # LostLedger
        clock = self.store.clock
        if self.completed is not None and (completed := self.completed.get(request.op_id)) is not None:
            return Answered(decide(completed, request.fingerprint, clock.now_ms(), request.max_attempts), completed)
        if not clock.fresh:
            # Before the first reservation, or after a long idle spell: leases are written in
            # the store's time, which this instance's clock may be far from.
            with contextlib.suppress(StoreUnavailable):  # then the reservation fails the same way
                await self.store.read_clock()
        now = clock.now_ms()
        requested_at = time.monotonic()
        reservation = transitions.reserve(
            request.op_id,
            request.scope,
            request.fingerprint,
            request.method,
            request.target,
            self._new_owner(),
            clock.latest_ms(requested_at) + round(request.lease_s * 1000),
            now,
            request.stored_request,
        )
        try:
            with metrics.ledger_timer("reserve"):
                existing = await self.store.reserve(reservation.new, reservation.evidence)
        except NotDurable as refused:
            await self._release_not_durable(reservation.new, refused, request.retention_s)
            raise refused  # by name: mypyc loses a bare raise's exception across an await
        if existing is None:
            return self._own(reservation.new, request, requested_at)
        return await self._resolve(request, existing)

    async def _resolve(self, request: OperationRequest, existing: OperationRecord) -> Owned | Answered:
        deadline: float | None = None  # set when this caller starts waiting
        reconciled = False
        while True:
            # A lease counts as ended only once the store's clock has surely passed it.
            action = decide(existing, request.fingerprint, self.store.clock.earliest_ms(), request.max_attempts)
            if action is Action.UNKNOWN and self.reconciler is not None and not reconciled:
                reconciled = True  # at most one on-demand reconciliation per request
                existing = await self.reconciler.on_demand(existing)
                continue
            if action is Action.RETRY:
                taken = await self._take_over(request, existing)
                if isinstance(taken, Owned):
                    return taken
                existing = taken
                continue
            if action is Action.WAIT:
                if deadline is None:
                    deadline = time.monotonic() + request.wait_s
                if time.monotonic() < deadline:
                    current = await self.store.wait_for(
                        request.op_id, deadline, lambda record: self._no_longer_waiting(record, request)
                    )
                    if current is None:  # a released record expired meanwhile: start afresh
                        return await self.begin(request)
                    existing = current
                    continue
            if self.completed is not None:
                self.completed.remember(existing, request.retention_s)
            return Answered(action, existing, waited=deadline is not None, reconciled=reconciled)

    async def _take_over(self, request: OperationRequest, released: OperationRecord) -> Owned | OperationRecord:
        now = self.store.clock.now_ms()
        requested_at = time.monotonic()
        lease_until_ms = self.store.clock.latest_ms(requested_at) + round(request.lease_s * 1000)
        transition = transitions.take_over(released, self._new_owner(), lease_until_ms, now, request.stored_request)
        try:
            with metrics.ledger_timer("take_over"):
                current = await self.store.transition(transition)
        except NotDurable as not_replicated:  # named apart: mypyc gives a name one type per function
            await self._release_not_durable(transition.new, not_replicated, request.retention_s)
            raise not_replicated
        return self._own(transition.new, request, requested_at) if current is None else current

    async def _put_back(self, restore: Transition) -> OperationRecord | None:
        """``_recreate``'s reservation, retried through a brief outage as outcomes are (the
        failover that lost the record is often still settling). Retrying is safe: the same
        owner's reservation counts as made. Too few replicas acknowledging it does not stop
        the outcome: the record is on the master, and an outcome never waits for replicas."""
        for delay in (*_FINISH_RETRY_DELAYS_S, None):
            try:
                return await self.store.reserve(restore.new, restore.evidence)
            except NotDurable:
                return None
            except StoreUnavailable:
                if delay is None:
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _release_not_durable(self, owned: OperationRecord, refused: NotDurable, retention_s: float) -> None:
        """Release ``owned``, a reservation too few replicas acknowledged: it is not
        forwarded. If even that fails, the record stays PENDING and its lease expiry
        hands it to the reconciler."""
        detail = {"replicas": refused.acked, "required": refused.required, "owner": owned.owner}
        release = transitions.release_unsent(
            owned, self.store.clock.now_ms(), "not-durable", detail, retention_s or _NOT_DURABLE_TTL_S
        )
        try:
            await self.store.transition(release)
        except RecordMissing:
            pass  # written to a master that has been replaced since: gone with it
        except StoreUnavailable as exc:
            log.warning("could not release a reservation replicas did not acknowledge", extra={"error": str(exc)})

    async def withdraw(self, owned: OperationRecord, detail: dict[str, object], retention_s: float) -> None:
        """Undo the reservation of ``owned``, an attempt that will not be sent.

        A fresh reservation (fence 1) is deleted: nothing stays recorded. A
        taken-over operation is released again with its attempt given back, so
        the same key is forwarded later. Waiters are woken either way."""
        self.leases.release(owned.op_id)
        metrics.IN_FLIGHT.dec()
        withdrawal = transitions.withdraw(owned, self.store.clock.now_ms(), detail, retention_s)
        if isinstance(withdrawal, Unreserve):
            await self.store.unreserve(withdrawal.op_id, withdrawal.owner, withdrawal.fence)
        else:
            await self.store.transition(withdrawal)

    async def finish(
        self,
        owned: OperationRecord,
        outcome: Outcome,
        response: StoredResponse | None,
        retention_s: float,
        detail: dict[str, object],
    ) -> OperationRecord | None:
        """Record ``outcome`` for the attempt ``owned`` made.

        Returns ``None`` when recorded, or the current record when the fence
        says another owner decided this operation meanwhile. Store outages are
        retried briefly; after that ``StoreUnavailable`` says the record stays
        PENDING, and its expired lease makes it UNKNOWN, never silently lost.

        Nothing else escapes: the tool may have acted, and the caller must get
        its answer. An outcome the store cannot hold as it is
        (``RecordNotStorable``, or any other failure) is recorded without what
        it may not hold (``_without_response``): a completed operation keeps
        its status, size and digest, so its duplicates get
        ``response-not-stored``, never a second forward. When not even that
        can be written, ``StoreUnavailable``, as for an outage.
        """
        self.leases.release(owned.op_id)
        metrics.IN_FLIGHT.dec()
        now = self.store.clock.now_ms()
        transition = transitions.finish(owned, outcome.state, outcome.retry_class, response, now, detail, retention_s)
        try:
            return await self._record(owned, transition, now, retention_s)
        except StoreUnavailable:
            raise
        except Exception as failed:  # after a forward: whatever failed, the outcome is still recorded
            return await self._record_without_response(owned, transition, now, retention_s, failed)

    async def _record(
        self, owned: OperationRecord, transition: Transition, now: int, retention_s: float, *, recreate: bool = True
    ) -> OperationRecord | None:
        for delay in (*_FINISH_RETRY_DELAYS_S, None):
            try:
                with metrics.ledger_timer("record"):
                    current: OperationRecord | None = await self.store.transition(transition)
            except RecordMissing:
                if not recreate:
                    raise
                return await self._recreate(owned, transition, now, retention_s)
            except StoreUnavailable:
                if delay is None:
                    raise
                log.warning("store unavailable while recording an outcome; retrying", extra={"op": owned.op_id})
                await asyncio.sleep(delay)
            else:
                if current is not None:
                    detail = transition.evidence.detail
                    return await self._late_outcome(owned, transition.new, current, detail, now, retention_s)
                return None
        raise AssertionError("unreachable")

    async def _recreate(
        self, owned: OperationRecord, transition: Transition, now: int, retention_s: float
    ) -> OperationRecord | None:
        """The store lost ``owned``'s record while the attempt was in flight (a failover to a
        replica that never had it). Put the record back, then write the outcome with the
        usual guard: the outcome must be durable somewhere, or a retry is forwarded again.
        A crash in between leaves it PENDING under a short lease, which the reconciler settles."""
        outcome = transition.new.state.value
        metrics.RECORDS_VANISHED.labels("record").inc()
        if self.epoch is not None:
            self.epoch.check_soon()  # one record or all of them?
        log.error(
            "operation record vanished before its outcome was recorded; recreating it",
            extra={"op": owned.op_id, "outcome": outcome, "attempt": owned.attempt},
        )
        why: dict[str, object] = {"owner": owned.owner, "outcome": outcome, "reason": "the store lost the record"}
        restore = transitions.recreate(owned, now, now + _RECREATE_LEASE_MS, why)
        existing = await self._put_back(restore)
        if existing is not None:
            # A retry reserved the key anew after the record vanished: a second attempt may
            # have been forwarded. Its record stays; ours becomes evidence on it.
            log.error(
                "a new attempt reserved an operation whose record had vanished; both may have taken effect",
                extra={"op": owned.op_id, "state": existing.state.value, "attempt": existing.attempt},
            )
            ours = transition.evidence.detail
            return await self._late_outcome(owned, transition.new, existing, ours, now, retention_s)
        return await self._record(owned, transition, now, retention_s, recreate=False)

    async def _record_without_response(
        self, owned: OperationRecord, transition: Transition, now: int, retention_s: float, error: Exception
    ) -> OperationRecord | None:
        """Record ``transition``'s outcome without what ``error`` kept the store from holding."""
        reason = NOT_STORABLE if isinstance(error, RecordNotStorable) else STORING_FAILED
        cause = _printable(f"{type(error).__name__}: {error}")
        log.error(
            "could not record an outcome as it is; recording it without its response",
            exc_info=error,
            extra={"op": owned.op_id, "outcome": transition.new.state.value, "reason": reason},
        )
        reduced = _without_response(transition, reason, cause)
        try:
            return await self._record(owned, reduced, now, retention_s)
        except StoreUnavailable:
            raise
        except Exception as failed_again:
            log.error(
                "could not record an outcome, not even without its response",
                exc_info=failed_again,
                extra={"op": owned.op_id, "outcome": transition.new.state.value},
            )
            raise StoreUnavailable(
                f"the outcome could not be recorded: {type(failed_again).__name__}: {failed_again}"
            ) from failed_again

    async def _late_outcome(
        self,
        owned: OperationRecord,
        ours: OperationRecord,
        current: OperationRecord,
        detail: dict[str, object],
        now: int,
        retention_s: float,
    ) -> OperationRecord:
        """A fenced owner's outcome: evidence only, unless it proves an effect the
        ledger wrongly believes absent (a zombie sent after a probe found nothing)."""
        await self.store.note(owned.op_id, Evidence(now, "late-outcome", {**detail, "owner": owned.owner}))
        if ours.state is not State.COMPLETED or current.state is not State.RELEASED:
            return current
        correction = transitions.correct_late(current, ours.response, owned.owner, now, retention_s)
        applied = await self.store.transition(correction)
        log.warning(
            "a late outcome corrected a released operation", extra={"op": owned.op_id, "applied": applied is None}
        )
        return correction.new if applied is None else applied


def _without_response(transition: Transition, reason: str, cause: str) -> Transition:
    """``transition`` with only what any store holds: the response's status, size and
    digest (not its headers and body), the evidence's plain numbers and short ASCII text."""
    new = transition.new
    response = new.response
    if response is not None:
        response = StoredResponse(response.status, (), None, response.body_size, response.body_sha256, reason)
    detail: dict[str, Any] = {key: value for key, value in transition.evidence.detail.items() if _plain(value)}
    detail["not_stored"] = reason
    detail["error"] = cause
    return transition.with_record(
        new.evolve(response=response), Evidence(transition.evidence.at_ms, transition.evidence.kind, detail)
    )


def _plain(value: object) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    return isinstance(value, str) and value.isascii() and len(value) <= _CAUSE_MAX


def _printable(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii")[:_CAUSE_MAX]
