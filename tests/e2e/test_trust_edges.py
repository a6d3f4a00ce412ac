"""What a caller sends never reaches the tool, or a reconcile probe, otherwise than the
proxy recorded it (issue 22): the identity it established, the task a derived key
needs, probe URL values that stay in their path segment, and exactly one key.

Each goes through a real proxy on both stores, to a real tool that counts what it
did, and ends with the invariant: at most one effect per operation, and nothing sent
where the operation's own request or probe does not go.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from idemproxy.config.settings import ProxyConfig, parse_config
from idemproxy.ledger import probes
from idemproxy.ledger.probes import render_url
from idemproxy.lifecycle.records import OperationRecord, State
from idemproxy.store import Store
from idemproxy.store.base import OpsQuery
from tests.conftest import ProxyFactory, proxy_config
from tests.support.auth import EXECUTOR_TOKEN, PLANNER_TOKEN, auth_config, auth_setup, bearer, signed
from tests.support.problems import assert_problem
from tests.support.records import record_for
from tests.support.upstream import Upstream
from tests.support.wire import connected

ServerFactory = Callable[..., Awaitable[TestServer]]


async def records(store: Store) -> list[OperationRecord]:
    return await store.query(OpsQuery())


async def raw_exchange(client: TestClient[Any, Any], head: list[tuple[str, str]], body: bytes = b"{}") -> bytes:
    """One request with exactly these header lines (repeats and ``Connection`` as written); the answer."""
    lines = [f"POST /echo HTTP/1.1\r\nHost: tool\r\nContent-Length: {len(body)}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in head]
    async with connected(client.server.port, host=client.server.host) as connection:
        await connection.send("".join(lines).encode() + b"Content-Type: application/json\r\n\r\n" + body)
        reply = await connection.reply()
    return reply.head + reply.body


# -- 3: the caller the tool sees is the one authentication established ---------------------------


@pytest.fixture
def auth_proxy(make_proxy: ProxyFactory, upstream: Upstream, store_url: str, tmp_path: Path) -> ProxyFactory:
    identities = auth_setup(tmp_path)

    async def factory(**route: Any) -> TestClient[Any, Any]:
        return await make_proxy(config=auth_config(upstream.url, store_url, identities, **route))

    return factory


@pytest.mark.parametrize(
    ("method", "credentials", "identity"),
    [
        pytest.param("POST", bearer(EXECUTOR_TOKEN), "executor", id="recorded-bearer"),
        pytest.param("POST", None, "signer", id="recorded-hmac"),
        pytest.param("GET", bearer(PLANNER_TOKEN), "planner", id="passthrough"),
    ],
)
@pytest.mark.parametrize("claimed", [{"X-Idem-Caller": "admin-bot"}, {}], ids=["spoofed", "unnamed"])
async def test_the_tool_sees_the_authenticated_identity_never_the_claimed_caller(
    auth_proxy: ProxyFactory,
    upstream: Upstream,
    store: Store,
    method: str,
    credentials: dict[str, str] | None,
    identity: str,
    claimed: dict[str, str],
) -> None:
    proxy = await auth_proxy()
    body = b"{}" if method == "POST" else b""
    headers = {**claimed, "X-Agent-Task": "run-9", "Content-Type": "application/json"}
    if method == "POST":
        headers["Idempotency-Key"] = "k-1"
    headers |= (
        credentials if credentials is not None else signed(method, "/echo", body, headers.get("Idempotency-Key", ""))
    )
    response = await proxy.request(method, "/echo", data=body, headers=headers)

    assert response.status == 200, await response.text()
    seen = upstream.effects[-1].headers
    assert seen["X-Idem-Caller"] == identity
    assert seen["X-Agent-Task"] == "run-9"  # the task as sent: the one the ledger recorded
    assert "Authorization" not in seen
    stored = await records(store)
    if method == "POST":
        assert [(record.scope.caller, record.scope.task) for record in stored] == [(identity, "run-9")]
    else:
        assert stored == []
    assert upstream.count() == 1


async def test_a_renamed_caller_header_carries_the_identity_too(
    make_proxy: ProxyFactory, upstream: Upstream, store_url: str, tmp_path: Path
) -> None:
    document = {
        "store": store_url,
        "headers": {"caller": "X-On-Behalf-Of"},
        "auth": {"identities_file": str(auth_setup(tmp_path))},
        "routes": [{"prefix": "/", "name": "tools", "upstream": upstream.url}],
    }
    proxy = await make_proxy(config=parse_config(document))
    headers = {**bearer(EXECUTOR_TOKEN), "Idempotency-Key": "k-2", "X-On-Behalf-Of": "admin-bot"}
    response = await proxy.post("/echo", json={}, headers=headers)

    assert response.status == 200
    assert upstream.effects[-1].headers["X-On-Behalf-Of"] == "executor"
    assert upstream.count() == 1


# -- 4: a derived key needs the task, unless the route opts into caller scope ----------------------


@pytest.mark.parametrize(
    ("task_header", "sent"),
    [
        pytest.param("X-Agent-Task", {}, id="no-task"),
        pytest.param("X-Agent-Task", {"X-Agent-Task": ""}, id="empty-task"),
        pytest.param("X-Run", {"X-Agent-Task": "run-1"}, id="renamed-task-header"),
    ],
)
async def test_derive_without_a_task_is_refused_and_names_the_header(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store, task_header: str, sent: dict[str, str]
) -> None:
    config = parse_config(
        {
            "headers": {"task": task_header},
            "routes": [{"prefix": "/", "upstream": upstream.url, "key_mode": "derive"}],
        }
    )
    proxy = await make_proxy(config=config)
    # Two runs make the same call: before, the second got the first one's answer.
    first = await proxy.post("/items", json={"title": "a"}, headers=sent)
    second = await proxy.post("/items", json={"title": "a"}, headers=sent)

    for response in (first, second):
        body = await assert_problem(response, 400, "missing-task")
        assert task_header in body["detail"]
        assert body["header"] == task_header
        assert "Idempotent-Replayed" not in response.headers
    assert await records(store) == []
    assert upstream.count() == 0


async def test_derive_scope_caller_is_the_explicit_opt_in_to_taskless_keys(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    proxy = await make_proxy(key_mode="derive", derive_scope="caller")
    first = await proxy.post("/items", json={"title": "a"}, headers={"X-Idem-Caller": "cron"})
    again = await proxy.post("/items", json={"title": "a"}, headers={"X-Idem-Caller": "cron"})
    other_caller = await proxy.post("/items", json={"title": "a"}, headers={"X-Idem-Caller": "batch"})

    assert first.status == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await again.read() == await first.read()
    assert other_caller.status == 201
    assert "Idempotent-Replayed" not in other_caller.headers
    assert sorted((record.scope.caller, record.scope.task) for record in await records(store)) == [
        ("batch", None),
        ("cron", None),
    ]
    assert upstream.count() == 2


async def test_derive_with_a_task_still_makes_a_runs_retries_one_operation(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(key_mode="derive")  # derive_scope: task, the default
    run = {"X-Agent-Task": "run-1"}
    first = await proxy.post("/items", json={"title": "a"}, headers=run)
    again = await proxy.post("/items", json={"title": "a"}, headers=run)
    assert first.status == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert upstream.count() == 1


def test_derive_scope_is_validated_and_defaults_to_task() -> None:
    assert proxy_config("http://tool.test", key_mode="derive").routes[0].derive_scope.value == "task"
    with pytest.raises(ValueError, match=r"routes\[0\]\.derive_scope: expected one of task, caller"):
        proxy_config("http://tool.test", key_mode="derive", derive_scope="run")


def test_check_config_says_which_scope_each_derive_route_uses(tmp_path: Path) -> None:
    path = tmp_path / "idemproxy.yaml"
    document = {
        "headers": {"task": "X-Run"},
        "route_defaults": {"key_mode": "derive"},
        "routes": [
            {"name": "keyed", "prefix": "/keyed", "upstream": "http://tool.test", "key_mode": "require"},
            {"name": "per-run", "prefix": "/per-run", "upstream": "http://tool.test"},
            {"name": "per-caller", "prefix": "/cron", "upstream": "http://tool.test", "derive_scope": "caller"},
        ],
    }
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "idemproxy", "check-config", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "3 route(s)" in lines[0]
    scopes = {line.split(":", 1)[0].strip(): line for line in lines[1:]}
    assert set(scopes) == {"route per-run", "route per-caller"}  # the require route derives nothing
    assert "derive_scope task" in scopes["route per-run"]
    assert "without a key or X-Run is refused" in scopes["route per-run"]
    assert "derive_scope caller" in scopes["route per-caller"]


# -- 5: probe URL values stay in their path segment -------------------------------------------------


@dataclass
class AccountTool:
    """A tool whose tickets live under accounts: ``POST /accounts/{account}/tickets`` files one
    (keyed by ``Idempotency-Key``) and loses the answer; ``GET /accounts/{account}/tickets/{key}``
    finds it; ``GET /lookup?key=`` lists them. Any other GET finds *something*, as a
    tool's other resources would: a probe that reached one would take it for the ticket."""

    url: str = ""
    filed: list[tuple[str, str]] = field(default_factory=list)  # (account, key)
    gets: list[str] = field(default_factory=list)  # the raw target of every GET
    credentials: list[str | None] = field(default_factory=list)  # each GET's Authorization

    async def file(self, request: web.Request) -> web.Response:
        self.filed.append((request.match_info["account"], request.headers.get("Idempotency-Key", "")))
        assert request.transport is not None
        request.transport.abort()  # the effect happened; its answer is lost
        return web.Response()

    def _saw(self, request: web.Request) -> None:
        self.gets.append(request.raw_path)
        self.credentials.append(request.headers.get("Authorization"))

    async def ticket(self, request: web.Request) -> web.Response:
        self._saw(request)
        wanted = (request.match_info["account"], request.match_info["key"])
        if wanted not in self.filed:
            return web.json_response({}, status=404)
        return web.json_response({"ticket": {"id": self.filed.index(wanted) + 1, "account": wanted[0]}})

    async def lookup(self, request: web.Request) -> web.Response:
        self._saw(request)
        key = request.query.get("key")
        found = [{"id": n, "account": account} for n, (account, filed) in enumerate(self.filed, 1) if filed == key]
        return web.json_response({"tickets": found})

    async def elsewhere(self, request: web.Request) -> web.Response:
        self._saw(request)
        return web.json_response({"ticket": {"id": "admin", "secret": "not the caller's"}})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/accounts/{account}/tickets", self.file)
        app.router.add_get("/accounts/{account}/tickets/{key}", self.ticket)
        app.router.add_get("/lookup", self.lookup)
        app.router.add_get("/{tail:.*}", self.elsewhere)
        return app


