"""Budgets: per identity and per task, caps on side-effecting attempts in a sliding
window; per identity, a cap on attempts per operation.

What is charged: one unit per attempt the proxy is about to forward, that is a
fresh reservation or a take-over of a released operation. Whatever the ledger
answers by itself (a replay, a wait for the first attempt, a conflict) is
neither charged nor refused by a calls budget, and safe methods never reach
the ledger.

The ledger reserves first, because only it knows whether a request is a new
attempt; then every counter that applies is charged in one atomic store call
(``Store.charge``), all or none. A refused attempt is withdrawn
(``Ledger.withdraw``): a fresh reservation is deleted, a take-over released
again with its attempt given back, so the same key is forwarded once the
window has room. A request no budget applies to costs nothing extra.

An identity's ``attempts_per_operation`` needs no counter: the ledger decides
with the lower of it and the route's ``max_attempts``, and an operation
stopped by the identity's cap gets ``BudgetExceeded`` instead of the route's
``AttemptsExhausted``.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from idemproxy import metrics
from idemproxy.config.auth import Identity
from idemproxy.config.budgets import BudgetConfig, CallerBudget, Rate
from idemproxy.config.settings import FailureMode, RouteConfig
from idemproxy.ledger.ledger import Answered, Ledger, Owned
from idemproxy.lifecycle.decisions import Action
from idemproxy.lifecycle.records import OperationRecord
from idemproxy.protocol import BudgetKind
from idemproxy.protocol.errors import BudgetExceeded, LedgerUnavailable
from idemproxy.store import Store, StoreUnavailable
from idemproxy.store.base import Counter, Full

log = logging.getLogger(__name__)

__all__ = ["Applied", "BudgetKind", "Budgets"]


class Budgets:
    """The budgets in force; ``applying`` says which of them a request is under."""

    def __init__(self, config: BudgetConfig, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        #: Wall-clock seconds; windows are measured on it (injectable for tests).
        self.clock = clock

    def applying(self, identity: Identity | None, caller: str, task: str | None) -> Applied | None:
        """The budgets over a request by ``caller`` (the identity's name when
        authenticated) for ``task``; ``None`` when none applies."""
        caps = self.config.identity
        if identity is not None and identity.budgets is not None:
            caps = identity.budgets.over(caps)
        task_calls = self.config.task if task else None
        if caps.calls is None and caps.attempts_per_operation is None and task_calls is None:
            return None
        return Applied(self, caller, task, caps, task_calls)


@dataclass(frozen=True, slots=True)
class Applied:
    """The budgets one request is under."""

    budgets: Budgets
    caller: str
    task: str | None
    caps: CallerBudget
    task_calls: Rate | None

    def max_attempts(self, route_max: int) -> int:
        """What the ledger decides with: the lower of the route's and the identity's cap."""
        cap = self.caps.attempts_per_operation
        return route_max if cap is None else min(route_max, cap)

    async def admit(self, ledger: Ledger, begun: Owned | Answered, route: RouteConfig) -> Owned | Answered:
        """``begun`` if the budgets allow it; else raise ``BudgetExceeded``, having
        withdrawn the reservation of an attempt that will not be sent."""
        if isinstance(begun, Answered):
            if begun.action is Action.EXHAUSTED and begun.record.attempt < route.max_attempts:
                # The route alone would retry it: the identity's cap stopped it.
                metrics.BUDGET_REFUSALS.labels(route.name, BudgetKind.ATTEMPTS.value).inc()
                raise self._attempts_spent(begun.record, route)
            return begun
        owned = begun.record
        try:
            await self._charge(f"{owned.op_id}:{owned.owner}", route)  # one id per attempt: retries count once
        except BudgetExceeded as exc:
            await _withdraw(ledger, owned, route, {"budget": exc.extensions["budget"], "attempt": owned.attempt})
            raise
        except LedgerUnavailable:
            await _withdraw(ledger, owned, route, {"reason": "the budget counters are unreachable"})
            raise
        return begun

    async def charge_unrecorded(self, route: RouteConfig) -> None:
        """Charge a side-effecting call forwarded without a record (no key on a
        ``key_mode: optional`` route); raise ``BudgetExceeded`` when spent."""
        await self._charge(f"unrecorded:{secrets.token_hex(12)}", route)

    async def _charge(self, charge_id: str, route: RouteConfig) -> None:
        counters = self._counters()
        if not counters:
            return
        try:
            with metrics.ledger_timer("charge"):
                full = await self.budgets.store.charge(
                    [counter for counter, _, _ in counters], charge_id, round(self.budgets.clock() * 1000)
                )
        except StoreUnavailable as exc:
            metrics.STORE_ERRORS.labels("charge").inc()
            if route.on_store_error is FailureMode.FAIL_OPEN:
                log.warning("budget store unavailable; forwarding uncharged (fail_open)", extra={"route": route.name})
                return
            raise LedgerUnavailable(
                "The store that keeps the budget counters is unreachable, so the request was not "
                "forwarded (fail-closed). Retry it later.",
                headers={"Retry-After": "1"},
            ) from exc
        if full:
            # The request needs room in every counter: the one that frees last says when.
            refusal = self._calls_spent(max(full, key=lambda each: each.retry_after_ms), counters)
            metrics.BUDGET_REFUSALS.labels(route.name, refusal.extensions["budget"]).inc()
            raise refusal

    def _counters(self) -> list[tuple[Counter, BudgetKind, Rate]]:
        counters: list[tuple[Counter, BudgetKind, Rate]] = []
        if (rate := self.caps.calls) is not None:
            counters.append((_counter(f"identity:{self.caller}", rate), BudgetKind.IDENTITY_CALLS, rate))
        if (rate := self.task_calls) is not None and self.task:
            counters.append((_counter(f"task:{self.task}", rate), BudgetKind.TASK_CALLS, rate))
        return counters

    def _calls_spent(self, blocking: Full, counters: list[tuple[Counter, BudgetKind, Rate]]) -> BudgetExceeded:
        kind, rate = next((kind, rate) for counter, kind, rate in counters if counter == blocking.counter)
        retry_after = max(1, math.ceil(blocking.retry_after_ms / 1000))
        about: dict[str, str | None]
        if kind is BudgetKind.IDENTITY_CALLS:
            whose = f"Identity {self.caller!r} may cause"
            about = {"identity": self.caller}
        else:
            whose = f"Task {self.task!r} (all identities together) may cause"
            about = {"task": self.task}
        return BudgetExceeded(
            f"{whose} {rate.limit} side-effecting calls in any {_span(rate.window_s)}, and that budget is "
            f"spent. The request was not forwarded; retry it (with the same key) in {retry_after}s.",
            headers={"Retry-After": str(retry_after)},
            budget=kind.value,
            limit=rate.limit,
            window=int(rate.window_s) if rate.window_s.is_integer() else rate.window_s,
            retry_after=retry_after,
            **about,
        )

    def _attempts_spent(self, record: OperationRecord, route: RouteConfig) -> BudgetExceeded:
        cap = self.caps.attempts_per_operation
        assert cap is not None
        # Nothing frees an attempt of this operation: only its record's expiry makes the key new again.
        expires_ms = record.updated_ms + route.retention_s * 1000
        retry_after = max(1, math.ceil((expires_ms - time.time() * 1000) / 1000))
        return BudgetExceeded(
            f"Identity {self.caller!r} may make {cap} attempts per operation and this operation used "
            f"them all (the route would allow {route.max_attempts}). It will not be forwarded again "
            f"under this key; a new key is a new operation. This key becomes new again when its "
            f"record expires, in {retry_after}s.",
            headers={"Retry-After": str(retry_after)},
            budget=BudgetKind.ATTEMPTS.value,
            limit=cap,
            retry_after=retry_after,
            identity=self.caller,
            operation=record.op_id,
            attempt=record.attempt,
        )


async def _withdraw(ledger: Ledger, owned: OperationRecord, route: RouteConfig, detail: dict[str, object]) -> None:
    try:
        await ledger.withdraw(owned, detail, route.retention_s)
    except StoreUnavailable as exc:
        # The reservation stays PENDING until its lease runs out, then is reconciled like any lost attempt.
        log.error("could not withdraw a refused reservation", extra={"op": owned.op_id, "error": str(exc)})


def _counter(name: str, rate: Rate) -> Counter:
    return Counter(name, rate.limit, rate.window_ms)


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
