"""Every error a caller can receive, as RFC 9457 problem details.

The tree is deliberately shallow::

    ProblemError                      one problem+json ``type`` per subclass
    ├── BadRequest (400)              MissingKey, MissingTask, InvalidKey, AmbiguousHeader,
    │                                 InvalidTarget, AbsoluteFormRefused, InvalidResolution,
    │                                 InvalidQuery, IncompleteBody, UnsupportedTransferCoding,
    │                                 InvalidHeader, MalformedRequest
    ├── Unauthenticated (401), Forbidden (403)
    ├── NoRoute (404), OperationNotFound (404)
    ├── InvalidTransition (409)
    ├── MethodNotAllowed (405)
    ├── RequestTimeout (408)          also a TimeoutError
    ├── BodyTooLarge (413), TargetTooLong (414), ExpectationFailed (417),
    │   HeaderFieldsTooLarge (431), HttpVersionNotSupported (505)
    ├── FingerprintMismatch (422)
    ├── Conflict (409)                InFlight, OutcomeUnknown, NeedsAttention, ResponseNotStored
    ├── AttemptsExhausted (429), BudgetExceeded (429)
    ├── UpstreamError (502/504)       UpstreamUnreachable, UpstreamConnectionLost, UpstreamTimeout
    ├── LedgerUnavailable (503), LeaseLost (503)
    └── InternalError (500)

``idemproxy.edge.problems`` turns them into HTTP responses (``answer_problems`` on
the proxy listener, ``problem_middleware`` on the admin listener); the proxy
listener's HTTP server answers its own refusals with ``problem_reply``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from idemproxy.protocol import PROBLEM_TYPE_PREFIX, Decision


class ProblemError(Exception):
    """An error with a stable problem type, an HTTP status and a human detail."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"
    #: The proxy's decision, as counted in metrics and logged.
    decision: ClassVar[Decision] = Decision.ERROR

    def __init__(
        self,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extensions = extensions

    @property
    def type_uri(self) -> str:
        return PROBLEM_TYPE_PREFIX + self.slug

    def to_json(self, instance: str | None = None) -> bytes:
        body: dict[str, Any] = {
            **self.extensions,  # first, so they can never override the standard members
            "type": self.type_uri,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance is not None:
            body["instance"] = instance
        return orjson.dumps(body)


class BadRequest(ProblemError):
    status = 400
    slug = "bad-request"
    title = "Bad request"
    decision = Decision.REJECTED


class MissingKey(BadRequest):
    slug = "missing-idempotency-key"
    title = "Idempotency key required"


class MissingTask(BadRequest):
    """A ``key_mode: derive`` route scoped by task got a call with neither a key nor a task."""

    slug = "missing-task"
    title = "Task header required to derive the operation key"


class InvalidKey(BadRequest):
    slug = "invalid-idempotency-key"
    title = "Invalid idempotency key"


class AmbiguousHeader(BadRequest):
    """The key, caller or task header sent twice, or named in ``Connection``: the proxy
    and the tool would each see a different value."""

    slug = "ambiguous-header"
    title = "Ambiguous idempotency header"


class InvalidTarget(BadRequest):
    slug = "invalid-request-target"
    title = "Invalid request target"


class AbsoluteFormRefused(BadRequest):
    slug = "absolute-form-refused"
    title = "idemproxy is not a forward proxy"


class IncompleteBody(BadRequest):
    """The caller's body stream failed: the connection closed mid-body, or its framing broke."""

    slug = "incomplete-body"
    title = "Request body incomplete"


class UnsupportedTransferCoding(BadRequest):
    slug = "unsupported-transfer-coding"
    title = "Unsupported transfer coding"


class InvalidHeader(BadRequest):
    """A header value idemproxy could not forward unchanged (bytes that are not UTF-8)."""

    slug = "invalid-header"
    title = "Invalid header value"


class MalformedRequest(BadRequest):
    """The HTTP parser refused the request's framing; the connection is closed after the answer."""

    slug = "malformed-request"
    title = "Malformed request"


class UnsupportedMediaType(ProblemError):
    """A body in a media type the endpoint does not take (the admin API takes JSON only)."""

    status = 415
    slug = "unsupported-media-type"
    title = "Unsupported media type"
    decision = Decision.REJECTED


class Unauthenticated(ProblemError):
    """No valid credentials; carries a ``WWW-Authenticate`` challenge."""

    status = 401
    slug = "unauthenticated"
    title = "Authentication required"
    decision = Decision.REJECTED


class Forbidden(ProblemError):
    """Authenticated, but the identity's scopes do not allow this."""

    status = 403
    slug = "forbidden"
    title = "Not allowed for this identity"
    decision = Decision.REJECTED


class NoRoute(ProblemError):
    status = 404
    slug = "no-route"
    title = "No route for this path"
    decision = Decision.REJECTED


class OperationNotFound(ProblemError):
    status = 404
    slug = "operation-not-found"
    title = "No such operation"
    decision = Decision.REJECTED


class AmbiguousOperationId(BadRequest):
    """A shortened operation id that more than one operation's id starts with."""

    slug = "ambiguous-operation-id"
    title = "More than one operation matches"


class InvalidResolution(BadRequest):
    slug = "invalid-resolution"
    title = "Invalid resolution request"


class InvalidQuery(BadRequest):
    slug = "invalid-query"
    title = "Invalid query parameters"


class InvalidTransition(ProblemError):
    status = 409
    slug = "invalid-transition"
    title = "The operation cannot make that transition"
    decision = Decision.REJECTED


class MethodNotAllowed(ProblemError):
    status = 405
    slug = "method-not-allowed"
    title = "Method not allowed"
    decision = Decision.REJECTED


class RequestTimeout(ProblemError, TimeoutError):
    """The caller did not send its whole request body in time (``client_body_timeout``).

    Also a ``TimeoutError``: aiohttp then drops the rest of the body and closes
    the connection instead of lingering to read it."""

    status = 408
    slug = "request-timeout"
    title = "Request body not received in time"
    decision = Decision.REJECTED


class BodyTooLarge(ProblemError):
    status = 413
    slug = "body-too-large"
    title = "Request body too large"
    decision = Decision.REJECTED


class TargetTooLong(ProblemError):
    status = 414
    slug = "target-too-long"
    title = "Request target too long"
    decision = Decision.REJECTED


class ExpectationFailed(ProblemError):
    status = 417
    slug = "expectation-failed"
    title = "Expectation not supported"
    decision = Decision.REJECTED


class HeaderFieldsTooLarge(ProblemError):
    status = 431
    slug = "header-fields-too-large"
    title = "Request header fields too large"
    decision = Decision.REJECTED


class HttpVersionNotSupported(ProblemError):
    """The request line names an HTTP major version other than 1; the connection is closed after the answer."""

    status = 505
    slug = "http-version-not-supported"
    title = "HTTP version not supported"
    decision = Decision.REJECTED


class FingerprintMismatch(ProblemError):
    status = 422
    slug = "fingerprint-mismatch"
    title = "Idempotency key reused with a different request"
    decision = Decision.MISMATCH


class Conflict(ProblemError):
    status = 409
    slug = "conflict"
    title = "Conflict"
    decision = Decision.CONFLICT


class InFlight(Conflict):
    slug = "operation-in-flight"
    title = "Operation still in flight"


class OutcomeUnknown(Conflict):
    slug = "outcome-unknown"
    title = "Outcome of the operation is unknown"
    decision = Decision.UNKNOWN


class NeedsAttention(Conflict):
    slug = "needs-attention"
    title = "Operation needs an operator's attention"
    decision = Decision.NEEDS_ATTENTION


class ResponseNotStored(Conflict):
    slug = "response-not-stored"
    title = "Operation completed, but its response was not stored"
    decision = Decision.NOT_STORED


class AttemptsExhausted(ProblemError):
    status = 429
    slug = "attempts-exhausted"
    title = "No attempts left for this operation"
    decision = Decision.EXHAUSTED


class BudgetExceeded(ProblemError):
    """An identity's or a task's budget (``idemproxy.edge.budgets``) refuses another attempt."""

    status = 429
    slug = "budget-exceeded"
    title = "Budget exceeded"
    decision = Decision.BUDGET_EXCEEDED


class UpstreamError(ProblemError):
    status = 502
    slug = "upstream-error"
    title = "Upstream error"
    decision = Decision.FORWARDED


class UpstreamUnreachable(UpstreamError):
    slug = "upstream-unreachable"
    title = "Upstream unreachable; the request was not sent"


class UpstreamConnectionLost(UpstreamError):
    slug = "upstream-connection-lost"
    title = "Upstream connection lost after the request was sent"


class UpstreamTimeout(UpstreamError):
    status = 504
    slug = "upstream-timeout"
    title = "Upstream did not answer in time"


class LeaseLost(ProblemError):
    status = 503
    slug = "lease-lost"
    title = "The proxy lost its claim on the operation before sending it"
    decision = Decision.FAIL_CLOSED


class LedgerUnavailable(ProblemError):
    status = 503
    slug = "ledger-unavailable"
    title = "Operation ledger unavailable"
    decision = Decision.FAIL_CLOSED


class LedgerLost(ProblemError):
    """The ledger lost its records (its epoch marker is gone or older): retries of operations
    it had answered would run again, so nothing is reserved until an operator confirms."""

    status = 503
    slug = "ledger-lost"
    title = "Operation ledger lost"
    decision = Decision.FAIL_CLOSED


class InternalError(ProblemError):
    pass
