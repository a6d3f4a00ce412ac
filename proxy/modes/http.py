"""The HTTP route mode: a side-effecting method is an operation, keyed by the key header
(or a key derived from the request), fingerprinted by the request itself."""

from __future__ import annotations

from idemproxy.config.routes import Target
from idemproxy.config.settings import KeyMode, RouteConfig
from idemproxy.edge.observe import OBSERVATION, SIDE_EFFECTING, Decided, Observation, TaskNamed
from idemproxy.ledger.forwarder import UpstreamResponse
from idemproxy.ledger.ledger import Answered
from idemproxy.lifecycle.decisions import classify_failure, classify_status
from idemproxy.pipeline.answers import answer
from idemproxy.pipeline.operations import Call, Pipeline, accept_key
from idemproxy.pipeline.relay import ReadReply, Reply, read_body, relay
from idemproxy.protocol import Decision
from idemproxy.protocol.errors import MissingKey
from idemproxy.protocol.keys import Scope, derive_key, fingerprint
from idemproxy.wire.headers import refuse_ambiguous
from idemproxy.wire.http_messages import Request, StreamResponse
from idemproxy.wire.upstream_client import FailureKind


class HttpMode:
    """Every request to a ``mode: http`` route."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def handle(self, request: Request, route: RouteConfig, target: Target) -> StreamResponse:
        pipeline = self.pipeline
        observation = request[OBSERVATION]
        refuse_ambiguous(request.headers, pipeline.own_headers)
        if not route.is_side_effecting(request.method):
            observation.record(Decided(Decision.PASSTHROUGH))
            return await pipeline.passthrough(request, route, target)
        observation.record(SIDE_EFFECTING)
        body = await read_body(request, route.max_body)
        return await self._side_effect(request, route, target, body, observation)

    async def _side_effect(
        self, request: Request, route: RouteConfig, target: Target, body: bytes, observation: Observation
    ) -> StreamResponse:
        pipeline = self.pipeline
        headers = request.headers
        request_fp = fingerprint(request.method, target.path, target.query, headers, route.fingerprint_headers, body)
        caller, task = pipeline.caller_and_task(request)
        key = headers.get(pipeline.names.key)
        observation.record(TaskNamed(task))
        if key is None:
            if route.key_mode is KeyMode.REQUIRE:
                raise MissingKey(f"Route {route.name!r} requires an {pipeline.names.key} header on {request.method}.")
            if route.key_mode is KeyMode.OPTIONAL:
                await pipeline.charge_unrecorded(request, route, caller, task)
                observation.record(Decided(Decision.UNRECORDED))
                return await pipeline.forward_unrecorded(request, route, target, body)
            pipeline.check_derivable(route, task)
            key = derive_key(caller, task, request_fp)
        else:
            accept_key(key)
        call = Call(request, route, target, body, Scope(caller, route.name, key, task), request_fp)
        begun = await pipeline.begin_operation(call)
        if isinstance(begun, StreamResponse):
            return begun
        if isinstance(begun, Answered):
            return answer(begun, route, observation)
        return await pipeline.forward_owned(begun, _http_reply(request, route, begun.record.op_id))


def _http_reply(request: Request, route: RouteConfig, op_id: str) -> ReadReply:
    async def read(upstream: UpstreamResponse) -> Reply:
        outcome = classify_status(upstream.status, route.not_applied_statuses, route.ambiguous_statuses)
        relayed = await relay(request, upstream, route.max_stored_response, op_id)
        if relayed.stored is None:
            kind = relayed.failed or FailureKind.CONNECTION_LOST
            return Reply(relayed.response, classify_failure(kind), None, {"failure": kind.value, "streamed": True})
        stored = relayed.stored
        # The body's digest is in the stored response.
        return Reply(relayed.response, outcome, stored, {"status": stored.status, "size": stored.body_size})

    return read
