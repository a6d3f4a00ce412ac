"""Keeping the leases of in-flight attempts alive.

While a request is in flight its owner renews the lease, so only a crashed or
stuck instance's lease runs out. All leases of one process are renewed
together, in one store round trip, a third of the way through their term.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from idemproxy import background, metrics
from idemproxy.lifecycle.records import OperationRecord
from idemproxy.store import Store, StoreUnavailable
from idemproxy.store.base import Lease

log = logging.getLogger(__name__)

_MIN_TICK_S = 0.05


@dataclass(slots=True, init=False)
class _Held:
    fence: int
    owner: str
    lease_s: float
    renew_at: float  # monotonic
    #: Monotonic: the lease's end as this process can vouch for it. Counted from before the
    #: request that set it, against the latest the store's clock can have read then, so
    #: neither a jump of this instance's wall clock nor its disagreement with the store's
    #: can make a lease look longer here than the store will hold it.
    valid_until: float

    def __init__(  # compiled by mypyc, unlike a generated one
        self, fence: int, owner: str, lease_s: float, renew_at: float, valid_until: float
    ) -> None:
        self.fence = fence
        self.owner = owner
        self.lease_s = lease_s
        self.renew_at = renew_at
        self.valid_until = valid_until


class LeaseKeeper:
    def __init__(self, store: Store) -> None:
        self.store = store
        #: Called when a lease was lost because its record vanished (the ledger checks its epoch).
        self.on_vanished: Callable[[], None] = lambda: None
        self._reports: set[asyncio.Task[None]] = set()
        self._held: dict[str, _Held] = {}
        self._changed = asyncio.Event()
        self._wake_at = math.inf  # monotonic: when the keeper will look at the leases next
        self._task: asyncio.Task[None] | None = None

    def hold(self, record: OperationRecord, lease_s: float, requested_at: float) -> None:
        """Keep ``record``'s lease alive; ``requested_at``: ``time.monotonic()`` before the
        store call that granted it (its reply is among the store clock's readings)."""
        renew_at = time.monotonic() + lease_s / 3
        granted_s = (record.lease_until_ms - self.store.clock.latest_ms(requested_at)) / 1000
        self._held[record.op_id] = _Held(record.fence, record.owner, lease_s, renew_at, requested_at + granted_s)
        # Most new leases are due after the ones already held: waking the keeper
        # for each of them would cost every request a scan of all leases.
        if renew_at < self._wake_at:
            self._changed.set()

    def release(self, op_id: str) -> None:
        self._held.pop(op_id, None)

    def still_held(self, op_id: str) -> bool:
        """Whether this process may still act as the owner: its confirmed lease has a
        safety margin left. A process that was paused past its lease (a zombie) must
        not send the request, because a reconciler may already have taken over."""
        held = self._held.get(op_id)
        if held is None:
            return False
        margin_s = min(1.0, held.lease_s / 10)  # a tenth of the lease, at most 1 s
        return time.monotonic() < held.valid_until - margin_s

    @property
    def holding(self) -> int:
        return len(self._held)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="idemproxy-lease-keeper")

    async def close(self) -> None:
        await background.stop(self._task, *self._reports)
        self._task = None

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            due = {op_id: held for op_id, held in self._held.items() if held.renew_at <= now}
            if due:
                await self._renew(due)
            self._changed.clear()
            next_at = min((held.renew_at for held in self._held.values()), default=None)
            timeout = None if next_at is None else max(_MIN_TICK_S, next_at - time.monotonic())
            self._wake_at = math.inf if timeout is None else time.monotonic() + timeout
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait()

    async def _renew(self, due: dict[str, _Held]) -> None:
        requested_at = time.monotonic()
        leases = [Lease(op_id, held.fence, held.owner, round(held.lease_s * 1000)) for op_id, held in due.items()]
        try:
            renewed = await self.store.renew(leases)
        except StoreUnavailable as exc:
            log.warning("cannot renew leases; retrying", extra={"leases": len(leases), "error": str(exc)})
            for held in due.values():
                held.renew_at = time.monotonic() + min(1.0, held.lease_s / 10)
            return
        now = time.monotonic()
        lost: list[str] = []
        for (op_id, held), ok in zip(due.items(), renewed, strict=True):
            if ok:
                held.renew_at = now + held.lease_s / 3
                # The store counted the new term from its clock's reading after requested_at.
                held.valid_until = requested_at + held.lease_s
            elif self._held.get(op_id) is held:
                del self._held[op_id]
                lost.append(op_id)
        if lost:
            # Off the renewal path: the leases still held must not wait for these reads.
            report = asyncio.create_task(self._report_all(lost), name="idemproxy-lost-leases")
            self._reports.add(report)
            report.add_done_callback(self._reports.discard)

    async def _report_all(self, op_ids: list[str]) -> None:
        try:
            await asyncio.gather(*(self._report_lost(op_id) for op_id in op_ids))
        except Exception:  # a report must never take anything down with it
            log.exception("could not say why leases were lost", extra={"leases": len(op_ids)})

    async def _report_lost(self, op_id: str) -> None:
        """Say why a lease could not be renewed: another owner took the operation over
        (fenced), or the store lost the record (a failover), which finishing recreates."""
        try:
            current = await self.store.get(op_id)
        except StoreUnavailable:
            current = None
            vanished = False
        else:
            vanished = current is None
            if vanished:
                self.on_vanished()
        if vanished:
            metrics.RECORDS_VANISHED.labels("lease").inc()
            log.error(
                "operation record vanished while its attempt was in flight (store failover?); "
                "its outcome will recreate it",
                extra={"op": op_id},
            )
        elif current is not None:
            log.warning(
                "lease lost: another owner took the operation over",
                extra={"op": op_id, "owner": current.owner, "state": current.state.value},
            )
        else:
            log.warning("lease lost; the store cannot say to whom", extra={"op": op_id})