@pytest.fixture
async def account_tool(aiohttp_server: ServerFactory) -> AccountTool:
    tool = AccountTool()
    server = await aiohttp_server(tool.app())
    tool.url = str(server.make_url("")).rstrip("/")
    return tool


BY_ACCOUNT = "{upstream}/accounts/{caller}/tickets/{key}"


def probed_config(tool: AccountTool, url: str) -> ProxyConfig:
    return proxy_config(
        tool.url,
        upstream_headers={"Authorization": "Bearer tool-secret"},
        reconcile={"probe": {"url": url, "match": "ticket || tickets[0]"}, "found": {"status": 201}},
    )


@pytest.mark.parametrize(
    ("template", "headers", "body", "placeholder"),
    [
        pytest.param(BY_ACCOUNT, {"X-Idem-Caller": ".."}, {}, "{caller}", id="caller-dot-dot"),
        pytest.param(BY_ACCOUNT, {"X-Idem-Caller": "..;x"}, {}, "{caller}", id="caller-dot-dot-param"),
        pytest.param(BY_ACCOUNT, {"Idempotency-Key": "../../admin"}, {}, "{key}", id="key-climbs"),
        pytest.param(BY_ACCOUNT, {"Idempotency-Key": "%2E%2E"}, {}, "{key}", id="key-encoded-dots"),
        pytest.param(BY_ACCOUNT, {"Idempotency-Key": "a%2Fb"}, {}, "{key}", id="key-encoded-slash"),
        pytest.param(BY_ACCOUNT, {"Idempotency-Key": "a\\b"}, {}, "{key}", id="key-backslash"),
        pytest.param(
            "{upstream}/accounts/{task}/tickets/{key}", {"X-Agent-Task": ".."}, {}, "{task}", id="task-dot-dot"
        ),
        pytest.param("{upstream}/accounts/{task}/tickets/{key}", {}, {}, "{task}", id="task-absent"),
        pytest.param(
            "{upstream}/accounts/{body.account}/tickets/{key}",
            {},
            {"account": ".."},
            "{body.account}",
            id="body-field-dot-dot",
        ),
        pytest.param(
            "{upstream}/accounts/{body.account}/tickets/{key}",
            {},
            {"account": "a\u0085b"},
            "{body.account}",
            id="body-field-control-char",
        ),
    ],
)
async def test_a_value_that_would_leave_its_path_segment_makes_the_operation_unprobeable(
    make_proxy: ProxyFactory,
    account_tool: AccountTool,
    store: Store,
    template: str,
    headers: dict[str, str],
    body: dict[str, Any],
    placeholder: str,
) -> None:
    proxy = await make_proxy(config=probed_config(account_tool, template))
    sent = {"X-Idem-Caller": "bob", "Idempotency-Key": "k-1", **headers}
    first = await proxy.post("/accounts/bob/tickets", json=body, headers=sent)  # filed; the answer is lost
    retry = await proxy.post("/accounts/bob/tickets", json=body, headers=sent)

    assert first.status == 502
    attention = await assert_problem(retry, 409, "needs-attention")
    assert account_tool.gets == []  # no probe went anywhere, with the tool's credentials or without
    record = await store.get(attention["operation"])
    assert record is not None
    assert record.state is State.NEEDS_ATTENTION
    assert record.evidence[-1].kind == "escalated"
    reason = str(record.evidence[-1].detail["reason"])
    assert f"{placeholder} cannot stand in the probe URL's path" in reason
    assert len(account_tool.filed) == 1


