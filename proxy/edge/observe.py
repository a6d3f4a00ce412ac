"""One observation per request: the decision, counted in metrics and logged once.

The handler fills in what it learns (route, decision, operation, attempt,
upstream time); ``observed`` times the whole request and emits one access
log line and the metrics when the response is ready. Keys and bodies never
appear in logs unless ``log_keys`` is on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from aiohttp import web

from idemproxy import logs, metrics
from idemproxy.protocol import Decision
from idemproxy.wire.http_messages import Handler, Request, StreamResponse

access_log = logging.getLogger("idemproxy.access")


@dataclass(slots=True, init=False)
class Observation:
    route: str = "-"
    decision: Decision | None = None
    op_id: str | None = None
    attempt: int | None = None
    task: str | None = None
    key: str | None = None
    upstream_s: float = 0.0
    side_effecting: bool = False

    def __init__(self, route: str = "-") -> None:  # compiled by mypyc, unlike a generated one
        self.route = route
        self.decision = None
        self.op_id = None
        self.attempt = None
        self.task = None
        self.key = None
        self.upstream_s = 0.0
        self.side_effecting = False


OBSERVATION = web.RequestKey("observation", Observation)


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
        decision = observation.decision or Decision.ERROR
        metrics.count_request(observation.route, request.method, decision)
        if observation.side_effecting and decision is not Decision.REJECTED:
            metrics.overhead_seconds(observation.route).observe(max(0.0, total_s - observation.upstream_s))
        if access_log.isEnabledFor(logging.INFO):
            entry: dict[str, object] = {
                "method": request.method,
                "route": observation.route,
                "decision": decision,
                "status": status,
                "op": observation.op_id,
                "task": observation.task,
                "attempt": observation.attempt,
                "total_ms": round(total_s * 1000, 3),
                "upstream_ms": round(observation.upstream_s * 1000, 3),
            }
            if log_keys:
                entry["key"] = observation.key
                entry["path"] = request.raw_path
            if (sink := logs.SINKS.access) is not None:
                sink.write(entry)
            else:
                access_log.info("request", extra=entry)
