"""problem+json answers as the tests check them."""

from __future__ import annotations

from typing import Any

from aiohttp import ClientResponse

from idemproxy.protocol import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_PREFIX


async def assert_problem(response: Any, status: int, slug: str) -> dict[str, Any]:
    """``response`` is problem+json of type ``slug`` with ``status``; its members."""
    assert response.status == status, await response.text()
    assert response.content_type == PROBLEM_CONTENT_TYPE
    body: dict[str, Any] = await response.json(content_type=PROBLEM_CONTENT_TYPE)
    assert body["type"] == f"{PROBLEM_TYPE_PREFIX}{slug}"
    return body


async def problem_type(response: ClientResponse) -> str:
    """``response`` is problem+json whose ``status`` member is its status; its type after the prefix."""
    assert response.content_type == PROBLEM_CONTENT_TYPE
    body: dict[str, Any] = await response.json(content_type=PROBLEM_CONTENT_TYPE)
    assert body["status"] == response.status
    return str(body["type"]).removeprefix(PROBLEM_TYPE_PREFIX)
