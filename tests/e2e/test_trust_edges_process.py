"""Issue 22 through the real process: each item injected into ``python -m idemproxy run``, as
a deployment runs it, in front of real tools (aiohttp, or raw sockets that write exact bytes)
and on real ledgers (SQLite, redis-server). The in-process tests (``tests/e2e/test_trust_edges.py``,
``tests/hostile``, ``tests/pipeline/test_header_bytes.py``) cover each item in depth; these check
that the shipped process behaves the same way.

One process per configuration and module: ``plain`` (no auth; SQLite, and Redis for item 7),
``authed`` (identities, bearer and HMAC). The flow-control and ledger faults are in
``test_trust_edges_process_faults.py``. Callers write raw bytes where the wire is the point.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio

from idemproxy.edge.auth import SIGNATURE_HEADER
from tests.support.auth import ADMIN_TOKEN, EXECUTOR_TOKEN, PLANNER_TOKEN, auth_setup, bearer, signed
from tests.support.problems import assert_problem
from tests.support.processes import RunningProxy, idemproxy_run, served
from tests.support.raw_tool import Peer, RawServer
from tests.support.records import op_id_for
from tests.support.redis_server import RedisServer
from tests.support.upstream import Upstream
from tests.support.wire import Reply, connected, exchange, request

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: What the raw tool answers ``/raw/bytes`` with (item 7): header values that are not UTF-8.
TOOL_HEADER_LINES = [b"X-Foo: \xff\xfe", b"X-High: " + bytes(range(0x80, 0x100))]
#: The raw tool answers with the reason phrase whose bytes this header carries in hex (item 13).
REASON_HEADER = "X-Reason-Hex"
#: What the ticket tool answers a GET for anything but a ticket that was filed: a probe that
#: strayed there would take it for the effect.
ELSEWHERE = b'{"ticket":{"id":"elsewhere","secret":"not the caller\'s"}}'


def http_answer(body: bytes, *, status: bytes = b"200 OK", fields: list[bytes] | None = None) -> bytes:
    head = [b"HTTP/1.1 " + status, b"Content-Type: application/json", *(fields or [])]
    return b"\r\n".join([*head, b"Content-Length: %d" % len(body)]) + b"\r\n\r\n" + body


# -- the tools --------------------------------------------------------------------------------------


async def raw_answers(peer: Peer) -> None:
    """``/raw/bytes``: 201 with ``TOOL_HEADER_LINES``; anything else: 201 with the reason phrase
    the request names in ``X-Reason-Hex``. Each answer's body numbers the request."""
    while (received := await peer.request()) is not None:
        reason = bytes.fromhex(received.headers.get(REASON_HEADER, b"Created".hex()))
        fields = TOOL_HEADER_LINES if received.target.startswith("/raw/bytes") else []
        body = orjson.dumps({"effect": len(peer.server.requests)})
        await peer.send(http_answer(body, status=b"201 " + reason, fields=fields))


def filed(server: RawServer) -> list[tuple[str, str]]:
    """(path, key) of each ticket filed, percent-decoded."""
    return [
        (urllib.parse.unquote(posted.target), posted.headers.get("Idempotency-Key", ""))
        for posted in server.requests
        if posted.line.startswith("POST ")
    ]


async def tickets(peer: Peer) -> None:
    """``POST /{kind}/{account}/tickets`` files a ticket and loses the answer (the connection
    is reset after the effect); ``GET .../tickets/{key}`` finds a filed one; any other GET
    finds *something*. Every request that reaches the socket is recorded, refused or not."""
    while (received := await peer.request()) is not None:
        if received.line.startswith("POST "):
            peer.reset()
            return
        path, _, key = urllib.parse.unquote(received.target).rpartition("/")
        found = filed(peer.server)
        if (path, key) in found:
            body = orjson.dumps({"ticket": {"id": found.index((path, key)) + 1, "key": key}})
        else:
            body = ELSEWHERE
        await peer.send(http_answer(body))