async def test_a_path_value_is_percent_encoded_whole_and_the_probe_still_finds_the_effect(
    make_proxy: ProxyFactory, account_tool: AccountTool, store: Store
) -> None:
    proxy = await make_proxy(config=probed_config(account_tool, BY_ACCOUNT))
    sent = {"X-Idem-Caller": "team one", "Idempotency-Key": "k 1&x=y?#..;"}
    first = await proxy.post("/accounts/team%20one/tickets", json={}, headers=sent)
    retry = await proxy.post("/accounts/team%20one/tickets", json={}, headers=sent)

    assert first.status == 502
    assert retry.status == 201, await retry.text()
    assert retry.headers["Idempotent-Reconciled"] == "true"
    assert await retry.json() == {"id": 1, "account": "team one"}
    assert account_tool.gets == ["/accounts/team%20one/tickets/k%201%26x%3Dy%3F%23..%3B"]
    assert account_tool.credentials == ["Bearer tool-secret"]
    assert len(account_tool.filed) == 1


async def test_query_values_are_query_components_and_may_hold_slashes_and_dots(
    make_proxy: ProxyFactory, account_tool: AccountTool
) -> None:
    proxy = await make_proxy(config=probed_config(account_tool, "{upstream}/lookup?account={caller}&key={key}"))
    sent = {"X-Idem-Caller": "..", "Idempotency-Key": "../x&account=admin"}
    first = await proxy.post("/accounts/bob/tickets", json={}, headers=sent)
    retry = await proxy.post("/accounts/bob/tickets", json={}, headers=sent)

    assert first.status == 502
    assert retry.status == 201, await retry.text()
    assert account_tool.gets == ["/lookup?account=..&key=..%2Fx%26account%3Dadmin"]
    assert len(account_tool.filed) == 1


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        pytest.param("", "it is empty", id="empty"),
        pytest.param(".", "it is a dot segment", id="dot"),
        pytest.param("..", "it is a dot segment", id="dot-dot"),
        pytest.param("..;jsessionid=1", "it is a dot segment", id="dot-dot-param"),
        pytest.param("a/b", "it holds a slash or a backslash", id="slash"),
        pytest.param("a\\b", "it holds a slash or a backslash", id="backslash"),
        pytest.param("a\x00b", "it holds a control character", id="nul"),
        pytest.param("a\x7fb", "it holds a control character", id="del"),
        pytest.param("%2e%2E", "it is a dot segment once percent-decoded", id="encoded-dots"),
        pytest.param("%2F", "it holds a slash or a backslash once percent-decoded", id="encoded-slash"),
        pytest.param("%5c", "it holds a slash or a backslash once percent-decoded", id="encoded-backslash"),
        pytest.param("a%0Ab", "it holds a control character once percent-decoded", id="encoded-lf"),
        pytest.param("%252e%252e", "it is a dot segment decoded 2 times", id="double-encoded-dots"),
        pytest.param("%25252e%25252e", "it is still percent-encoded after 3 decodings", id="triple-encoded"),
    ],
)
def test_a_path_value_that_is_no_single_segment_is_unprobeable(value: str, reason: str) -> None:
    route = probed_config(AccountTool(url="http://tool.test"), "{upstream}/t/{key}").routes[0]
    with pytest.raises(probes.Unprobeable, match=re.escape(f"{{key}} cannot stand in the probe URL's path: {reason}")):
        render_url("{upstream}/t/{key}", route, record_for(value))
    # In the query the same value is a query component, encoded whole.
    assert (
        render_url("{upstream}/t?key={key}", route, record_for(value))
        == f"http://tool.test/t?key={quote(value, safe='')}"
    )


