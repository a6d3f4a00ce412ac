"""One observation per request: the decision, counted in metrics and logged once.

What the request's steps learn (its route, that it is a side-effecting call, its task,
its operation, the decision, the time spent upstream) they record as immutable events
(``Observation.record``, which folds each as it arrives); nothing rewrites them.
``observed`` times the whole request and, when the response is ready, turns the fold
(``Observation.summary``) into one access log line and the metrics. Keys and bodies never appear in logs unless
``log_keys`` is on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from idemproxy import logs, metrics
from idemproxy.protocol import Decision
from idemproxy.wire.http_messages import Handler, Request, StreamResponse

access_log = logging.getLogger("idemproxy.access")


# -- the events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, init=False)
class RouteMatched:
    """The request's path matched ``route`` (the route's name)."""

    route: str

    def __init__(self, route: str) -> None:  # compiled by mypyc, unlike a generated one
        object.__setattr__(self, "route", route)


@dataclass(frozen=True, slots=True)
class SideEffecting:
    """The request is a side-effecting call: the proxy's overhead on it is measured."""


#: The one ``SideEffecting`` event (it carries nothing).
SIDE_EFFECTING: Final = SideEffecting()


@dataclass(frozen=True, slots=True, init=False)
class TaskNamed:
    """The call names ``task`` (``None``: it names none)."""

    task: str | None

    def __init__(self, task: str | None) -> None:  # compiled by mypyc, unlike a generated one
        object.__setattr__(self, "task", task)


@dataclass(frozen=True, slots=True, init=False)
class Keyed:
    """The call is the operation ``op_id``, under the idempotency key ``key``."""

    op_id: str
    key: str

    def __init__(self, op_id: str, key: str) -> None:  # compiled by mypyc, unlike a generated one
        object.__setattr__(self, "op_id", op_id)
        object.__setattr__(self, "key", key)


@dataclass(frozen=True, slots=True, init=False)
class Decided:
    """What the proxy decided for the request, and the operation's attempt it concerns (when
    the ledger answered). The first decision recorded is the request's: a later one (an
    error raised after the decision, say) does not replace it."""

    decision: Decision
    attempt: int | None = None

    def __init__(  # compiled by mypyc, unlike a generated one
        self, decision: Decision, attempt: int | None = None
    ) -> None:
        object.__setattr__(self, "decision", decision)
        object.__setattr__(self, "attempt", attempt)


@dataclass(frozen=True, slots=True, init=False)
class UpstreamTimed:
    """The request spent ``seconds`` waiting on the upstream (the last one timed counts)."""

    seconds: float

    def __init__(self, seconds: float) -> None:  # compiled by mypyc, unlike a generated one
        object.__setattr__(self, "seconds", seconds)


Event = RouteMatched | SideEffecting | TaskNamed | Keyed | Decided | UpstreamTimed


# -- folding them -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, init=False)
class Summary:
    """A request's events, folded: what the access log line and the metrics report."""

    route: str = "-"
    decision: Decision = Decision.ERROR  # nothing decided: the request failed unexpectedly
    op_id: str | None = None
    attempt: int | None = None
    task: str | None = None
    key: str | None = None
    upstream_s: float = 0.0
    side_effecting: bool = False

    def __init__(  # compiled by mypyc, unlike a generated one
        self,
        route: str = "-",
        decision: Decision = Decision.ERROR,
        op_id: str | None = None,
        attempt: int | None = None,
        task: str | None = None,
        key: str | None = None,
        upstream_s: float = 0.0,
        side_effecting: bool = False,
    ) -> None:
        object.__setattr__(self, "route", route)
        object.__setattr__(self, "decision", decision)
        object.__setattr__(self, "op_id", op_id)
        object.__setattr__(self, "attempt", attempt)
        object.__setattr__(self, "task", task)
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "upstream_s", upstream_s)
        object.__setattr__(self, "side_effecting", side_effecting)


class Observation:
    """The events recorded about one request, folded as they arrive (it runs on every request:
    no list to keep, nothing to fold at the end): the last route, task, operation and upstream
    time count, and the first decision."""

    __slots__ = ("_decided", "_key", "_op_id", "_route", "_side_effecting", "_task", "_upstream_s")

    def __init__(self) -> None:
        self._route = "-"
        self._decided: Decided | None = None
        self._op_id: str | None = None
        self._key: str | None = None
        self._task: str | None = None
        self._upstream_s = 0.0
        self._side_effecting = False

    def record(self, event: Event) -> None:
        if isinstance(event, Decided):
            if self._decided is None:
                self._decided = event
        elif isinstance(event, RouteMatched):
            self._route = event.route
        elif isinstance(event, Keyed):
            self._op_id, self._key = event.op_id, event.key
        elif isinstance(event, TaskNamed):
            self._task = event.task
        elif isinstance(event, UpstreamTimed):
            self._upstream_s = event.seconds
        else:
            self._side_effecting = True

    def summary(self) -> Summary:
        decided = self._decided
        decision, attempt = (Decision.ERROR, None) if decided is None else (decided.decision, decided.attempt)
        return Summary(
            self._route, decision, self._op_id, attempt, self._task, self._key, self._upstream_s, self._side_effecting
        )


OBSERVATION = web.RequestKey("observation", Observation)


def record(request: Request, event: Event) -> None:
    """Record ``event`` for ``request`` when it is observed (every request on the proxy listener is)."""
    observation = request.get(OBSERVATION)
    if observation is not None:
        observation.record(event)


async def observed(request: Request, handler: Handler, *, log_keys: bool) -> StreamResponse:
    """The first step of the proxy listener's pipeline."""
    observation = Observation()
    request[OBSERVATION] = observation
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        total_s = time.perf_counter() - started
        seen = observation.summary()
        decision = seen.decision
        metrics.count_request(seen.route, request.method, decision)
        if seen.side_effecting and decision is not Decision.REJECTED:
            metrics.overhead_seconds(seen.route).observe(max(0.0, total_s - seen.upstream_s))
        if access_log.isEnabledFor(logging.INFO):
            entry: dict[str, object] = {
                "method": request.method,
                "route": seen.route,
                "decision": decision,
                "status": status,
                "op": seen.op_id,
                "task": seen.task,
                "attempt": seen.attempt,
                "total_ms": round(total_s * 1000, 3),
                "upstream_ms": round(seen.upstream_s * 1000, 3),
            }
            if log_keys:
                entry["key"] = seen.key
                entry["path"] = request.raw_path
            if (sink := logs.SINKS.access) is not None:
                sink.write(entry)
            else:
                access_log.info("request", extra=entry)
