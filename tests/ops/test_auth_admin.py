"""``/_idem/ops`` with authentication on: ``ops: read`` sees its own operations,
``ops: admin`` sees every caller's and resolves; health and metrics stay open."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from idemproxy.app import build_admin_app, build_proxy_app
from idemproxy.protocol import PROBLEM_CONTENT_TYPE
from idemproxy.store import Store
from tests.support.auth import (
    ADMIN_TOKEN,
    EXECUTOR_TOKEN,
    VERIFIER_TOKEN,
    auth_config,
    auth_setup,
    bearer,
    signed,
)
from tests.support.upstream import Upstream

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@dataclass
class Env:
    proxy: TestClient[Any, Any]
    admin: TestClient[Any, Any]

    async def operation(self, token: str, key: str, path: str = "/items") -> str:
        response = await self.proxy.post(path, json={"n": 1}, headers={**bearer(token), "Idempotency-Key": key})
        if "Idempotency-Operation" in response.headers:
            return response.headers["Idempotency-Operation"]
        operation: str = (await response.json(content_type=PROBLEM_CONTENT_TYPE))["operation"]  # e.g. 502, answer lost
        return operation

    async def status(self, method: str, path: str, token: str | None, **kwargs: Any) -> int:
        headers = bearer(token) if token is not None else {}
        response = await self.admin.request(method, path, headers=headers, **kwargs)
        if response.status >= 400:
            assert response.content_type == PROBLEM_CONTENT_TYPE
        return response.status

    async def listed(self, token: str, **params: str) -> list[str]:
        response = await self.admin.get("/_idem/ops", params=params, headers=bearer(token))
        assert response.status == 200, await response.text()
        return sorted(op["caller"] for op in (await response.json())["operations"])


@pytest.fixture
async def env(aiohttp_client: ClientFactory, store: Store, store_url: str, upstream: Upstream, tmp_path: Path) -> Env:
    config = auth_config(upstream.url, store_url, auth_setup(tmp_path))
    proxy = await aiohttp_client(build_proxy_app(config, store, run_reconciler=False))
    admin = await aiohttp_client(build_admin_app(store, config))
    return Env(proxy, admin)


async def test_health_and_metrics_need_no_credentials(env: Env) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert await env.status("GET", path, None) == 200


async def test_the_ops_api_needs_an_identity_with_ops_access(env: Env) -> None:
    mine = await env.operation(EXECUTOR_TOKEN, "k1")
    assert await env.status("GET", "/_idem/ops", None) == 401
    assert await env.status("GET", f"/_idem/ops/{mine}", "wrong-token") == 401
    assert await env.status("GET", "/_idem/ops", EXECUTOR_TOKEN) == 403  # ops: none
    assert await env.status("GET", f"/_idem/ops/{mine}", EXECUTOR_TOKEN) == 403


async def test_a_reader_sees_only_its_own_operations(env: Env) -> None:
    mine = await env.operation(VERIFIER_TOKEN, "k1")
    theirs = await env.operation(EXECUTOR_TOKEN, "k1")
    assert await env.status("GET", f"/_idem/ops/{mine}", VERIFIER_TOKEN) == 200
    assert await env.status("GET", f"/_idem/ops/{theirs}", VERIFIER_TOKEN) == 403
    assert await env.listed(VERIFIER_TOKEN) == ["verifier"]
    assert await env.status("GET", "/_idem/ops?caller=executor", VERIFIER_TOKEN) == 403
    assert await env.listed(VERIFIER_TOKEN, caller="verifier") == ["verifier"]


async def test_only_an_admin_resolves_and_sees_every_caller(env: Env, upstream: Upstream) -> None:
    lost = await env.operation(VERIFIER_TOKEN, "k1", "/reset")  # effect made, answer lost: UNKNOWN
    theirs = await env.operation(EXECUTOR_TOKEN, "k2")
    resolution = {"outcome": "not_done", "by": "someone-else", "reason": "checked the tool"}
    path = f"/_idem/ops/{lost}/resolve"
    assert await env.status("POST", path, VERIFIER_TOKEN, json=resolution) == 403
    assert await env.status("POST", path, EXECUTOR_TOKEN, json=resolution) == 403
    assert await env.listed(ADMIN_TOKEN) == ["executor", "verifier"]
    assert await env.listed(ADMIN_TOKEN, caller="executor") == ["executor"]
    assert await env.status("GET", f"/_idem/ops/{theirs}", ADMIN_TOKEN) == 200
    response = await env.admin.post(path, json=resolution, headers=bearer(ADMIN_TOKEN))
    assert response.status == 200, await response.text()
    view = await response.json()
    assert view["state"] == "RELEASED"
    assert view["evidence"][-1]["by"] == "admin"  # who proved it, not who they said they were


async def test_the_ops_api_accepts_hmac(env: Env) -> None:
    """HMAC on the admin API: the signed body is the resolution itself."""
    lost = await env.operation(EXECUTOR_TOKEN, "k1", "/reset")
    body = orjson.dumps({"outcome": "not_done"})
    path = f"/_idem/ops/{lost}/resolve"
    # A tampered body fails the signature; the intact one authenticates the signer, which has
    # no ops access, so it is refused after authentication.
    tampered = await env.admin.post(path, data=b'{"outcome": "done"}', headers=signed("POST", path, body))
    assert tampered.status == 401
    response = await env.admin.post(path, data=body, headers=signed("POST", path, body))
    assert response.status == 403