@dataclass
class Tools:
    upstream: Upstream
    raw: RawServer
    tickets: RawServer

    def clear(self) -> None:
        self.upstream.effects.clear()
        for server in (self.raw, self.tickets):
            server.requests.clear()

    def reached(self, server: RawServer) -> list[str]:
        """The request lines ``server`` received."""
        return [received.line for received in server.requests]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_tools() -> AsyncIterator[Tools]:
    upstream = Upstream()
    raw, ticket_tool = RawServer(raw_answers), RawServer(tickets)
    await raw.start()
    await ticket_tool.start()
    try:
        async with served(upstream.app()) as url:
            upstream.url = url
            yield Tools(upstream, raw, ticket_tool)
    finally:
        await raw.close()
        await ticket_tool.close()


@pytest.fixture
def tools(module_tools: Tools) -> Tools:
    """The module's tools with nothing recorded yet."""
    module_tools.clear()
    return module_tools


# -- the processes ------------------------------------------------------------------------------------


def plain_settings(tools: Tools) -> dict[str, Any]:
    def probed(template: str) -> dict[str, Any]:
        return {"probe": {"url": template, "match": "ticket"}, "found": {"status": 201}}

    ticket_tool = str(tools.tickets.url)
    return {
        "log_level": "info",
        "shutdown_grace": "1s",
        "routes": [
            {"name": "derive", "prefix": "/items/derive", "upstream": tools.upstream.url, "key_mode": "derive"},
            {
                "name": "cron",
                "prefix": "/items/cron",
                "upstream": tools.upstream.url,
                "key_mode": "derive",
                "derive_scope": "caller",
            },
            {
                "name": "accounts",
                "prefix": "/accounts",
                "upstream": ticket_tool,
                "upstream_headers": {"Authorization": "Bearer tool-secret"},
                "reconcile": probed("{upstream}/accounts/{caller}/tickets/{key}"),
            },
            {
                "name": "teams",
                "prefix": "/teams",
                "upstream": ticket_tool,
                "reconcile": probed("{upstream}/teams/{body.account}/tickets/{key}"),
            },
            {"name": "raw", "prefix": "/raw", "upstream": str(tools.raw.url)},
        ],
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plain(
    module_tools: Tools, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, RunningProxy]]:
    """Without auth: one process on SQLite, one on a redis-server of its own."""
    directory = tmp_path_factory.mktemp("plain")
    redis = RedisServer(directory / "redis")
    redis.start()
    settings = plain_settings(module_tools)
    try:
        async with (
            idemproxy_run(settings, directory, store=f"sqlite:///{directory / 'ledger.db'}", name="sqlite") as sqlite,
            idemproxy_run(settings, directory, store=redis.url, name="redis") as on_redis,
        ):
            yield {"sqlite": sqlite, "redis": on_redis}
    finally:
        redis.kill()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def authed(module_tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningProxy]:
    """Auth on (``tests.support.auth``'s identities) on both listeners, in front of the upstream."""
    directory = tmp_path_factory.mktemp("authed")
    settings = {
        "shutdown_grace": "1s",
        "auth": {"identities_file": str(auth_setup(directory))},
        "routes": [{"name": "tools", "prefix": "/", "upstream": module_tools.upstream.url}],
    }
    async with idemproxy_run(settings, directory, store=f"sqlite:///{directory / 'ledger.db'}") as proxy:
        yield proxy


@pytest_asyncio.fixture(loop_scope="module")
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def shown(session: aiohttp.ClientSession, proxy: RunningProxy, op_id: str, **headers: str) -> dict[str, Any]:
    """``GET /_idem/ops/{op_id}`` on ``proxy``'s admin listener."""
    async with session.get(f"{proxy.admin_url}/_idem/ops/{op_id}", headers=headers) as response:
        assert response.status == 200, await response.text()
        view: dict[str, Any] = await response.json()
        return view


