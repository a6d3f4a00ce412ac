"""The clients that talk to upstream tools.

Forwarded requests go through the lean keep-alive client
(``idemproxy.wire.upstream_client``), which classifies its own failures. Probes,
resends and hooks use an aiohttp ``ClientSession`` (hooks are handed it); this
is where its errors are translated into what they prove about the attempt
(``FailureKind``): nothing sent, or sent with an unknown outcome.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from idemproxy.config.settings import RouteConfig
from idemproxy.wire.upstream_client import (
    Destination,
    FailureKind,
    NotSent,
    SendGuard,
    UpstreamClient,
    UpstreamFailed,
    UpstreamRequest,
    UpstreamResponse,
)

__all__ = [
    "Fetched",
    "Forwarder",
    "NotSent",
    "SendGuard",
    "UpstreamFailed",
    "UpstreamRequest",
    "UpstreamResponse",
    "failure_kind",
]


@dataclass(frozen=True, slots=True)
class Fetched:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


def failure_kind(exc: BaseException) -> FailureKind:
    """What an aiohttp client error proves about whether the request reached the tool."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError | aiohttp.ClientConnectorError):
        return FailureKind.CONNECT
    if isinstance(exc, TimeoutError):  # also aiohttp.SocketTimeoutError / ServerTimeoutError
        return FailureKind.TIMEOUT
    return FailureKind.CONNECTION_LOST


class Forwarder:
    """Owns the upstream clients: open in ``start``, closed in ``close``."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._client: UpstreamClient | None = None

    async def start(self) -> None:
        if self._session is not None:
            raise RuntimeError("the forwarder is already started")
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, enable_cleanup_closed=True),
            auto_decompress=False,  # bytes pass through as the tool sent them
            cookie_jar=aiohttp.DummyCookieJar(),  # never carry one caller's cookies to another
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None),
        )
        # aiohttp silently resends PUT and DELETE once when a pooled connection
        # drops; for a side-effecting call (a reconcile resend goes through this
        # session) that is exactly the duplicate this proxy exists to prevent.
        # There is no public switch (aiohttp 3.10-3.14).
        session._retry_connection = False
        self._session = session
        self._client = UpstreamClient(keepalive_s=30.0)

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
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def request(self, route: RouteConfig, request: UpstreamRequest, guard: SendGuard | None = None) -> Sending:
        """Send ``request`` to ``route``'s upstream, within its timeouts: ``async with`` gives
        the response once its head is in, and releases it at the end. Failures raise
        ``UpstreamFailed``.

        ``request.target`` is the upstream request target (``routes.upstream_target``).
        ``guard`` is asked once a connection (pooled or new) is in hand, right before the
        request is written; ``False`` raises ``NotSent``."""
        if self._client is None:
            raise RuntimeError("the forwarder is not started")
        destination = Destination(route.upstream, route.connect_timeout_s, route.read_timeout_s)
        return Sending(self._client, destination, request, guard)


class Sending:
    """``Forwarder.request``'s context manager (a class: an ``asynccontextmanager``
    generator costs several times as much, on every forwarded request)."""

    __slots__ = ("_client", "_destination", "_guard", "_request", "_response")

    def __init__(
        self, client: UpstreamClient, destination: Destination, request: UpstreamRequest, guard: SendGuard | None
    ) -> None:
        self._client = client
        self._destination = destination
        self._request = request
        self._guard = guard
        self._response: UpstreamResponse | None = None

    async def __aenter__(self) -> UpstreamResponse:
        self._response = await self._client.send(self._destination, self._request, self._guard)
        return self._response

    async def __aexit__(self, *exc_info: object) -> None:
        if self._response is not None:
            self._response.release()
