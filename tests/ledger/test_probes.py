"""Probe URLs, found bodies, and ``run_probe`` against real tools: probe, hook and resend."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from idemproxy.config.reconcile import FoundResponse
from idemproxy.config.settings import RouteConfig
from idemproxy.ledger.forwarder import Forwarder
from idemproxy.ledger.probes import ProbeOutcome, ProbeResult, found_body, render_url, run_probe
from idemproxy.lifecycle.records import StoredRequest
from tests.conftest import proxy_config
from tests.support.records import OP, record_for
from tests.support.redis_server import free_port
from tests.support.upstream import Upstream

LOOKUP = {"url": "{upstream}/lookup?key={key}", "match": "matches[0]"}
BY_KEY = {"probe": LOOKUP}


def route_for(upstream_url: str, reconcile: dict[str, Any] | None = None, **policy: Any) -> RouteConfig:
    if reconcile is not None:
        policy["reconcile"] = reconcile
    return proxy_config(upstream_url, **policy).routes[0]


@pytest.fixture
async def forwarder() -> AsyncIterator[Forwarder]:
    started = Forwarder()
    await started.start()
    yield started
    await started.close()


async def effect(upstream: Upstream, key: str, path: str = "/items", body: Any = None) -> dict[str, Any]:
    """A real side effect at the tool, made with ``key`` (as the first attempt would have)."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{upstream.url}{path}", json=body or {}, headers={"Idempotency-Key": key}) as response,
    ):
        assert response.status == 201
        answer: dict[str, Any] = await response.json()
        return answer


# -- render_url ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "encoded"),
    [
        pytest.param("plain-key_1.2~x", "plain-key_1.2~x", id="unreserved"),
        pytest.param("a key with spaces", "a%20key%20with%20spaces", id="spaces"),
        pytest.param("a/b/../c", "a%2Fb%2F..%2Fc", id="slashes"),
        pytest.param("x&admin=1#frag", "x%26admin%3D1%23frag", id="query-injection"),
        pytest.param("clé-✓", "cl%C3%A9-%E2%9C%93", id="unicode"),
        pytest.param("50%?", "50%25%3F", id="percent-and-question"),
    ],
)
def test_render_url_percent_encodes_the_key(key: str, encoded: str) -> None:
    route = route_for("http://tool.test:9000", BY_KEY)
    assert render_url("{upstream}/lookup?key={key}", route, record_for(key)) == (
        f"http://tool.test:9000/lookup?key={encoded}"
    )


def test_render_url_fills_every_placeholder() -> None:
    route = route_for("http://tool.test:9000/base/", BY_KEY)
    record = record_for("k 1", caller="team/agent one", task="task&7")
    url = render_url("{upstream}/ops/{op_id}?key={key}&caller={caller}&task={task}", route, record)
    assert url == f"http://tool.test:9000/base/ops/{OP}?key=k%201&caller=team%2Fagent%20one&task=task%267"


def test_render_url_without_a_task_leaves_it_empty() -> None:
    route = route_for("http://tool.test:9000", BY_KEY)
    assert render_url("{upstream}/x?task={task}", route, record_for(task=None)) == "http://tool.test:9000/x?task="


def test_render_url_absolute_template_ignores_the_route_upstream() -> None:
    route = route_for("http://tool.test:9000", BY_KEY)
    assert render_url("https://other.test/by-key/{key}", route, record_for("k 1")) == "https://other.test/by-key/k%201"


def test_render_url_quotes_fields_of_the_stored_request_body() -> None:
    body = orjson.dumps({"order": {"ref": "R 1/2", "qty": 3, "tags": ["a"]}, "note": "ü"})
    record = record_for(request=StoredRequest(headers=(), body=body))
    route = route_for("http://tool.test", {"probe": {**LOOKUP, "url": "{upstream}/o?ref={body.order.ref}"}})
    url = render_url(
        "{upstream}/o?ref={body.order.ref}&qty={body.order.qty}&tags={body.order.tags}&note={body.note}", route, record
    )
    assert url == "http://tool.test/o?ref=R%201%2F2&qty=3&tags=%5B%22a%22%5D&note=%C3%BC"


@pytest.mark.parametrize(
    ("template", "missing"),
    [
        pytest.param("{upstream}/o?ref={body.order.id}", "order.id", id="missing-leaf"),
        pytest.param("{upstream}/o?ref={body.customer}", "customer", id="missing-top"),
        pytest.param("{upstream}/o?ref={body.order.ref.x}", "order.ref.x", id="through-a-string"),
    ],
)
def test_render_url_missing_body_field_raises_lookup_error(template: str, missing: str) -> None:
    record = record_for(request=StoredRequest(headers=(), body=b'{"order": {"ref": "R1"}}'))
    route = route_for("http://tool.test", BY_KEY)
    with pytest.raises(LookupError, match=f"no field '{missing}'"):
        render_url(template, route, record)


