"""The pooled keep-alive client that talks to upstream tools.

This is the one place where aiohttp client errors are translated into what
they prove about the attempt (``FailureKind``): nothing sent, or sent with an
unknown outcome.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from idemproxy.config import RouteConfig
from idemproxy.decisions import FailureKind


class NotSent(Exception):
    """A send guard refused: the request was never written to the tool."""


SendGuard = Callable[[], bool]


class UpstreamFailed(Exception):
    """Forwarding did not produce a complete response."""

    def __init__(self, kind: FailureKind, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Fetched:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


#: The guard of the request being sent from the current task.
_SEND_GUARD: ContextVar[SendGuard | None] = ContextVar("idemproxy_send_guard", default=None)


class _GuardedConnector(aiohttp.TCPConnector):
    """Asks the current request's send guard once it has a connection: the
    last moment before the request is written (connecting may have taken long)."""

    async def connect(self, req: Any, traces: Any, timeout: aiohttp.ClientTimeout) -> Any:  # noqa: ASYNC109  (aiohttp's signature)
        connection = await super().connect(req, traces, timeout)
        guard = _SEND_GUARD.get()
        if guard is not None and not guard():
            connection.release()  # nothing was written on it: it goes back to the pool
            raise NotSent("the send guard refused")
        return connection


@cache
def _timeout(connect_s: float, read_s: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, connect=connect_s, sock_connect=connect_s, sock_read=read_s)


def failure_kind(exc: BaseException) -> FailureKind:
    """What an aiohttp client error proves about whether the request reached the tool."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError | aiohttp.ClientConnectorError):
        return FailureKind.CONNECT
    if isinstance(exc, TimeoutError):  # also aiohttp.SocketTimeoutError / ServerTimeoutError
        return FailureKind.TIMEOUT
    return FailureKind.CONNECTION_LOST


class Forwarder:
    """Owns the upstream ``ClientSession``: open in ``start``, closed in ``close``."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is not None:
            raise RuntimeError("the forwarder is already started")
        session = aiohttp.ClientSession(
            connector=_GuardedConnector(limit=0, keepalive_timeout=30, enable_cleanup_closed=True),
            auto_decompress=False,  # bytes pass through as the tool sent them
            cookie_jar=aiohttp.DummyCookieJar(),  # never carry one caller's cookies to another
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None),
        )
        # aiohttp silently resends PUT and DELETE once when a pooled connection
        # drops; for a side-effecting call that is exactly the duplicate this
        # proxy exists to prevent. There is no public switch (aiohttp 3.10-3.14);
        # tests/test_forwarding.py proves the resend stays off.
        session._retry_connection = False
        self._session = session

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the forwarder is not started")
        return self._session

    async def fetch(
        self,
        method: str,
        url: URL | str,
        headers: CIMultiDict[str] | dict[str, str],
        data: bytes | None,
        timeout_s: float,
        max_body: int = 8 * 1024 * 1024,
    ) -> Fetched:
        """One complete request and response (for probes), bounded in time and size."""
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self.session.request(
                method, url, headers=headers, data=data, allow_redirects=False, timeout=timeout
            ) as response:
                body = await response.content.read(max_body + 1)
                if len(body) > max_body:
                    raise UpstreamFailed(FailureKind.CONNECTION_LOST, f"response larger than {max_body} bytes")
                return Fetched(response.status, response.headers, body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamFailed(failure_kind(exc), f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @asynccontextmanager
    async def request(
        self,
        route: RouteConfig,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        data: Any,
        guard: SendGuard | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request; errors before the response starts raise ``UpstreamFailed``.

        ``guard`` is asked once a connection (pooled or new) is in hand, right
        before the request is written; ``False`` raises ``NotSent``."""
        if self._session is None:
            raise RuntimeError("the forwarder is not started")
        timeout = _timeout(route.connect_timeout_s, route.read_timeout_s)
        token = _SEND_GUARD.set(guard)
        try:
            response = await self._session.request(
                method, url, headers=headers, data=data, allow_redirects=False, timeout=timeout
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamFailed(failure_kind(exc), f"{type(exc).__name__}: {exc}") from exc
        finally:
            _SEND_GUARD.reset(token)
        try:
            yield response
        finally:
            response.release()
