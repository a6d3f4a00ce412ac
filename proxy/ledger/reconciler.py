"""Establishing unknown outcomes from the tool's observed state.

An operation whose outcome nobody knows (UNKNOWN, or PENDING with an expired
lease) is *claimed* with a fencing token, so only one reconciler in the whole
deployment probes it at a time; the probe's result, whatever it is, is added
to the record's evidence, and the record moves to COMPLETED (the effect was
found), RELEASED (proven absent), stays UNKNOWN with a backoff, or, after
``max_probes``, NEEDS_ATTENTION. Nothing unknown is ever dropped.

It runs on demand (a duplicate hits an unknown operation; concurrent
duplicates share one probe) and in the background (expired leases and due
probes, found through the store's due index).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Mapping
from typing import Any

from idemproxy import background, metrics
from idemproxy.config.settings import RouteConfig
from idemproxy.ledger.forwarder import Forwarder
from idemproxy.ledger.probes import ProbeOutcome, ProbeResult, run_probe, unprobeable
from idemproxy.lifecycle import transitions
from idemproxy.lifecycle.decisions import needs_reconciling
from idemproxy.lifecycle.records import OperationRecord, State
from idemproxy.lifecycle.transitions import Event
from idemproxy.store import Store, StoreUnavailable

log = logging.getLogger(__name__)

_DEFAULT_ON_DEMAND_TIMEOUT_S = 5.0
_CLAIM_MARGIN_S = 5.0
_RECHECK_S = 0.01


class Reconciler:
    def __init__(
        self,
        store: Store,
        routes: Mapping[str, RouteConfig],
        forwarder: Forwarder,
        instance_id: str,
        *,
        interval_s: float = 1.0,
        batch: int = 100,
        concurrency: int = 8,
    ) -> None:
        self.store = store
        self.routes = routes
        self.forwarder = forwarder
        self.instance_id = instance_id
        self.interval_s = interval_s
        self.batch = batch
        self._limit = asyncio.Semaphore(concurrency)
        self._running: dict[str, asyncio.Task[OperationRecord | None]] = {}
        self._claims = itertools.count(1)
        self._background: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self._background = asyncio.create_task(self._scan_forever(), name="idemproxy-reconciler")

    async def close(self) -> None:
        await background.stop(*self._running.values(), self._background)
        self._background = None

    # -- on demand ----------------------------------------------------------------------

    async def on_demand(self, record: OperationRecord) -> OperationRecord:
        """Try to establish ``record``'s outcome now, within the route's bound.

        Returns the record as it stands afterwards (possibly still UNKNOWN)."""
        route = self.routes.get(record.scope.route)
        timeout_s = (
            route.reconcile.on_demand_timeout_s
            if route is not None and route.reconcile is not None
            else _DEFAULT_ON_DEMAND_TIMEOUT_S
        )
        deadline = time.monotonic() + timeout_s
        clock = self.store.clock
        while True:
            now = clock.earliest_ms()
            task = self._running.get(record.op_id)
            if task is None and needs_reconciling(record, now) and record.next_probe_ms <= now:
                task = self._spawn(record)
            if task is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - time.monotonic()))
            # Another instance may hold the claim: wait, bounded, for its result.
            current = await self.store.wait_for(
                record.op_id, deadline, lambda current: current is None or not current.claimed(clock.earliest_ms())
            )
            if current is None or current.state is not State.UNKNOWN or current.claimed(clock.earliest_ms()):
                return current or record
            # The next probe is due within this request's bound (e.g. "absent" was not
            # yet settled): wait for it rather than answer "unknown".
            # Due already (by a ms the lower bound on the store's clock has not yet reached,
            # say): look again shortly, never answer "unknown" while a probe can still run.
            wait_s = max(_RECHECK_S, (current.next_probe_ms - clock.earliest_ms()) / 1000)
            if time.monotonic() + wait_s >= deadline:
                return current
            await asyncio.sleep(wait_s)
            record = current

    # -- background -----------------------------------------------------------------------

    async def _scan_forever(self) -> None:
        while True:
            try:
                await self.scan_once()
            except StoreUnavailable as exc:
                log.warning("reconciler cannot reach the store", extra={"error": str(exc)})
            except Exception:
                log.exception("reconciler scan failed")
            await asyncio.sleep(self.interval_s)

    async def scan_once(self) -> int:
        """Start reconciling every due operation; returns how many were started."""
        started = 0
        clock = self.store.clock
        for op_id in await self.store.due(clock.earliest_ms(), self.batch):
            if op_id in self._running:
                continue
            record = await self.store.get(op_id)
            if record is not None and needs_reconciling(record, clock.earliest_ms()):
                self._spawn(record)
                started += 1
        return started

    async def drain(self) -> None:
        """Wait for every reconciliation under way (tests, shutdown)."""
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    # -- one operation ----------------------------------------------------------------------

    def _spawn(self, record: OperationRecord) -> asyncio.Task[OperationRecord | None]:
        task = asyncio.create_task(self._reconcile_logged(record), name=f"idemproxy-reconcile-{record.op_id}")
        self._running[record.op_id] = task
        task.add_done_callback(lambda _: self._running.pop(record.op_id, None))
        return task

    async def _reconcile_logged(self, record: OperationRecord) -> OperationRecord | None:
        async with self._limit:
            try:
                return await self.reconcile(record)
            except StoreUnavailable as exc:
                log.warning(
                    "reconciliation interrupted: store unavailable", extra={"op": record.op_id, "error": str(exc)}
                )
            except Exception:
                log.exception("reconciliation failed", extra={"op": record.op_id})
            return None

    async def reconcile(self, record: OperationRecord) -> OperationRecord | None:
        """Claim ``record``, probe, and record the result. ``None`` if another owner has it."""
        route = self.routes.get(record.scope.route)
        if route is None or route.reconcile is None:
            reason = "route no longer configured" if route is None else "no reconcile method configured"
            return await self._escalate(record, reason)
        if (unsafe := unprobeable(route, record)) is not None:
            # No probe of this operation can ever be sent safely; retrying would not change that.
            return await self._escalate(record, unsafe)
        claimed = await self._claim(record, route)
        if claimed is None:
            return None
        # Nothing of the probe is sent before this: the store's clock had surely reached
        # probe_sent_ms when the tool was asked (the settle window is judged by it).
        probe_sent_ms = self.store.clock.earliest_ms()
        result = await run_probe(route, claimed, self.forwarder)
        return await self._record(claimed, route, result, probe_sent_ms)

    async def _claim(self, record: OperationRecord, route: RouteConfig) -> OperationRecord | None:
        """``record``, claimed; ``None`` when another owner has it, or the store's clock says
        its holder's lease has not ended (whatever this instance's clock says)."""
        assert route.reconcile is not None
        clock = self.store.clock
        now = clock.now_ms()
        probe_s = route.reconcile.probe.timeout_s if route.reconcile.probe is not None else route.read_timeout_s
        lease_until_ms = clock.latest_ms() + round((probe_s * 2 + _CLAIM_MARGIN_S) * 1000)
        claim = transitions.claim(record, self._owner(), lease_until_ms, now, route.reconcile.method)
        claimed = claim.new
        current = await self.store.transition(claim)
        return claimed if current is None else None

    async def _record(
        self, claimed: OperationRecord, route: RouteConfig, result: ProbeResult, probe_sent_ms: int
    ) -> OperationRecord | None:
        assert route.reconcile is not None
        now = self.store.clock.now_ms()
        config = route.reconcile
        settle_s = config.settle_s if config.settle_s is not None else route.connect_timeout_s + route.read_timeout_s
        settled_ms = claimed.attempt_ms + round(settle_s * 1000)
        unsettled = result.outcome is ProbeOutcome.ABSENT and probe_sent_ms < settled_ms
        # An absence seen while the tool may still be committing the attempt
        # proves nothing, and does not use up one of the route's probes.
        probes = claimed.probes if unsettled else claimed.probes + 1
        detail: dict[str, Any] = {"result": result.outcome.value, "probe": probes, **result.detail}
        if unsettled:
            detail["settles_at_ms"] = settled_ms
        next_probe_ms = 0
        if result.outcome is ProbeOutcome.FOUND:
            event = Event.PROBE_FOUND
        elif result.outcome is ProbeOutcome.ABSENT and not unsettled:
            event = Event.PROBE_ABSENT
        elif probes >= config.max_probes:
            event = Event.PROBES_EXHAUSTED
            detail["escalated"] = f"{probes} probes could not establish the outcome"
        else:
            event = Event.PROBE_INCONCLUSIVE
            next_probe_ms = now + round(config.backoff_after(max(probes, 1)) * 1000)
            if unsettled:
                next_probe_ms = max(next_probe_ms, settled_ms)
        recorded = transitions.probed(
            claimed, event, now, probes, detail, route.retention_s, result.response, next_probe_ms
        )
        final = recorded.new
        current = await self.store.transition(recorded)
        if current is not None:
            log.warning("probe result rejected by the fencing token", extra={"op": claimed.op_id})
            return None
        metrics.PROBES.labels(route.name, result.outcome.value).inc()
        if final.state is not State.UNKNOWN:
            settled = {State.COMPLETED: "found", State.RELEASED: "absent"}.get(final.state, "escalated")
            metrics.RECONCILED.labels(route.name, settled).inc()
        log.info(
            "reconciled",
            extra={"op": claimed.op_id, "result": result.outcome.value, "state": final.state.value, "probe": probes},
        )
        return final

    async def _escalate(self, record: OperationRecord, reason: str) -> OperationRecord | None:
        now = self.store.clock.now_ms()
        escalation = transitions.escalate(record, self._owner(), now, reason)
        metrics.RECONCILED.labels(record.scope.route, "escalated").inc()
        current = await self.store.transition(escalation)
        return escalation.new if current is None else None

    def _owner(self) -> str:
        return f"{self.instance_id}:reconciler:{next(self._claims)}"
