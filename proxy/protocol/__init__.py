"""What the proxy and its clients (``idemproxy.adapters``) agree on: request and answer
header names, the caller of unauthenticated requests, where an MCP call carries its key,
the decisions the proxy reports, and problem types (``idemproxy.protocol.errors``).
``idemproxy.protocol.keys`` derives operation keys and ids for both sides.

This package imports no other part of idemproxy.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

#: The caller of a request no identity authenticated (part of its operation id).
ANONYMOUS = "anonymous"
#: The ``params._meta`` key an MCP ``tools/call`` carries its operation key under.
DEFAULT_KEY_META = "io.idemproxy/idempotency-key"
#: Response headers: the operation id an answer belongs to (what ``idemproxy ops`` takes), that it
#: is a stored answer replayed, and that reconciliation (or an operator) established it.
OPERATION_HEADER = "Idempotency-Operation"
REPLAYED_HEADER = "Idempotent-Replayed"
RECONCILED_HEADER = "Idempotent-Reconciled"
PROBLEM_CONTENT_TYPE = "application/problem+json"
#: Every problem type idemproxy answers with starts with this (``urn:idemproxy:problem:lease-lost``).
PROBLEM_TYPE_PREFIX = "urn:idemproxy:problem:"


@dataclass(frozen=True, slots=True)
class HeaderNames:
    """The request headers that carry an operation's key, caller and task (configurable)."""

    key: str = "Idempotency-Key"
    caller: str = "X-Idem-Caller"
    task: str = "X-Agent-Task"


class BudgetKind(StrEnum):
    """Which budget refused an attempt (the problem's ``budget`` member, the metric's ``kind``)."""

    IDENTITY_CALLS = "identity-calls"
    TASK_CALLS = "task-calls"
    ATTEMPTS = "attempts"


class Decision(StrEnum):
    """What the proxy decided for a request: the access log's ``decision`` and the
    ``idemproxy_requests_total`` label (dashboards and alerts select on these)."""

    FORWARDED = "forwarded"  # sent to the tool as a new attempt
    REPLAYED = "replayed"  # answered from the stored response
    WAITED_REPLAYED = "waited_replayed"  # waited for an in-flight attempt, then answered from its response
    RECONCILED_FOUND = "reconciled_found"  # answered with an outcome established by reconciliation
    CONFLICT = "conflict"  # 409: still in flight after the wait bound
    MISMATCH = "mismatch"  # 422: same key, different request
    UNKNOWN = "unknown"  # 409: outcome unknown, reconciliation pending
    NEEDS_ATTENTION = "needs_attention"  # 409: escalated to an operator
    NOT_STORED = "not_stored"  # 409: completed, response too large to replay
    EXHAUSTED = "exhausted"  # 429: no attempts left
    BUDGET_EXCEEDED = "budget_exceeded"  # 429: an identity's or a task's budget refused a new attempt
    REJECTED = "rejected"  # 4xx: invalid request (key, target, body, route)
    FAIL_CLOSED = "fail_closed"  # 503: ledger unreachable, not forwarded
    FAIL_OPEN = "fail_open"  # ledger unreachable, forwarded unrecorded (route opted in)
    UNRECORDED = "unrecorded"  # forwarded without a key on an optional-key route
    PASSTHROUGH = "passthrough"  # safe method: streamed through, no ledger
    ERROR = "error"  # 500: a bug
