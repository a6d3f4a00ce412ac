"""An aiohttp client for tools that call their APIs through idemproxy.

Each request takes its ``Idempotency-Key`` and ``X-Agent-Task`` from the tool
call's operation (``idemproxy.adapters.context``), so tool code only names the
path and the payload. The client has an explicit lifecycle: it opens on
``open()``, ``async with`` or the first request, closes once (again is
harmless), and cannot be reopened.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from idemproxy.adapters._session import ManagedSession, SessionClient
from idemproxy.adapters.context import DEFAULT_HEADERS, current_operation, operation_headers
from idemproxy.adapters.errors import ProxyProblem, translate_client_errors
from idemproxy.protocol import OPERATION_HEADER, PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_PREFIX, REPLAYED_HEADER, HeaderNames

#: Response headers set by idemproxy (see the README's "What a duplicate gets").

_NO_JSON: Any = object()


@dataclass(frozen=True, slots=True)
class ProxyResponse:
    """A tool's answer as it came back through the proxy, body read in full."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    operation_id: str | None  # the proxy's id for the operation, when it recorded one
    replayed: bool  # answered from the ledger, not by the tool

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return orjson.loads(self.body)

    def text(self, encoding: str = "utf-8") -> str:
        return self.body.decode(encoding, errors="replace")


def problem_of(status: int, headers: Mapping[str, str], body: bytes) -> ProxyProblem | None:
    """idemproxy's own problem in a response, if that is what it is (not the tool's)."""
    content_type = headers.get("Content-Type", "")
    if not content_type.startswith(PROBLEM_CONTENT_TYPE):
        return None
    try:
        problem = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(problem, dict) or not str(problem.get("type", "")).startswith(PROBLEM_TYPE_PREFIX):
        return None
    return ProxyProblem(status, problem)


class ProxyClient(SessionClient):
    """Sends a tool's HTTP requests to idemproxy with the current operation's key.

    ``base_url`` is the proxy's listener (``http://127.0.0.1:8080``); ``caller``
    is sent as the caller header when given. With ``raise_for_problem`` (the
    default), an answer that is idemproxy's own problem (``outcome-unknown``,
    ``operation-in-flight``, ...) raises ``ProxyProblem``, which agent frameworks
    report to the model as a tool error; the tool's own statuses are returned.
    """

    def __init__(
        self,
        base_url: str,
        *,
        caller: str | None = None,
        headers: Mapping[str, str] | None = None,
        header_names: HeaderNames = DEFAULT_HEADERS,
        timeout: float = 60.0,
        raise_for_problem: bool = True,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        url = URL(base_url)
        if not url.is_absolute() or url.scheme not in ("http", "https"):
            raise ValueError(f"base_url {base_url!r} must be an absolute http(s) URL of the proxy.")
        self.base_url = str(url).rstrip("/")
        self.names = header_names
        self.raise_for_problem = raise_for_problem
        self._headers = CIMultiDict(headers or {})
        if caller is not None:
            self._headers[header_names.caller] = caller
        self._session = ManagedSession("ProxyClient", timeout, session)

    def url(self, path: str, params: Mapping[str, str] | None = None) -> str:
        if "://" in path:
            raise ValueError(f"path {path!r} must be a path on the proxy, not an absolute URL.")
        url = URL(f"{self.base_url}/{path.lstrip('/')}")
        return str(url.update_query(params) if params else url)

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = _NO_JSON,
        data: bytes | str | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        key: str | None = None,
    ) -> ProxyResponse:
        """Send one request; ``key`` overrides the operation's key for this request only."""
        session = await self._session.open()
        method = method.upper()
        url = self.url(path, params)
        sent = CIMultiDict(self._headers)
        sent.update(headers or {})
        body = self._body(json, data, sent)
        content_type = sent.get("Content-Type")
        if key is None:
            sent.update(operation_headers(method, url, body, content_type=content_type, names=self.names))
        else:
            opened = current_operation()
            if opened is not None:
                sent[self.names.task] = opened.run_id
            sent[self.names.key] = key
        with translate_client_errors(f"idemproxy at {self.base_url}"):
            async with session.request(method, url, data=body or None, headers=sent) as response:
                answer = ProxyResponse(
                    status=response.status,
                    headers=response.headers,
                    body=await response.read(),
                    operation_id=response.headers.get(OPERATION_HEADER),
                    replayed=response.headers.get(REPLAYED_HEADER) == "true",
                )
        problem = problem_of(answer.status, answer.headers, answer.body)
        opened = current_operation()
        if opened is not None:
            reported = answer.operation_id or (problem.operation if problem else None)
            if reported:
                opened.observe(reported)
        if problem is not None and self.raise_for_problem:
            raise problem
        return answer

    async def get(self, path: str, **kwargs: Any) -> ProxyResponse:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> ProxyResponse:
        return await self.request("POST", path, **kwargs)

    async def put(self, path: str, **kwargs: Any) -> ProxyResponse:
        return await self.request("PUT", path, **kwargs)

    async def patch(self, path: str, **kwargs: Any) -> ProxyResponse:
        return await self.request("PATCH", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> ProxyResponse:
        return await self.request("DELETE", path, **kwargs)

    @staticmethod
    def _body(json: Any, data: bytes | str | None, headers: CIMultiDict[str]) -> bytes:
        if json is not _NO_JSON:
            if data is not None:
                raise ValueError("Pass json or data, not both.")
            headers.setdefault("Content-Type", "application/json")
            return orjson.dumps(json)
        if isinstance(data, str):
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")
            return data.encode()
        return data or b""
