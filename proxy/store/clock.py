"""The store's clock, as one process can know it.

Lease ends, settle windows and probe schedules are instants on the *store's*
clock (Redis's ``TIME``; for SQLite, one clock per host, ``AnchoredClock``),
never on the clock of whichever instance happens to read them: two instances
whose clocks disagree, or one whose clock jumps, must still agree on when a
lease ends. The store itself checks the instants that decide who may act (a
claim, an operator resolving a PENDING operation, a renewal) against its own
clock, in the same atomic step as the change.

Everything else (writing a lease's end, waiting for one, knowing whether a
tool has had time to settle) uses bounds on the store's clock kept here: every
script reply carries the store's time, observed together with the monotonic
clock before and after the call. Between observations the bounds follow the
monotonic clock, widened by ``DRIFT`` (twice what NTP may slew a clock by), so
no wall-clock jump on this instance moves them.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Final

#: How far two clocks' rates may differ: 1 ms per second (NTP slews at most 0.5 ms/s).
DRIFT: Final = 0.001
#: Readings are kept for two periods of this many ms: the bounds cover every clock read in
#: that time (every master of a Redis Cluster), and forget a replaced server's clock.
_PERIOD_MS: Final = 10_000.0


class StoreClock:
    """Bounds on the store's clock in ms, from readings of it (``observe``).

    Until the first reading the bounds are this instance's wall clock: estimates
    only. Nothing that decides safety relies on them then: the store re-checks
    ownership against its own clock, and an owner derives how long it may act
    from bounds that include the reading made by the very call that granted it.
    A store with several clocks (the masters of a Redis Cluster) gets bounds
    that hold for all of them."""

    def __init__(self) -> None:
        # Offsets (store ms - monotonic ms) of this period's and the previous period's readings.
        self._earliest = math.inf
        self._latest = -math.inf
        self._before_earliest = math.inf
        self._before_latest = -math.inf
        self._since = -math.inf  # monotonic ms at which this period began

    @property
    def observed(self) -> bool:
        return self._earliest != math.inf or self._before_earliest != math.inf

    @property
    def fresh(self) -> bool:
        """Read within the last two periods: its bounds are as tight as they get. An instance
        idle for longer takes a reading before it writes a lease (else the lease, counted from
        a wide upper bound, would hold the operation longer than it need)."""
        return time.monotonic() * 1000 - self._since < 2 * _PERIOD_MS

    def observe(self, store_ms: int, sent: float, received: float) -> None:
        """The store said ``store_ms`` during a call sent at ``sent`` and answered at
        ``received`` (both ``time.monotonic()``)."""
        received_ms = received * 1000
        if received_ms - self._since > _PERIOD_MS:
            self._before_earliest, self._before_latest = self._earliest, self._latest
            self._earliest, self._latest = math.inf, -math.inf
            self._since = received_ms
        # store_ms was read at some instant between sent and received, and truncated to a ms.
        self._earliest = min(self._earliest, store_ms - received_ms)
        self._latest = max(self._latest, store_ms + 1 - sent * 1000)

    def _offsets(self, at_ms: float) -> tuple[float, float] | None:
        earliest = min(self._earliest, self._before_earliest)
        if earliest == math.inf:
            return None
        # The readings may be up to two periods old: allow for the clocks' rates since.
        drift = (abs(at_ms - self._since) + 2 * _PERIOD_MS) * DRIFT
        return earliest - drift, max(self._latest, self._before_latest) + drift

    def earliest_ms(self, at: float | None = None) -> int:
        """The store's clock has surely reached this at monotonic ``at`` (default: now)."""
        at_ms = (time.monotonic() if at is None else at) * 1000
        offsets = self._offsets(at_ms)
        return self._wall_ms(at_ms) if offsets is None else int(at_ms + offsets[0])

    def latest_ms(self, at: float | None = None) -> int:
        """The store's clock has surely not passed this at monotonic ``at`` (default: now)."""
        at_ms = (time.monotonic() if at is None else at) * 1000
        offsets = self._offsets(at_ms)
        return self._wall_ms(at_ms) if offsets is None else math.ceil(at_ms + offsets[1])

    def now_ms(self) -> int:
        """The best estimate, for what is written down or shown rather than decided on."""
        at_ms = time.monotonic() * 1000
        offsets = self._offsets(at_ms)
        return self._wall_ms(at_ms) if offsets is None else int(at_ms + (offsets[0] + offsets[1]) / 2)

    @staticmethod
    def _wall_ms(at_ms: float) -> int:
        return int(time.time() * 1000 + at_ms - time.monotonic() * 1000)


_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str | None:
    """This host's boot, where the kernel names it (Linux): the monotonic clock counts from it."""
    try:
        return _BOOT_ID.read_text().strip() or None
    except OSError:
        return None


class AnchoredClock(StoreClock):
    """One host's clock for a store every process on the host shares (SQLite).

    The host's monotonic clock, which every process on it shares and no wall-clock
    jump moves, set once per boot to the wall clock: ``anchor`` is the wall time
    (ms) the store recorded when the first process of this boot opened it, and the
    monotonic time (ms) at that moment. Exact, so both bounds are the same."""

    def __init__(self, anchor_wall_ms: int, anchor_monotonic_ms: int) -> None:
        super().__init__()
        self._offset = anchor_wall_ms - anchor_monotonic_ms

    @staticmethod
    def monotonic_ms() -> int:
        return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000_000

    @property
    def fresh(self) -> bool:
        return True

    def observe(self, store_ms: int, sent: float, received: float) -> None:
        """Nothing to learn: this clock is the store's."""

    def _at_ms(self, at: float | None) -> int:
        return int((time.monotonic() if at is None else at) * 1000) + self._offset

    def earliest_ms(self, at: float | None = None) -> int:
        return self._at_ms(at)

    def latest_ms(self, at: float | None = None) -> int:
        return self._at_ms(at)

    def now_ms(self) -> int:
        return self._at_ms(None)


def anchor_for_this_boot() -> tuple[str, int, int]:
    """The anchor a store records when no process of this boot has yet: (boot, wall ms,
    monotonic ms). Without a boot id (not Linux), the process id stands in: each process
    then anchors itself, which is only as good as the wall clock at its start."""
    return (boot_id() or f"pid:{os.getpid()}", int(time.time() * 1000), AnchoredClock.monotonic_ms())