@pytest.mark.parametrize("value", ["k-1", "...", ".hidden", "a..b", "a b", "100%", "%zz", "a;b", "~me", "é"])
def test_any_other_path_value_is_percent_encoded_whole(value: str) -> None:
    route = probed_config(AccountTool(url="http://tool.test"), "{upstream}/t/{key}").routes[0]
    assert render_url("{upstream}/t/{key}", route, record_for(value)) == f"http://tool.test/t/{quote(value, safe='')}"


@pytest.mark.parametrize("key", [".", ".."])
async def test_a_dot_segment_key_is_refused_at_the_front_door(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store, key: str
) -> None:
    proxy = await make_proxy()
    response = await proxy.post("/items", json={}, headers={"Idempotency-Key": key})
    body = await assert_problem(response, 400, "invalid-idempotency-key")
    assert repr(key) in body["detail"]
    assert await records(store) == []
    assert upstream.count() == 0


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("{upstream}{key}", "{upstream} must be followed by '/', '?'", id="glued-to-upstream"),
        pytest.param("http://{caller}.tools.test/t/{key}", "not in the host", id="in-the-host"),
        pytest.param("https://tools.test:{key}/t", "not in the host", id="in-the-port"),
        pytest.param("{upstream}/t/{key}?q=a b", "printable ASCII without spaces", id="unencoded-literal"),
    ],
)
def test_a_probe_url_template_that_could_send_the_probe_astray_is_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"routes\[0\]\.reconcile\.probe\.url: .*" + re.escape(message)):
        proxy_config("http://tool.test", reconcile={"probe": {"url": url, "match": "x"}})