def test_render_url_body_field_without_a_stored_request_raises_lookup_error() -> None:
    route = route_for("http://tool.test", BY_KEY)
    with pytest.raises(LookupError, match="not kept"):
        render_url("{upstream}/o?ref={body.ref}", route, record_for(request=None))


# -- found_body ---------------------------------------------------------------------------------

PROBE_DOCUMENT: dict[str, Any] = {"matches": [{"effect": 4, "path": "/items"}], "total": 1}
PROBE_RAW = b'{ "matches": [ {"effect": 4, "path": "/items"} ],  "total": 1 }'


def test_found_body_resource_is_the_match_as_json() -> None:
    body = found_body(FoundResponse(body="resource"), {"effect": 4, "path": "/items"}, PROBE_DOCUMENT, PROBE_RAW, "k")
    assert orjson.loads(body) == {"effect": 4, "path": "/items"}


def test_found_body_probe_is_the_probe_body_byte_for_byte() -> None:
    assert found_body(FoundResponse(body="probe"), {"effect": 4}, PROBE_DOCUMENT, PROBE_RAW, "k") == PROBE_RAW


def test_found_body_template_evaluates_resource_key_and_probe() -> None:
    template = {
        "id": "${resource.effect}",
        "key": "${key}",
        "fixed": 1,
        "nested": {"total": "${probe.total}", "list": ["${resource.path}", "plain", None]},
        "missing": "${resource.nothing}",
        "not_an_expression": "$resource",
    }
    body = found_body(FoundResponse(body=template), PROBE_DOCUMENT["matches"][0], PROBE_DOCUMENT, PROBE_RAW, "k-9")
    assert orjson.loads(body) == {
        "id": 4,
        "key": "k-9",
        "fixed": 1,
        "nested": {"total": 1, "list": ["/items", "plain", None]},
        "missing": None,
        "not_an_expression": "$resource",
    }


def test_found_body_template_may_be_a_single_expression() -> None:
    body = found_body(FoundResponse(body="${resource}"), {"effect": 4}, PROBE_DOCUMENT, PROBE_RAW, "k")
    assert orjson.loads(body) == {"effect": 4}


# -- run_probe against real tools ---------------------------------------------------------------