# -- 3: the caller the tool sees is the one authentication established ---------------------------------


@pytest.mark.parametrize(
    ("method", "identity"),
    [("POST", "executor"), ("POST", "signer"), ("GET", "planner")],
    ids=["recorded-bearer", "recorded-hmac", "passthrough-bearer"],
)
async def test_item_3_the_tool_sees_the_authenticated_identity_never_the_claimed_caller(
    authed: RunningProxy, tools: Tools, session: aiohttp.ClientSession, method: str, identity: str
) -> None:
    """Item 3. Injects: an authenticated caller (bearer or HMAC) that claims ``X-Idem-Caller:
    admin-bot``. Asserts: the tool receives ``X-Idem-Caller`` naming the authenticated identity
    and no credentials; a recorded call is recorded under that identity."""
    task = f"run-{identity}-{method}"
    key = f"k-{identity}" if method == "POST" else ""
    body = b"{}" if method == "POST" else b""
    headers = {"X-Idem-Caller": "admin-bot", "X-Agent-Task": task, "Content-Type": "application/json"}
    if key:
        headers["Idempotency-Key"] = key
    token = {"executor": EXECUTOR_TOKEN, "planner": PLANNER_TOKEN}.get(identity)
    headers |= bearer(token) if token else signed(method, "/echo/3", body, key)

    async with session.request(method, f"{authed.url}/echo/3", data=body, headers=headers) as response:
        assert response.status == 200, await response.text()

    (effect,) = tools.upstream.effects
    assert effect.headers["X-Idem-Caller"] == identity
    assert effect.headers["X-Agent-Task"] == task
    assert "Authorization" not in effect.headers
    listed = f"{authed.admin_url}/_idem/ops?task={task}"
    async with session.get(listed, headers=bearer(ADMIN_TOKEN)) as response:
        recorded = [(op["caller"], op["task"]) for op in (await response.json())["operations"]]
    assert recorded == ([(identity, task)] if method == "POST" else [])


# -- 4: a derived key needs the task, unless the route opts into caller scope ------------------------


async def test_item_4_derive_without_a_task_is_refused_with_a_problem_naming_the_header(
    plain: dict[str, RunningProxy], tools: Tools, session: aiohttp.ClientSession
) -> None:
    """Item 4. Injects: the same keyless call twice on a ``key_mode: derive`` route, without
    ``X-Agent-Task`` (two runs that would have been merged). Asserts: both get 400
    ``missing-task`` naming the header, nothing reaches the tool; with a task, the second is a
    replay of the first (the route does derive)."""
    url = f"{plain['sqlite'].url}/items/derive"
    for _ in range(2):
        async with session.post(url, json={"amount": 5}) as response:
            problem = await assert_problem(response, 400, "missing-task")
            assert problem["header"] == "X-Agent-Task"
            assert "X-Agent-Task" in problem["detail"]
            assert "Idempotent-Replayed" not in response.headers
    assert tools.upstream.count() == 0

    answers = []
    for _ in range(2):
        async with session.post(url, json={"amount": 5}, headers={"X-Agent-Task": "run-4"}) as response:
            answers.append((response.status, await response.read(), response.headers.get("Idempotent-Replayed")))
    assert [(status, replayed) for status, _, replayed in answers] == [(201, None), (201, "true")]
    assert answers[0][1] == answers[1][1]
    assert tools.upstream.count() == 1


async def test_item_4_derive_scope_caller_is_the_explicit_opt_in_to_taskless_keys(
    plain: dict[str, RunningProxy], tools: Tools, session: aiohttp.ClientSession
) -> None:
    """Item 4. Injects: keyless, taskless calls on a route with ``derive_scope: caller``.
    Asserts: they are served; the same call by the same caller is one operation (a replay),
    by another caller a new one."""
    url = f"{plain['sqlite'].url}/items/cron"
    replayed = []
    for caller in ("cron", "cron", "batch"):
        async with session.post(url, json={"n": 1}, headers={"X-Idem-Caller": caller}) as response:
            assert response.status == 201, await response.text()
            replayed.append(response.headers.get("Idempotent-Replayed"))
    assert replayed == [None, "true", None]
    assert tools.upstream.count() == 2