# -- 8: exactly one key, the one recorded ---------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        pytest.param([("Idempotency-Key", "k-1"), ("Connection", "Idempotency-Key")], id="connection-key"),
        pytest.param([("Idempotency-Key", "k-1"), ("Connection", "keep-alive, idempotency-key")], id="conn-key-case"),
        pytest.param([("Idempotency-Key", "k-1"), ("Connection", "X-Idem-Caller")], id="connection-caller"),
        pytest.param([("Idempotency-Key", "k-1"), ("Connection", "close, X-Agent-Task")], id="connection-task"),
        pytest.param([("Idempotency-Key", "k-1"), ("Idempotency-Key", "k-2")], id="two-keys"),
        pytest.param([("Idempotency-Key", "k-1"), ("Idempotency-Key", "k-1")], id="the-same-key-twice"),
        pytest.param([("Idempotency-Key", "k-1"), ("X-Idem-Caller", "a"), ("X-Idem-Caller", "b")], id="two-callers"),
        pytest.param([("Idempotency-Key", "k-1"), ("X-Agent-Task", "t"), ("X-Agent-Task", "u")], id="two-tasks"),
    ],
)
async def test_an_own_header_sent_twice_or_named_in_connection_is_refused(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store, head: list[tuple[str, str]]
) -> None:
    proxy = await make_proxy()
    answer = await raw_exchange(proxy, head)

    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"application/problem+json" in answer
    assert b"urn:idemproxy:problem:ambiguous-header" in answer
    assert await records(store) == []
    assert upstream.count() == 0


