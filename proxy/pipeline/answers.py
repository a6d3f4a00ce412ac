"""What a caller gets when the ledger says not to forward: the stored answer, or a problem."""

from __future__ import annotations

import time
from typing import Any

from idemproxy.config.settings import RouteConfig
from idemproxy.edge.observe import Decided, Observation
from idemproxy.ledger.ledger import Answered
from idemproxy.lifecycle.decisions import Action
from idemproxy.lifecycle.records import OperationRecord
from idemproxy.protocol import OPERATION_HEADER, RECONCILED_HEADER, REPLAYED_HEADER, Decision
from idemproxy.protocol.errors import (
    AttemptsExhausted,
    FingerprintMismatch,
    InFlight,
    NeedsAttention,
    OutcomeUnknown,
    ProblemError,
    ResponseNotStored,
)
from idemproxy.wire.http_messages import Response


def answer(answered: Answered, route: RouteConfig, observation: Observation) -> Response:
    """The response for a request that must not be forwarded; its decision (with the attempt
    the ledger answered for) is recorded in ``observation``."""
    record = answered.record
    action = answered.action
    if action is not Action.REPLAY:
        problem = _problem_for(action, record, route)
        observation.record(Decided(problem.decision, record.attempt))
        raise problem
    if answered.reconciled:
        decision = Decision.RECONCILED_FOUND
    else:
        decision = Decision.WAITED_REPLAYED if answered.waited else Decision.REPLAYED
    observation.record(Decided(decision, record.attempt))
    stored = record.response
    assert stored is not None
    assert stored.body is not None
    response = Response(status=stored.status, body=stored.body, headers=stored.headers)
    response.headers[REPLAYED_HEADER] = "true"
    if record.reconciled:
        response.headers[RECONCILED_HEADER] = "true"
    response.headers[OPERATION_HEADER] = record.op_id
    return response


def _problem_for(action: Action, record: OperationRecord, route: RouteConfig) -> ProblemError:
    facts: dict[str, Any] = {
        "operation": record.op_id,
        "state": record.state.value,
        "attempt": record.attempt,
    }
    match action:
        case Action.MISMATCH:
            return FingerprintMismatch(
                "This idempotency key was first used for a different request (method, path, query, "
                "headers or body differ). Use a new key for a new request.",
                **facts,
            )
        case Action.WAIT:
            return InFlight(
                f"An earlier request with this key is still in flight after waiting {route.wait_s:g}s. "
                "Retry later with the same key to get its outcome.",
                headers={"Retry-After": "1"},
                **facts,
            )
        case Action.UNKNOWN:
            retry_in_s = max(1, -(-(record.next_probe_ms - int(time.time() * 1000)) // 1000))
            return OutcomeUnknown(
                "An earlier attempt was sent but its outcome is unknown "
                f"({record.retry_class or 'lease expired'}); it will not be forwarded again until "
                "the outcome is established. Retry later with the same key, or ask an operator to resolve it.",
                headers={"Retry-After": str(retry_in_s)},
                retry_class=record.retry_class,
                probes=record.probes,
                **facts,
            )
        case Action.NEEDS_ATTENTION:
            return NeedsAttention(
                "The outcome of this operation could not be established automatically; an operator "
                f"must resolve it (`idemproxy ops resolve {record.op_id} --done|--not-done`) before it "
                "can be answered or retried.",
                retry_class=record.retry_class,
                probes=record.probes,
                **facts,
            )
        case Action.NOT_STORED:
            stored = record.response
            if stored is not None and stored.not_stored_reason is not None:
                why = f"could not be stored ({stored.not_stored_reason}; its evidence says why)"
            else:
                why = "body exceeded the route's max_stored_response and was not kept"
            return ResponseNotStored(
                f"The operation completed, but its response {why}; it will not be forwarded again.",
                original_status=stored.status if stored else None,
                body_size=stored.body_size if stored else None,
                body_sha256=stored.body_sha256 if stored else None,
                **facts,
            )
        case Action.EXHAUSTED:
            return AttemptsExhausted(
                f"All {route.max_attempts} attempts of this operation were used up without a definitive answer.",
                max_attempts=route.max_attempts,
                **facts,
            )
    raise AssertionError(f"no problem for {action}")