# -- 5: probe URL values stay in their path segment ------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers", "body", "placeholder"),
    [
        ("/accounts/bob/tickets", {"X-Idem-Caller": ".."}, {}, "{caller}"),
        ("/accounts/bob/tickets", {"Idempotency-Key": "../../admin"}, {}, "{key}"),
        ("/accounts/bob/tickets", {"Idempotency-Key": "%2E%2E"}, {}, "{key}"),
        ("/teams/bob/tickets", {}, {"account": ".."}, "{body.account}"),
    ],
    ids=["caller-dot-dot", "key-climbs", "key-encoded-dots", "body-field-dot-dot"],
)
async def test_item_5_a_value_that_would_leave_its_path_segment_makes_the_operation_unprobeable(
    plain: dict[str, RunningProxy],
    tools: Tools,
    session: aiohttp.ClientSession,
    path: str,
    headers: dict[str, str],
    body: dict[str, str],
    placeholder: str,
) -> None:
    """Item 5. Injects: a filed ticket whose answer is lost, then its retry, where a value in the
    probe URL's path would climb out of its segment. Asserts: the retry gets 409
    ``needs-attention``; the tool received the one POST and no probe at all (no GET, anywhere);
    the record says why it cannot be probed."""
    proxy = plain["sqlite"]
    sent = {"X-Idem-Caller": "bob", "Idempotency-Key": f"k-5-{placeholder}", **headers}
    async with session.post(f"{proxy.url}{path}", json=body, headers=sent) as first:
        assert first.status == 502, await first.text()
    async with session.post(f"{proxy.url}{path}", json=body, headers=sent) as retry:
        attention = await assert_problem(retry, 409, "needs-attention")

    assert tools.reached(tools.tickets) == [f"POST {path} HTTP/1.1"]
    record = await shown(session, proxy, attention["operation"])
    assert record["state"] == "NEEDS_ATTENTION"
    escalated = record["evidence"][-1]
    assert escalated["kind"] == "escalated"
    assert f"{placeholder} cannot stand in the probe URL's path" in escalated["reason"]


async def test_item_5_a_safe_value_is_probed_at_its_own_path_only(
    plain: dict[str, RunningProxy], tools: Tools, session: aiohttp.ClientSession
) -> None:
    """Item 5, the control: the same lost answer with values that are no dot segments (spaces,
    ``&``, ``?``, ``#``, dots inside). Asserts: exactly one probe, to the ticket's own path with
    each value percent-encoded whole, and the retry gets the ticket it found."""
    proxy = plain["sqlite"]
    sent = {"X-Idem-Caller": "team one", "Idempotency-Key": "k 1&x=y?#..;"}
    async with session.post(f"{proxy.url}/accounts/team%20one/tickets", json={}, headers=sent) as first:
        assert first.status == 502
    async with session.post(f"{proxy.url}/accounts/team%20one/tickets", json={}, headers=sent) as retry:
        assert retry.status == 201, await retry.text()
        assert retry.headers["Idempotent-Reconciled"] == "true"
        assert await retry.json() == {"id": 1, "key": "k 1&x=y?#..;"}

    assert tools.reached(tools.tickets) == [
        "POST /accounts/team%20one/tickets HTTP/1.1",
        "GET /accounts/team%20one/tickets/k%201%26x%3Dy%3F%23..%3B HTTP/1.1",
    ]
    assert tools.tickets.requests[-1].headers["Authorization"] == "Bearer tool-secret"


