"""httpx support: an ``httpx.Auth`` that stamps each request with the current operation.

Works with ``httpx.Client`` in synchronous tools and ``httpx.AsyncClient`` in
asynchronous ones::

    client = httpx.Client(base_url="http://127.0.0.1:8080", auth=IdempotencyAuth())

httpx is not a dependency of idemproxy itself; both framework extras bring it.
"""

from __future__ import annotations

from collections.abc import Generator

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"idemproxy.adapters.httpx_auth needs httpx: pip install httpx ({exc})") from exc

from idemproxy.adapters.client import problem_of
from idemproxy.adapters.context import DEFAULT_HEADERS, current_operation, operation_headers
from idemproxy.protocol import OPERATION_HEADER, HeaderNames


class IdempotencyAuth(httpx.Auth):
    """Adds ``Idempotency-Key`` and ``X-Agent-Task`` from the operation open in this context."""

    requires_request_body = True  # the body decides which of the call's requests this is

    def __init__(self, *, caller: str | None = None, header_names: HeaderNames = DEFAULT_HEADERS) -> None:
        self.caller = caller
        self.names = header_names

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers.update(
            operation_headers(
                request.method,
                str(request.url),
                request.content,
                content_type=request.headers.get("Content-Type"),
                names=self.names,
            )
        )
        if self.caller is not None:
            request.headers[self.names.caller] = self.caller
        response = yield request
        opened = current_operation()
        reported = response.headers.get(OPERATION_HEADER)
        if opened is not None and reported:
            opened.observe(reported)


def raise_for_problem(response: httpx.Response) -> httpx.Response:
    """Raise ``ProxyProblem`` if ``response`` is one of idemproxy's own problems; else return it."""
    problem = problem_of(response.status_code, response.headers, response.read())
    if problem is not None:
        raise problem
    return response
