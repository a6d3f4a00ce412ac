"""problem+json answers as the tests check them."""

from __future__ import annotations

from typing import Any

PROBLEM = "application/problem+json"


async def assert_problem(response: Any, status: int, slug: str) -> dict[str, Any]:
    """``response`` is problem+json of type ``slug`` with ``status``; its members."""
    assert response.status == status, await response.text()
    assert response.content_type == PROBLEM
    body: dict[str, Any] = await response.json(content_type=PROBLEM)
    assert body["type"] == f"urn:idemproxy:problem:{slug}"
    return body