@pytest.mark.parametrize("key", [".", ".."])
async def test_item_5_a_dot_segment_key_is_refused_at_the_front_door(
    plain: dict[str, RunningProxy], tools: Tools, session: aiohttp.ClientSession, key: str
) -> None:
    """Item 5. Injects: ``Idempotency-Key: ..`` (and ``.``). Asserts: 400
    ``invalid-idempotency-key`` naming the key; nothing reaches the tool."""
    headers = {"Idempotency-Key": key, "X-Idem-Caller": "bob"}
    async with session.post(f"{plain['sqlite'].url}/accounts/bob/tickets", json={}, headers=headers) as response:
        problem = await assert_problem(response, 400, "invalid-idempotency-key")
    assert repr(key) in problem["detail"]
    assert tools.reached(tools.tickets) == []


# -- 7: header bytes that are not UTF-8 --------------------------------------------------------------------


def tool_lines(reply: Reply) -> list[bytes]:
    """The raw tool's own header lines in ``reply``, byte for byte."""
    return [line for line in reply.head.split(b"\r\n") if line.lower().startswith((b"x-foo:", b"x-high:"))]


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_item_7_header_bytes_that_are_not_utf8_are_relayed_recorded_and_replayed_exactly(
    plain: dict[str, RunningProxy], tools: Tools, session: aiohttp.ClientSession, store: str
) -> None:
    """Item 7. Injects: a tool answering a recorded call with ``X-Foo: \\xff\\xfe`` (and every
    high byte). Asserts: the caller gets 201 with those exact bytes; the record is COMPLETED;
    the retry replays the same status, header bytes and body without reaching the tool."""
    proxy = plain[store]
    key = f"bytes-{store}"
    call = request("POST", "/raw/bytes", [("Idempotency-Key", key), ("Content-Type", "application/json")], b"{}")
    first = await exchange(proxy.port, call)
    again = await exchange(proxy.port, call)

    assert first.status == 201, first
    assert tool_lines(first) == TOOL_HEADER_LINES
    assert (again.status, tool_lines(again), again.body) == (201, TOOL_HEADER_LINES, first.body)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert tools.reached(tools.raw) == ["POST /raw/bytes HTTP/1.1"]
    assert (await shown(session, proxy, op_id_for(key, route="raw")))["state"] == "COMPLETED"


# -- 9: a signature that is not ASCII --------------------------------------------------------------------


@pytest.mark.parametrize(
    "signature", ["\xe9".encode() * 64, b"ab" * 31 + "\u212a".encode() + b"a"], ids=["e-acute", "kelvin-sign"]
)
@pytest.mark.parametrize("listener", ["proxy", "admin"])
async def test_item_9_a_non_ascii_hmac_signature_is_401_on_both_listeners(
    authed: RunningProxy, tools: Tools, listener: str, signature: bytes
) -> None:
    """Item 9. Injects: HMAC headers whose signature holds UTF-8 characters beyond ASCII, on the
    proxy listener (a recorded POST) and on the admin listener (``GET /_idem/ops``).
    Asserts: 401 ``unauthenticated`` with ``WWW-Authenticate``, nothing reaches the tool, the
    process logs no error; the same request correctly signed is authenticated."""
    case = len(signature)  # each case signs another request: a signature is accepted once
    if listener == "proxy":
        method, target, body, key = "POST", "/items", b"{}", f"k-9-{case}"
    else:
        method, target, body, key = "GET", f"/_idem/ops?limit={case}", b"", ""
    port = authed.port if listener == "proxy" else authed.admin_port
    valid = signed(method, target, body, key)
    forged = [(name, value.encode()) for name, value in valid.items() if name != SIGNATURE_HEADER]
    errors_before = len(authed.errors())

    refused = await exchange(port, request(method, target, [*forged, (SIGNATURE_HEADER, signature)], body))
    accepted = await exchange(port, request(method, target, list(valid.items()), body))

    assert (refused.status, refused.slug()) == (401, "unauthenticated"), refused
    assert "WWW-Authenticate" in refused.headers
    assert len(authed.errors()) == errors_before, authed.errors()[errors_before:]
    if listener == "proxy":
        assert accepted.status == 201, accepted
        assert tools.upstream.count() == 1  # the signed one only
    else:
        assert (accepted.status, accepted.slug()) == (403, "forbidden")  # authenticated; the signer has no ops access


