"""Completed operations whose duplicates this process has answered, kept in memory.

``COMPLETED`` is final: no transition leaves it (operators resolve only
``UNKNOWN`` and ``NEEDS_ATTENTION``; a late outcome can only turn a
``RELEASED`` record into a completed one). So once a duplicate of a completed
operation has been answered from the store, the next ones can be answered
from memory, without a store round trip, with what the store would answer:
the same stored response, or ``422`` for a different request under the same
key. (Operations are not remembered when they complete: most are never
repeated, and keeping every one cost the forward path ~6% of its CPU.)

An entry lives until its record would expire in the store (completion time
plus the route's ``retention``), and ``max_age_s`` at most: an instance whose
``retention`` differs from the one that wrote the record replays it at most
``max_age_s`` past its expiry. Only records with a stored body are kept, at
most ``max_entries`` of them and ``max_bytes`` of bodies, least recently
used first out.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from idemproxy.lifecycle.records import OperationRecord, State

#: Counted per entry on top of its body: the record itself, its headers, the dict slot.
ENTRY_OVERHEAD_BYTES = 1024


class CompletedCache:
    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_bytes: int = 32 * 1024 * 1024,
        max_age_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._clock = clock
        self._entries: collections.OrderedDict[str, tuple[OperationRecord, float, int]] = collections.OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, op_id: str) -> OperationRecord | None:
        """The completed record of ``op_id``, if this process saw it and it has not expired."""
        entry = self._entries.get(op_id)
        if entry is None:
            return None
        record, expires_at, _ = entry
        if self._clock() >= expires_at:
            self._drop(op_id)
            return None
        self._entries.move_to_end(op_id)
        return record

    def remember(self, record: OperationRecord, retention_s: float) -> None:
        """Keep ``record`` if it is COMPLETED with a stored body and still unexpired."""
        response = record.response
        if record.state is not State.COMPLETED or response is None or response.body is None:
            return
        size = len(response.body) + ENTRY_OVERHEAD_BYTES
        now = self._clock()
        expires_at = min(record.updated_ms / 1000 + retention_s, now + self.max_age_s)
        if expires_at <= now or size > self.max_bytes:
            return
        if record.request is not None or record.evidence:
            record = record.evolve(request=None, evidence=())  # a replay needs neither
        if record.op_id in self._entries:
            self._drop(record.op_id)
        self._entries[record.op_id] = (record, expires_at, size)
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        """Forget every answer: the ledger they came from was lost (``idemproxy.ledger.epoch``)."""
        self._entries.clear()
        self._bytes = 0

    def _drop(self, op_id: str) -> None:
        _, _, size = self._entries.pop(op_id)
        self._bytes -= size