async def test_the_configured_header_names_are_the_ones_guarded(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    config = parse_config(
        {
            "headers": {"key": "X-Op", "caller": "X-Who", "task": "X-Run"},
            "routes": [{"prefix": "/", "upstream": upstream.url}],
        }
    )
    proxy = await make_proxy(config=config)
    smuggled = await raw_exchange(proxy, [("X-Op", "k-1"), ("Connection", "X-Op")])
    twice = await raw_exchange(proxy, [("X-Op", "k-1"), ("X-Run", "a"), ("X-Run", "b")])
    plain = await raw_exchange(proxy, [("X-Op", "k-1"), ("Connection", "Idempotency-Key"), ("Idempotency-Key", "x")])

    assert smuggled.startswith(b"HTTP/1.1 400 ")
    assert b"X-Op" in smuggled
    assert twice.startswith(b"HTTP/1.1 400 ")
    assert b"X-Run" in twice
    assert plain.startswith(b"HTTP/1.1 200 ")  # not idemproxy's header here: hop-by-hop as the caller says
    assert upstream.effects[-1].headers["X-Op"] == "k-1"
    assert "Idempotency-Key" not in upstream.effects[-1].headers
    assert [record.scope.key for record in await records(store)] == ["k-1"]
    assert upstream.count() == 1


async def test_a_derived_key_reaches_the_tool_as_recorded(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    proxy = await make_proxy(key_mode="derive")
    response = await proxy.post("/echo", json={"a": 1}, headers={"X-Agent-Task": "run-1"})

    assert response.status == 200
    (record,) = await records(store)
    assert upstream.effects[-1].headers["Idempotency-Key"] == record.scope.key
    assert record.scope.key.startswith("derived:")
    assert upstream.count() == 1


@dataclass
class PaymentTool:
    """Honours ``Idempotency-Key``: a repeated key gets the first answer and no new effect. A
    request without one is a new payment. The first answer is lost (connection dropped)."""

    url: str = ""
    payments: list[str | None] = field(default_factory=list)  # the key each payment came with
    answers: dict[str, bytes] = field(default_factory=dict)
    seen_keys: list[list[str]] = field(default_factory=list)  # every request's Idempotency-Key values

    async def pay(self, request: web.Request) -> web.Response:
        keys = request.headers.getall("Idempotency-Key", [])
        self.seen_keys.append(keys)
        key = keys[0] if keys else None
        await request.read()
        if key is not None and key in self.answers:
            return web.Response(body=self.answers[key], status=201, content_type="application/json")
        self.payments.append(key)
        answer = orjson.dumps({"payment": len(self.payments)})
        if key is not None:
            self.answers[key] = answer
        if len(self.payments) == 1:
            assert request.transport is not None
            request.transport.abort()
        return web.Response(body=answer, status=201, content_type="application/json")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/pay", self.pay)
        return app


async def test_a_resend_carries_the_recorded_key(
    make_proxy: ProxyFactory, aiohttp_server: ServerFactory, store: Store
) -> None:
    tool = PaymentTool()
    tool.url = str((await aiohttp_server(tool.app())).make_url("")).rstrip("/")
    proxy = await make_proxy(config=proxy_config(tool.url, key_mode="derive", reconcile={"resend_safe": True}))
    run = {"X-Agent-Task": "run-1"}
    first = await proxy.post("/pay", json={"amount": 5}, headers=run)  # paid; the answer is lost
    retry = await proxy.post("/pay", json={"amount": 5}, headers=run)  # reconciled by a resend

    assert first.status == 502
    assert retry.status == 201, await retry.text()
    assert retry.headers["Idempotent-Reconciled"] == "true"
    assert await retry.json() == {"payment": 1}
    (record,) = await records(store)
    assert tool.seen_keys == [[record.scope.key], [record.scope.key]]  # the attempt, then the resend
    assert tool.payments == [record.scope.key]  # one payment
