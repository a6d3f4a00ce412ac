"""The operator's API as the admin tests drive it (``tests/ops/test_admin.py``): two routes in
front of one counting tool, ``a`` with no reconcile method and ``b`` probing a lookup that
always fails, and ``Ops``, which drives records into each state through the real proxy
and reads them back through ``/_idem/ops``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from idemproxy.config.settings import ProxyConfig, parse_config
from idemproxy.lifecycle.records import OperationRecord
from idemproxy.protocol import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_PREFIX
from idemproxy.store import Store
from tests.support.records import op_id_for
from tests.support.upstream import Upstream

#: The next probe is beyond a request's on-demand bound, so a duplicate leaves it UNKNOWN.
FAILING_PROBE = {
    "probe": {"url": "{upstream}/probe-status/500", "match": "x"},
    "max_probes": 5,
    "backoff": "1h",
    "max_backoff": "1h",
}
ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


def two_routes(upstream_url: str) -> ProxyConfig:
    return parse_config(
        {
            "routes": [
                {"prefix": "/a", "name": "a", "upstream": upstream_url, "strip_prefix": True},
                {
                    "prefix": "/b",
                    "name": "b",
                    "upstream": upstream_url,
                    "strip_prefix": True,
                    "reconcile": FAILING_PROBE,
                },
            ]
        }
    )


async def problem(response: ClientResponse, status: int, slug: str | None = None) -> dict[str, Any]:
    assert response.status == status
    assert response.content_type == PROBLEM_CONTENT_TYPE
    body: dict[str, Any] = await response.json(content_type=PROBLEM_CONTENT_TYPE)
    assert body["status"] == status
    if slug is not None:
        assert body["type"] == PROBLEM_TYPE_PREFIX + slug
    return body


def kinds(view: dict[str, Any]) -> list[str]:
    return [entry["kind"] for entry in view["evidence"]]


@dataclass
class Ops:
    proxy: TestClient[Any, Any]
    admin: TestClient[Any, Any]
    store: Store
    upstream: Upstream

    async def send(self, path: str, key: str, task: str | None = None, body: Any = None) -> ClientResponse:
        headers = {"Idempotency-Key": key}
        if task is not None:
            headers["X-Agent-Task"] = task
        return await self.proxy.post(path, json=body if body is not None else {"n": 1}, headers=headers)

    async def needs_attention(self, key: str, task: str | None = None) -> str:
        """Effect made, answer lost, no reconcile method: the duplicate escalates it."""
        first = await self.send("/a/reset", key, task)
        assert first.status == 502
        duplicate = await self.send("/a/reset", key, task)
        body = await problem(duplicate, 409, "needs-attention")
        assert body["operation"] == op_id_for(key, route="a")
        return op_id_for(key, route="a")

    async def unknown(self, key: str, task: str | None = None) -> str:
        """Effect made, answer lost, the probe cannot tell: it stays UNKNOWN."""
        first = await self.send("/b/reset", key, task)
        assert first.status == 502
        duplicate = await self.send("/b/reset", key, task)
        await problem(duplicate, 409, "outcome-unknown")
        return op_id_for(key, route="b")

    async def completed(self, key: str, task: str | None = None, path: str = "/a/items") -> str:
        response = await self.send(path, key, task)
        assert response.status in (200, 201)
        op_id = response.headers["Idempotency-Operation"]
        assert op_id == op_id_for(key, route=path.split("/")[1])
        return op_id

    async def show(self, op_id: str) -> dict[str, Any]:
        response = await self.admin.get(f"/_idem/ops/{op_id}")
        assert response.status == 200, await response.text()
        view: dict[str, Any] = await response.json()
        return view

    async def listing(self, **params: str) -> list[dict[str, Any]]:
        response = await self.admin.get("/_idem/ops", params=params)
        assert response.status == 200, await response.text()
        operations: list[dict[str, Any]] = (await response.json())["operations"]
        return operations

    async def listed(self, **params: str) -> list[str]:
        return [op["operation"] for op in await self.listing(**params)]

    async def resolve(self, op_id: str, payload: Any) -> ClientResponse:
        data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        return await self.admin.post(
            f"/_idem/ops/{op_id}/resolve", data=data, headers={"Content-Type": "application/json"}
        )

    async def record(self, op_id: str) -> OperationRecord:
        record = await self.store.get(op_id)
        assert record is not None
        return record