# -- 12: no 100 Continue before authentication ----------------------------------------------------------


async def test_item_12_expect_100_continue_without_credentials_gets_401_and_never_100(
    authed: RunningProxy, tools: Tools
) -> None:
    """Item 12. Injects: a POST head with ``Expect: 100-continue`` and no credentials, its body
    held back. Asserts: the first answer is 401 (not ``100 Continue``), the connection closes
    after it even when the body is sent anyway, and nothing reaches the tool."""
    head = request("POST", "/items", [("Idempotency-Key", "k-12"), ("Expect", "100-continue")], close=False)
    head = head.replace(b"Content-Length: 0", b"Content-Length: 2")
    async with connected(authed.port) as caller:
        await caller.send(head)
        answer = await caller.reply()
        await caller.send(b"{}")
        rest = await caller.rest()

    assert answer.status_line.startswith(b"HTTP/1.1 401 "), answer.status_line
    assert answer.slug() == "unauthenticated"
    assert answer.closes
    assert rest == b""
    assert tools.upstream.count() == 0


async def test_item_12_expect_100_continue_with_credentials_gets_100_then_the_answer(
    authed: RunningProxy, tools: Tools
) -> None:
    """Item 12, the control. Injects: the same head with a valid bearer token. Asserts:
    ``100 Continue``, then (the body sent) the tool's 201."""
    fields = [("Idempotency-Key", "k-12-ok"), ("Expect", "100-continue"), *bearer(EXECUTOR_TOKEN).items()]
    head = request("POST", "/items", fields, close=False).replace(b"Content-Length: 0", b"Content-Length: 2")
    async with connected(authed.port) as caller:
        await caller.send(head)
        interim = await caller.reply()
        await caller.send(b"{}")
        final = await caller.reply()

    assert interim.status_line == b"HTTP/1.1 100 Continue"
    assert final.status == 201, final
    assert tools.upstream.count() == 1


# -- 13: control characters in the tool's reason phrase -------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "relayed"),
    [
        (b"Cre\x01ated", b"Created"),
        (b"\x1b[2J\x1b[31mpwned\x1b[0m", b"Created"),
        (b"Created\x7f", b"Created"),
        (b"Made It", b"Made It"),  # the control: a visible ASCII reason is relayed as sent
    ],
    ids=["control-char", "escape-sequence", "del", "visible-ascii"],
)
async def test_item_13_control_characters_in_the_reason_phrase_never_reach_the_caller(
    plain: dict[str, RunningProxy], tools: Tools, reason: bytes, relayed: bytes
) -> None:
    """Item 13. Injects: a tool answering 201 with a reason phrase holding ``\\x01``, an ESC
    sequence or DEL, to a passthrough GET and a recorded POST (and its replay). Asserts: every
    status line the caller reads is ``HTTP/1.1 201 Created`` (a visible ASCII reason is relayed as
    sent; a replay carries the standard phrase)."""
    proxy = plain["sqlite"]
    named = (REASON_HEADER, reason.hex())
    recorded = request("POST", "/raw/reason", [named, ("Idempotency-Key", f"k-13-{reason.hex()}")], b"{}")
    lines = [
        (await exchange(proxy.port, data)).status_line
        for data in (request("GET", "/raw/reason", [named], length=False), recorded, recorded)
    ]

    expected = b"HTTP/1.1 201 " + relayed
    assert lines[:2] == [expected, expected]
    assert lines[2] == b"HTTP/1.1 201 Created"  # a replay: the status's standard phrase
    assert len(tools.raw.requests) == 2  # the GET and the first POST; the third was a replay
