"""The ledger: reserve an operation before forwarding, record its outcome after.

It joins the pure decisions (``idemproxy.decisions``) to a store. ``begin``
either makes the caller the owner of a new attempt or says what the caller
gets instead (replay, wait result, conflict ...); ``finish`` records the
attempt's outcome, guarded by the owner's fencing token.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any, Protocol

from idemproxy import metrics
from idemproxy.completed_cache import CompletedCache
from idemproxy.decisions import Action, Outcome, decide
from idemproxy.leases import LeaseKeeper
from idemproxy.records import Evidence, OperationRecord, Scope, State, StoredRequest, StoredResponse
from idemproxy.store import Store, StoreUnavailable, Transition
from idemproxy.store.base import RecordNotStorable

log = logging.getLogger(__name__)

_FINISH_RETRY_DELAYS_S = (0.05, 0.2, 0.5, 1.0)
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


def now_ms() -> int:
    return int(time.time() * 1000)


def new_instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Ledger:
    def __init__(
        self,
        store: Store,
        instance_id: str | None = None,
        reconciler: OnDemandReconciler | None = None,
        completed: CompletedCache | None = None,
    ) -> None:
        self.store = store
        self.completed = completed
        self.instance_id = instance_id or new_instance_id()
        self.reconciler = reconciler
        self.leases = LeaseKeeper(store)
        self._attempts = itertools.count(1)

    def start(self) -> None:
        self.leases.start()

    async def close(self) -> None:
        await self.leases.close()

    def _new_owner(self) -> str:
        return f"{self.instance_id}:{next(self._attempts)}"

    def _own(self, record: OperationRecord, request: OperationRequest) -> Owned:
        self.leases.hold(record, request.lease_s)
        metrics.IN_FLIGHT.inc()
        return Owned(record)

    async def begin(self, request: OperationRequest) -> Owned | Answered:
        """Reserve ``request``'s operation, or say why it must not be forwarded."""
        now = now_ms()
        if self.completed is not None and (completed := self.completed.get(request.op_id)) is not None:
            return Answered(decide(completed, request.fingerprint, now, request.max_attempts), completed)
        record = OperationRecord(
            op_id=request.op_id,
            scope=request.scope,
            state=State.PENDING,
            fence=1,
            fingerprint=request.fingerprint,
            attempt=1,
            owner=self._new_owner(),
            lease_until_ms=now + round(request.lease_s * 1000),
            method=request.method,
            target=request.target,
            created_ms=now,
            updated_ms=now,
            attempt_ms=now,
            request=request.stored_request,
        )
        with metrics.ledger_timer("reserve"):
            existing = await self.store.reserve(record, _reserved_evidence(record, now))
        if existing is None:
            return self._own(record, request)
        return await self._resolve(request, existing)

    async def _resolve(self, request: OperationRequest, existing: OperationRecord) -> Owned | Answered:
        deadline: float | None = None  # set when this caller starts waiting
        reconciled = False
        while True:
            action = decide(existing, request.fingerprint, now_ms(), request.max_attempts)
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
                        request.op_id, deadline, lambda record: _no_longer_waiting(record, request)
                    )
                    if current is None:  # a released record expired meanwhile: start afresh
                        return await self.begin(request)
                    existing = current
                    continue
            if self.completed is not None:
                self.completed.remember(existing, request.retention_s)
            return Answered(action, existing, waited=deadline is not None, reconciled=reconciled)

    async def _take_over(self, request: OperationRequest, released: OperationRecord) -> Owned | OperationRecord:
        now = now_ms()
        record = released.evolve(
            state=State.PENDING,
            fence=released.fence + 1,
            attempt=released.attempt + 1,
            owner=self._new_owner(),
            lease_until_ms=now + round(request.lease_s * 1000),
            updated_ms=now,
            attempt_ms=now,
            retry_class=None,
            response=None,
            probes=0,
            next_probe_ms=0,
            request=request.stored_request,
        )
        with metrics.ledger_timer("take_over"):
            current = await self._transition_take_over(record, released, now)
        return self._own(record, request) if current is None else current

    async def _transition_take_over(
        self, record: OperationRecord, released: OperationRecord, now: int
    ) -> OperationRecord | None:
        return await self.store.transition(
            Transition(
                new=record,
                expect_fence=released.fence,
                expect_states=frozenset({State.RELEASED}),
                evidence=_reserved_evidence(record, now),
            )
        )

    async def withdraw(self, owned: OperationRecord, detail: dict[str, object], retention_s: float) -> None:
        """Undo the reservation of ``owned``, an attempt that will not be sent.

        A fresh reservation (fence 1) is deleted: nothing stays recorded. A
        taken-over operation is released again with its attempt given back, so
        the same key is forwarded later. Waiters are woken either way."""
        self.leases.release(owned.op_id)
        metrics.IN_FLIGHT.dec()
        if owned.fence == 1:
            await self.store.unreserve(owned.op_id, owned.owner, owned.fence)
            return
        now = now_ms()
        released = owned.evolve(
            state=State.RELEASED, attempt=owned.attempt - 1, lease_until_ms=0, updated_ms=now, retry_class=None
        )
        evidence = Evidence(now, "withdrawn", detail)
        await self.store.transition(
            Transition(released, owned.fence, frozenset({State.PENDING}), evidence, retention_s)
        )

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
        now = now_ms()
        new = owned.evolve(
            state=outcome.state,
            retry_class=outcome.retry_class,
            response=response if outcome.state is State.COMPLETED else None,
            updated_ms=now,
            lease_until_ms=0,
        )
        evidence = Evidence(now, outcome.state.value.lower(), detail)
        transition = Transition(
            new=new,
            expect_fence=owned.fence,
            expect_states=frozenset({State.PENDING}),
            evidence=evidence,
            ttl_s=retention_s if outcome.state in (State.COMPLETED, State.RELEASED) else None,
            due_ms=now if outcome.state is State.UNKNOWN else None,  # reconcile at once
        )
        try:
            return await self._record(owned, transition, now, retention_s)
        except StoreUnavailable:
            raise
        except Exception as failed:  # after a forward: whatever failed, the outcome is still recorded
            return await self._record_without_response(owned, transition, now, retention_s, failed)

    async def _record(
        self, owned: OperationRecord, transition: Transition, now: int, retention_s: float
    ) -> OperationRecord | None:
        for delay in (*_FINISH_RETRY_DELAYS_S, None):
            try:
                with metrics.ledger_timer("record"):
                    current: OperationRecord | None = await self.store.transition(transition)
                if current is not None:
                    detail = transition.evidence.detail
                    return await self._late_outcome(owned, transition.new, current, detail, now, retention_s)
                return current
            except StoreUnavailable:
                if delay is None:
                    raise
                log.warning("store unavailable while recording an outcome; retrying", extra={"op": owned.op_id})
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

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
        corrected = current.evolve(
            state=State.COMPLETED,
            fence=current.fence + 1,
            owner=owned.owner,
            response=ours.response,
            reconciled=True,
            updated_ms=now,
        )
        applied = await self.store.transition(
            Transition(
                corrected,
                current.fence,
                frozenset({State.RELEASED}),
                Evidence(now, "corrected", {"reason": "a late outcome proves the effect", "owner": owned.owner}),
                ttl_s=retention_s,
            )
        )
        log.warning(
            "a late outcome corrected a released operation", extra={"op": owned.op_id, "applied": applied is None}
        )
        return corrected if applied is None else applied


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
    return Transition(
        new=new.evolve(response=response),
        expect_fence=transition.expect_fence,
        expect_states=transition.expect_states,
        evidence=Evidence(transition.evidence.at_ms, transition.evidence.kind, detail),
        ttl_s=transition.ttl_s,
        due_ms=transition.due_ms,
    )


def _plain(value: object) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    return isinstance(value, str) and value.isascii() and len(value) <= _CAUSE_MAX


def _printable(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii")[:_CAUSE_MAX]


def _reserved_evidence(record: OperationRecord, now: int) -> Evidence:
    return Evidence(now, "reserved", {"attempt": record.attempt, "owner": record.owner})


def _no_longer_waiting(record: OperationRecord | None, request: OperationRequest) -> bool:
    if record is None:
        return True
    return decide(record, request.fingerprint, now_ms(), request.max_attempts) is not Action.WAIT