class Quirky:
    """A tool that answers non-JSON, or not at all until the test lets it."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def text(self, request: web.Request) -> web.Response:
        return web.Response(text="<html>definitely not json</html>", content_type="text/html")

    async def hang(self, request: web.Request) -> web.Response:
        self.arrived.set()
        await self.release.wait()
        return web.json_response({"matches": []})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/text", self.text)
        app.router.add_get("/hang", self.hang)
        return app


@pytest.fixture
async def quirky(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> AsyncIterator[tuple[Quirky, str]]:
    tool = Quirky()
    server = await aiohttp_server(tool.app())
    yield tool, str(server.make_url("")).rstrip("/")
    tool.release.set()


async def test_probe_found_returns_the_resource_with_the_configured_status(
    upstream: Upstream, forwarder: Forwarder
) -> None:
    await effect(upstream, "other-key")
    await effect(upstream, "k found/1")
    route = route_for(upstream.url, {"probe": LOOKUP, "found": {"status": 201}})

    result = await run_probe(route, record_for("k found/1"), forwarder)

    assert result.outcome is ProbeOutcome.FOUND
    assert result.response is not None
    assert result.response.status == 201
    expected = orjson.dumps({"effect": 2, "path": "/items", "key": "k found/1"})
    assert result.response.body == expected
    assert result.response.body_size == len(expected)
    assert result.response.body_sha256 == hashlib.sha256(expected).hexdigest()
    assert dict(result.response.headers) == {"Content-Type": "application/json"}
    assert result.detail["probe_status"] == 200
    assert result.detail["url"] == f"{upstream.url}/lookup?key=k%20found%2F1"
    assert upstream.count() == 2  # probing made no effect


async def test_probe_found_with_template_body(upstream: Upstream, forwarder: Forwarder) -> None:
    await effect(upstream, "k-t")
    found = {"status": 200, "body": {"id": "${resource.effect}", "key": "${key}", "fixed": 1}}
    route = route_for(upstream.url, {"probe": LOOKUP, "found": found})
    result = await run_probe(route, record_for("k-t"), forwarder)
    assert result.outcome is ProbeOutcome.FOUND
    assert result.response is not None
    assert orjson.loads(result.response.body or b"") == {"id": 1, "key": "k-t", "fixed": 1}


async def test_probe_quoting_the_request_body_finds_the_effect(upstream: Upstream, forwarder: Forwarder) -> None:
    await effect(upstream, "order-77")
    route = route_for(upstream.url, {"probe": {**LOOKUP, "url": "{upstream}/lookup?key={body.order.ref}"}})
    record = record_for("caller-key", request=StoredRequest(headers=(), body=b'{"order": {"ref": "order-77"}}'))
    result = await run_probe(route, record, forwarder)
    assert result.outcome is ProbeOutcome.FOUND, result.detail


async def test_probe_with_empty_match_is_absent(upstream: Upstream, forwarder: Forwarder) -> None:
    await effect(upstream, "someone-else")
    route = route_for(upstream.url, {"probe": LOOKUP})
    result = await run_probe(route, record_for("never-sent"), forwarder)
    assert result.outcome is ProbeOutcome.ABSENT
    assert result.response is None
    assert result.detail["probe_status"] == 200


@pytest.mark.parametrize("match", ["matches", "matches[0]", "missing.field", "length(matches) > `0`"])
async def test_probe_match_yielding_nothing_is_absent(upstream: Upstream, forwarder: Forwarder, match: str) -> None:
    route = route_for(upstream.url, {"probe": {**LOOKUP, "match": match}})
    result = await run_probe(route, record_for("never-sent"), forwarder)
    assert result.outcome is ProbeOutcome.ABSENT


async def test_probe_absent_status_is_absent(upstream: Upstream, forwarder: Forwarder) -> None:
    route = route_for(upstream.url, {"probe": {"url": "{upstream}/probe-status/404", "match": "x"}})
    result = await run_probe(route, record_for(), forwarder)
    assert result.outcome is ProbeOutcome.ABSENT
    assert result.detail["probe_status"] == 404


async def test_probe_statuses_follow_the_configuration(upstream: Upstream, forwarder: Forwarder) -> None:
    probe = {
        "url": "{upstream}/probe-status/{key}",
        "match": "probe",
        "absent_statuses": [410],
        "match_statuses": [203],
    }
    route = route_for(upstream.url, {"probe": probe})
    gone = await run_probe(route, record_for("410"), forwarder)
    not_found = await run_probe(route, record_for("404"), forwarder)
    matched = await run_probe(route, record_for("203"), forwarder)
    plain_ok = await run_probe(route, record_for("200"), forwarder)
    assert gone.outcome is ProbeOutcome.ABSENT
    assert not_found.outcome is ProbeOutcome.UNKNOWN
    assert not_found.detail["reason"] == "unexpected probe status 404"
    assert matched.outcome is ProbeOutcome.FOUND
    assert plain_ok.outcome is ProbeOutcome.UNKNOWN


@pytest.mark.parametrize("status", [500, 502, 401, 302])
async def test_probe_unexpected_status_is_unknown(upstream: Upstream, forwarder: Forwarder, status: int) -> None:
    route = route_for(upstream.url, {"probe": {"url": f"{{upstream}}/probe-status/{status}", "match": "probe"}})
    result = await run_probe(route, record_for(), forwarder)
    assert result.outcome is ProbeOutcome.UNKNOWN
    assert result.detail["reason"] == f"unexpected probe status {status}"
    assert result.detail["probe_status"] == status


async def test_probe_non_json_body_is_unknown(quirky: tuple[Quirky, str], forwarder: Forwarder) -> None:
    _, url = quirky
    route = route_for(url, {"probe": {"url": "{upstream}/text", "match": "matches[0]"}})
    result = await run_probe(route, record_for(), forwarder)
    assert result.outcome is ProbeOutcome.UNKNOWN
    assert result.detail["reason"] == "the probe's body is not JSON"


async def test_probe_connection_refused_is_unknown(forwarder: Forwarder) -> None:
    route = route_for(f"http://127.0.0.1:{free_port()}", {"probe": {**LOOKUP, "timeout": "2s"}})
    result = await run_probe(route, record_for(), forwarder)
    assert result.outcome is ProbeOutcome.UNKNOWN
    assert "connect" in result.detail["reason"].lower()


async def test_probe_timeout_is_unknown(quirky: tuple[Quirky, str], forwarder: Forwarder) -> None:
    tool, url = quirky
    route = route_for(url, {"probe": {"url": "{upstream}/hang", "match": "matches[0]", "timeout": "200ms"}})
    result = await run_probe(route, record_for(), forwarder)
    assert tool.arrived.is_set()  # the probe was sent and then gave up waiting
    assert result.outcome is ProbeOutcome.UNKNOWN
    assert "Timeout" in result.detail["reason"]


async def test_probe_url_that_cannot_be_built_is_unknown(upstream: Upstream, forwarder: Forwarder) -> None:
    route = route_for(upstream.url, {"probe": {**LOOKUP, "url": "{upstream}/lookup?key={body.ref}"}})
    result = await run_probe(route, record_for(request=StoredRequest(headers=(), body=b"{}")), forwarder)
    assert result.outcome is ProbeOutcome.UNKNOWN
    assert result.detail["reason"].startswith("cannot build the probe URL")
    assert upstream.lookups == 0


async def test_no_reconcile_method_is_unknown(upstream: Upstream, forwarder: Forwarder) -> None:
    result = await run_probe(route_for(upstream.url), record_for(), forwarder)
    assert result == ProbeResult.unknown("no reconcile method configured")


# -- hooks ----------------------------------------------------------------------------------------


async def test_hook_found(upstream: Upstream, forwarder: Forwarder) -> None:
    route = route_for(upstream.url, {"hook": "tests.support.reconcile_hooks:found_hook"})
    result = await run_probe(route, record_for("k-h"), forwarder)
    assert result.outcome is ProbeOutcome.FOUND
    assert result.response is not None
    assert (result.response.status, result.response.body) == (201, b'{"found_by": "hook", "key": "k-h"}')
    assert result.detail == {"method": "hook", "source": "support_hooks"}


async def test_hook_that_raises_is_unknown(upstream: Upstream, forwarder: Forwarder) -> None:
    route = route_for(upstream.url, {"hook": "tests.support.reconcile_hooks:raising_hook"})
    result = await run_probe(route, record_for(), forwarder)
    assert result.outcome is ProbeOutcome.UNKNOWN
    assert result.detail["reason"] == "RuntimeError: the tool's lookup API exploded"


async def test_hook_returning_something_else_is_unknown(upstream: Upstream, forwarder: Forwarder) -> None:
    route = route_for(upstream.url, {"hook": "tests.support.reconcile_hooks:wrong_type_hook"})
    result = await run_probe(route, record_for(), forwarder)
    assert result.outcome is ProbeOutcome.UNKNOWN
    assert result.response is None
    assert "returned dict, not ProbeResult" in result.detail["reason"]
    assert "tests.support.reconcile_hooks:wrong_type_hook" in result.detail["reason"]


# -- resend -----------------------------------------------------------------------------------------


async def test_resend_returns_the_tools_original_answer_without_a_new_effect(
    upstream: Upstream, forwarder: Forwarder
) -> None:
    first = await effect(upstream, "k-r", path="/keyed", body={"title": "a"})
    route = route_for(upstream.url, {"resend_safe": True})
    request = StoredRequest(
        headers=(("Idempotency-Key", "k-r"), ("Content-Type", "application/json")), body=b'{"title":"a"}'
    )
    result = await run_probe(route, record_for("k-r", request=request, target="/keyed"), forwarder)
    assert result.outcome is ProbeOutcome.FOUND
    assert result.response is not None
    assert result.response.status == 201
    assert orjson.loads(result.response.body or b"") == first
    assert result.detail == {"method": "resend", "resend_status": 201}
    assert upstream.count() == 1


async def test_resend_answered_with_an_ambiguous_status_is_unknown(upstream: Upstream, forwarder: Forwarder) -> None:
    route = route_for(upstream.url, {"resend_safe": True})
    request = StoredRequest(headers=(("Idempotency-Key", "k-s"),), body=b"{}")
    result = await run_probe(route, record_for("k-s", request=request, target="/status/502"), forwarder)
    assert result.outcome is ProbeOutcome.UNKNOWN
    assert result.detail["reason"] == "the resend was answered 502"


async def test_resend_without_the_stored_request_is_unknown(upstream: Upstream, forwarder: Forwarder) -> None:
    route = route_for(upstream.url, {"resend_safe": True})
    result = await run_probe(route, record_for("k-r", request=None, target="/keyed"), forwarder)
    assert result.outcome is ProbeOutcome.UNKNOWN
    assert "not kept" in result.detail["reason"]
    assert upstream.count() == 0
