"""``idemproxy.edge.auth`` through the real proxy: bearer and HMAC, scopes, identity-scoped
ledger keys, credentials kept from the tool, and rotation without a restart."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from idemproxy.app import build_proxy_app
from idemproxy.config.settings import ConfigError, ProxyConfig, StoreConfig, parse_config
from idemproxy.edge.auth import CHALLENGE, IdentityStore
from idemproxy.ledger.forwarder import Forwarder
from idemproxy.ledger.probes import ProbeOutcome, run_probe
from idemproxy.lifecycle.records import OperationRecord, State
from idemproxy.protocol.keys import Scope
from idemproxy.store import Store, open_store
from idemproxy.store.base import OpsQuery
from tests.support.auth import (
    EXECUTOR2_TOKEN,
    EXECUTOR_TOKEN,
    PLANNER_TOKEN,
    auth_config,
    auth_setup,
    bearer,
    identities,
    signed,
    token_hash,
    write_identities,
)
from tests.support.problems import assert_problem
from tests.support.proxy_server import proxy_app
from tests.support.upstream import Upstream

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def identities_file(tmp_path: Path) -> Path:
    return auth_setup(tmp_path)


@pytest.fixture
def make_auth_proxy(
    aiohttp_client: ClientFactory, store: Store, store_url: str, upstream: Upstream, identities_file: Path
) -> Callable[..., Awaitable[TestClient[Any, Any]]]:
    async def factory(**route: Any) -> TestClient[Any, Any]:
        config = auth_config(upstream.url, store_url, identities_file, **route)
        return await aiohttp_client(build_proxy_app(config, store))

    return factory


async def recorded(store: Store) -> list[OperationRecord]:
    return await store.query(OpsQuery())


# -- bearer tokens -------------------------------------------------------------------------


async def test_bearer_token_authenticates(make_auth_proxy: ClientFactory, upstream: Upstream) -> None:
    proxy = await make_auth_proxy()
    response = await proxy.post("/items", json={"n": 1}, headers={**bearer(EXECUTOR_TOKEN), "Idempotency-Key": "k1"})
    assert response.status == 201
    assert upstream.count() == 1


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param(bearer("not-a-token"), id="wrong"),
        pytest.param({"Authorization": "Basic ZXhlY3V0b3I6eA=="}, id="other-scheme"),
        pytest.param({"X-Idem-Caller": "executor"}, id="caller-header-alone"),
    ],
)
async def test_without_valid_credentials_nothing_is_forwarded_or_recorded(
    make_auth_proxy: ClientFactory, upstream: Upstream, store: Store, headers: dict[str, str]
) -> None:
    proxy = await make_auth_proxy()
    for method in ("POST", "GET"):
        response = await proxy.request(method, "/items", json={"n": 1}, headers={**headers, "Idempotency-Key": "k1"})
        await assert_problem(response, 401, "unauthenticated")
        assert response.headers["WWW-Authenticate"] == CHALLENGE
    assert upstream.count() == 0
    assert await recorded(store) == []


def test_tokens_are_only_accepted_as_hashes(tmp_path: Path) -> None:
    raw = {
        "routes": [{"prefix": "/", "name": "tools", "upstream": "http://127.0.0.1:1"}],
        "auth": {
            "identities": [
                {"name": "a", "tokens": ["plain-secret-token"]},
                {"name": "b", "hmac_keys": {"k": "plain-hmac-secret-0123456789"}},
                {"name": "c", "tokens": [token_hash("x")], "scopes": [{"routes": ["tols"]}]},
                {"name": "a", "tokens": [token_hash("x")], "ops": "root"},
            ]
        },
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    problems = "\n".join(caught.value.problems)
    assert "auth.identities[0].tokens[0]: expected 'sha256:<64 lower-case hex digits>'" in problems
    assert "auth.identities[1].hmac_keys.k: secrets must be referenced as 'env:NAME' or 'file:PATH'" in problems
    assert "auth.identities[2].scopes[0].routes: no route is named 'tols'" in problems
    assert "auth.identities[3].ops: expected one of none, read, admin" in problems
    assert "plain-secret-token" not in problems
    assert "plain-hmac-secret" not in problems


def test_duplicate_identities_and_missing_secrets_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IDEM_TEST_UNSET_KEY", raising=False)
    raw = {
        "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:1"}],
        "auth": {
            "identities": [
                {"name": "a", "tokens": [token_hash("x")]},
                {"name": "b", "tokens": [token_hash("x")]},
                {"name": "c", "hmac_keys": {"k": "env:IDEM_TEST_UNSET_KEY"}},
            ],
            "max_skew": "soon",
        },
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    problems = "\n".join(caught.value.problems)
    assert "auth.identities[2].hmac_keys.k: environment variable IDEM_TEST_UNSET_KEY is not set" in problems
    assert "auth.max_skew:" in problems
    with pytest.raises(ConfigError, match=r"auth\.identities: token hash 'sha256:.*' is used more than once"):
        parse_config({**raw, "auth": {"identities": raw["auth"]["identities"][:2]}})
    with pytest.raises(ConfigError, match=r"auth\.identities_file: .*cannot read the file"):
        parse_config({**raw, "auth": {"identities_file": str(tmp_path / "absent.yaml")}})


# -- HMAC signatures ------------------------------------------------------------------------


async def test_hmac_signed_request_authenticates(make_auth_proxy: ClientFactory, upstream: Upstream) -> None:
    proxy = await make_auth_proxy()
    body = orjson.dumps({"n": 1})
    response = await proxy.post("/items?x=1", data=body, headers=signed("POST", "/items?x=1", body, "k1"))
    assert response.status == 201, await response.text()
    assert upstream.effects[0].body == body
    get = await proxy.get("/items", headers=signed("GET", "/items"))  # no body: signs SHA256(b"")
    assert get.status == 201


@pytest.mark.parametrize(
    "case",
    [
        "bad-signature",
        "wrong-secret",
        "stale",
        "future",
        "tampered-body",
        "other-path",
        "other-key",
        "unknown-key-id",
        "timestamp-not-ascii-digits",  # "²".isdigit() is True, int("²") raises: once a 500
        "timestamp-of-5000-digits",  # beyond int()'s digit limit: once a 500
    ],
)
async def test_invalid_hmac_is_refused_before_anything_happens(
    make_auth_proxy: ClientFactory, upstream: Upstream, store: Store, case: str
) -> None:
    proxy = await make_auth_proxy()
    body = orjson.dumps({"n": 1})
    now = int(time.time())
    headers = {
        "bad-signature": {**signed("POST", "/items", body, "k1"), "X-Idem-Signature": "00" * 32},
        "wrong-secret": signed("POST", "/items", body, "k1", secret=b"another-secret-0123456789"),
        # Past max_skew (300 s) by more than the second `now` was truncated to and the request
        # takes: 301 was refused or not depending on where in its second the request landed.
        "stale": signed("POST", "/items", body, "k1", timestamp=now - 305),
        "future": signed("POST", "/items", body, "k1", timestamp=now + 305),
        "tampered-body": signed("POST", "/items", orjson.dumps({"n": 2}), "k1"),
        "other-path": signed("POST", "/other", body, "k1"),
        "other-key": {**signed("POST", "/items", body, "k1"), "Idempotency-Key": "k2"},
        "unknown-key-id": signed("POST", "/items", body, "k1", key_id="nobody"),
        "timestamp-not-ascii-digits": {**signed("POST", "/items", body, "k1"), "X-Idem-Timestamp": "\u00b2"},
        "timestamp-of-5000-digits": {**signed("POST", "/items", body, "k1"), "X-Idem-Timestamp": "9" * 5000},
    }[case]
    response = await proxy.post("/items", data=body, headers=headers)
    await assert_problem(response, 401, "unauthenticated")
    assert upstream.count() == 0
    assert await recorded(store) == []


async def test_a_signature_is_accepted_once(make_auth_proxy: ClientFactory, upstream: Upstream) -> None:
    proxy = await make_auth_proxy()
    headers = signed("GET", "/items")
    assert (await proxy.get("/items", headers=headers)).status == 201
    body = await assert_problem(await proxy.get("/items", headers=headers), 401, "unauthenticated")
    assert "already used" in body["detail"]
    assert upstream.count() == 1


async def test_a_replayed_signature_is_refused_by_another_instance(
    aiohttp_client: ClientFactory, redis_url: str, upstream: Upstream, identities_file: Path
) -> None:
    config = auth_config(upstream.url, redis_url, identities_file)
    stores = [open_store(StoreConfig(url=redis_url)) for _ in range(2)]
    for opened in stores:
        await opened.start()
    try:
        first, second = [await aiohttp_client(build_proxy_app(config, opened)) for opened in stores]
        body = orjson.dumps({"n": 1})
        headers = signed("POST", "/items", body, "k1")
        assert (await first.post("/items", data=body, headers=headers)).status == 201
        await assert_problem(await second.post("/items", data=body, headers=headers), 401, "unauthenticated")
        assert upstream.count() == 1
    finally:
        for opened in stores:
            await opened.close()


async def test_remember_once(store: Store) -> None:
    assert await store.remember_once("sig-a", 60) is True
    assert await store.remember_once("sig-a", 60) is False
    assert await store.remember_once("sig-b", 60) is True
    assert await store.remember_once("short", 0.01) is True
    await asyncio.sleep(0.05)  # a TTL of 10ms: the only way to see it run out is to let it
    assert await store.remember_once("short", 60) is True


# -- scopes and identity-scoped operations ----------------------------------------------------


async def test_scopes_limit_routes_and_methods(
    make_auth_proxy: ClientFactory, upstream: Upstream, store: Store
) -> None:
    proxy = await make_auth_proxy()
    assert (await proxy.get("/items", headers=bearer(PLANNER_TOKEN))).status == 201
    refused = await proxy.post("/items", json={}, headers={**bearer(PLANNER_TOKEN), "Idempotency-Key": "k1"})
    body = await assert_problem(refused, 403, "forbidden")
    assert "planner" in body["detail"]
    assert "POST" in body["detail"]
    assert upstream.count() == 1
    assert await recorded(store) == []
    allowed = await proxy.post("/items", json={}, headers={**bearer(EXECUTOR_TOKEN), "Idempotency-Key": "k1"})
    assert allowed.status == 201
    assert upstream.count() == 2


async def test_scopes_name_routes(
    aiohttp_client: ClientFactory, store: Store, store_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    items = [{"name": "ro", "tokens": [token_hash("ro-token")], "scopes": [{"routes": ["a"], "methods": "*"}]}]
    path = write_identities(tmp_path / "ids.yaml", items)
    config = parse_config(
        {
            "store": store_url,
            "auth": {"identities_file": str(path)},
            "routes": [
                {"prefix": "/a", "name": "a", "upstream": upstream.url, "strip_prefix": True},
                {"prefix": "/b", "name": "b", "upstream": upstream.url, "strip_prefix": True},
            ],
        }
    )
    proxy = await aiohttp_client(build_proxy_app(config, store))
    headers = {**bearer("ro-token"), "Idempotency-Key": "k1"}
    assert (await proxy.post("/a/items", json={}, headers=headers)).status == 201
    await assert_problem(await proxy.post("/b/items", json={}, headers=headers), 403, "forbidden")


async def test_an_identity_cannot_replay_another_identitys_operation(
    make_auth_proxy: ClientFactory, upstream: Upstream, store: Store
) -> None:
    proxy = await make_auth_proxy()

    async def send(token: str) -> tuple[int, Any, str | None]:
        headers = {**bearer(token), "Idempotency-Key": "shared-key", "X-Idem-Caller": "executor"}
        response = await proxy.post("/items", json={"n": 1}, headers=headers)
        return response.status, (await response.json())["effect"], response.headers.get("Idempotent-Replayed")

    first_a = await send(EXECUTOR_TOKEN)
    first_b = await send(EXECUTOR2_TOKEN)  # the caller header is ignored: it does not make b into a
    assert first_a[:2] == (201, 1)
    assert first_b[:2] == (201, 2)
    assert upstream.count() == 2
    assert (await send(EXECUTOR_TOKEN))[1:] == (1, "true")
    assert (await send(EXECUTOR2_TOKEN))[1:] == (2, "true")
    assert upstream.count() == 2
    assert sorted(record.scope.caller for record in await recorded(store)) == ["executor", "executor2"]


# -- credentials hygiene ---------------------------------------------------------------------


async def test_the_upstream_never_sees_idemproxys_credentials(
    make_auth_proxy: ClientFactory, upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tool.token").write_text("tool-secret\n")
    monkeypatch.setenv("IDEM_TEST_TOOL_KEY", "from-env")
    proxy = await make_auth_proxy(
        upstream_headers={
            "Authorization": f"file:{tmp_path / 'tool.token'}",
            "X-Api-Key": "env:IDEM_TEST_TOOL_KEY",
            "X-Literal": "literal",
        }
    )
    body = orjson.dumps({"n": 1})
    sent = [
        await proxy.post("/echo", data=body, headers=signed("POST", "/echo", body, "k1")),
        await proxy.post("/echo", json={}, headers={**bearer(EXECUTOR_TOKEN), "Idempotency-Key": "k2"}),
        await proxy.get("/echo", headers=signed("GET", "/echo")),
        await proxy.get("/echo", headers=bearer(EXECUTOR_TOKEN)),
    ]
    assert [response.status for response in sent] == [200, 200, 200, 200]
    for effect in upstream.effects:
        seen = {name.lower(): value for name, value in effect.headers.items()}
        assert seen["authorization"] == "tool-secret"
        assert seen["x-api-key"] == "from-env"
        assert seen["x-literal"] == "literal"
        assert not {"x-idem-key-id", "x-idem-timestamp", "x-idem-signature"} & set(seen)
        assert EXECUTOR_TOKEN not in str(seen)


async def test_injected_headers_are_not_stored_and_reach_probes(
    aiohttp_server: Callable[..., Awaitable[TestServer]], store: Store, tmp_path: Path
) -> None:
    seen: list[dict[str, str]] = []

    async def lookup(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"items": []})

    app = web.Application()
    app.router.add_get("/lookup", lookup)
    server = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")
    (tmp_path / "tool.token").write_text("tool-secret")
    config = parse_config(
        {
            "routes": [
                {
                    "prefix": "/",
                    "upstream": url,
                    "upstream_headers": {"Authorization": f"file:{tmp_path / 'tool.token'}"},
                    "reconcile": {
                        "probe": {"url": "{upstream}/lookup?key={key}", "match": "items", "headers": {"X-P": "1"}}
                    },
                }
            ]
        }
    )
    route = config.routes[0]
    assert "tool-secret" not in repr(route)
    record = OperationRecord(
        op_id="0" * 32,
        scope=Scope(caller="executor", route=route.name, key="k1"),
        state=State.UNKNOWN,
        fence=1,
        fingerprint="f",
        attempt=1,
        owner="o",
        lease_until_ms=0,
        method="POST",
        target="/items",
        created_ms=0,
        updated_ms=0,
    )
    forwarder = Forwarder()
    await forwarder.start()
    try:
        result = await run_probe(route, record, forwarder)
    finally:
        await forwarder.close()
    assert result.outcome is ProbeOutcome.ABSENT, result
    assert seen[0]["Authorization"] == "tool-secret"
    assert seen[0]["X-P"] == "1"


# -- rotation without a restart --------------------------------------------------------------


async def _rotate(identities_file: Path, old: str, new: str) -> None:
    items = identities(identities_file.parent / "signer.key")
    for item in items:
        if item.get("tokens") == [token_hash(old)]:
            item["tokens"] = [token_hash(new)]
    write_identities(identities_file, items)


async def test_rotating_a_token_by_reloading(make_auth_proxy: ClientFactory, identities_file: Path) -> None:
    proxy = await make_auth_proxy()
    store = proxy_app(proxy).authenticator.identities
    await _rotate(identities_file, PLANNER_TOKEN, "planner-rotated")
    assert (await proxy.get("/items", headers=bearer(PLANNER_TOKEN))).status == 201  # not reloaded yet
    assert store.reload() is True
    await assert_problem(await proxy.get("/items", headers=bearer(PLANNER_TOKEN)), 401, "unauthenticated")
    assert (await proxy.get("/items", headers=bearer("planner-rotated"))).status == 201


async def test_a_changed_file_is_noticed(make_auth_proxy: ClientFactory, identities_file: Path) -> None:
    proxy = await make_auth_proxy()
    store = proxy_app(proxy).authenticator.identities
    assert store.check_file() is False  # unchanged
    await _rotate(identities_file, PLANNER_TOKEN, "planner-rotated")
    os.utime(identities_file, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert store.check_file() is True
    assert store.check_file() is False
    assert (await proxy.get("/items", headers=bearer("planner-rotated"))).status == 201


async def test_sighup_reloads(make_auth_proxy: ClientFactory, identities_file: Path) -> None:
    proxy = await make_auth_proxy()
    store = proxy_app(proxy).authenticator.identities
    await _rotate(identities_file, PLANNER_TOKEN, "planner-rotated")
    store.reloaded.clear()
    os.kill(os.getpid(), signal.SIGHUP)
    await asyncio.wait_for(store.reloaded.wait(), 5)
    assert store.reloads == 1
    assert (await proxy.get("/items", headers=bearer("planner-rotated"))).status == 201


@pytest.mark.parametrize(
    "broken",
    [
        "identities: [{name: planner, tokens: [not-a-hash]}]\n",
        "identities: [\n",
        "identities: [{name: x, tokens: ['sha256:" + "a" * 64 + "'], scopes: [{routes: [nowhere]}]}]\n",
    ],
)
async def test_an_invalid_file_keeps_the_identities_in_force(
    make_auth_proxy: ClientFactory, identities_file: Path, broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await make_auth_proxy()
    store: IdentityStore = proxy_app(proxy).authenticator.identities
    await asyncio.to_thread(identities_file.write_text, broken)
    assert store.reload() is False
    assert "identities file rejected" in caplog.text
    assert (await proxy.get("/items", headers=bearer(PLANNER_TOKEN))).status == 201


# -- without auth, today's behaviour ---------------------------------------------------------


async def test_without_auth_the_caller_header_still_names_the_caller(
    aiohttp_client: ClientFactory, store: Store, upstream: Upstream
) -> None:
    config: ProxyConfig = parse_config({"routes": [{"prefix": "/", "upstream": upstream.url}]})
    proxy = await aiohttp_client(build_proxy_app(config, store))
    response = await proxy.post("/echo", json={}, headers={"Idempotency-Key": "k", "X-Idem-Caller": "bob"})
    assert response.status == 200
    assert [record.scope.caller for record in await recorded(store)] == ["bob"]
    assert upstream.effects[0].headers.get("X-Idem-Caller") == "bob"
