"""The proxy listener under aiohttp's test client: ``aiohttp_client(build_proxy_app(...))``
works as it does for an aiohttp application (see the ``aiohttp_client`` fixture)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

from aiohttp.test_utils import BaseTestServer, TestClient
from aiohttp.web_runner import BaseRunner
from yarl import URL

from idemproxy.app import ProxyApp, serving_proxy

#: How long closing a test proxy lets requests still in progress run.
GRACE_S = 5.0


class ProxyTestServer(BaseTestServer):
    def __init__(self, app: ProxyApp, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app = app
        self._serving: AsyncExitStack | None = None

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        raise NotImplementedError("the proxy listener is not an aiohttp application")

    async def start_server(self, loop: Any = None, **kwargs: Any) -> None:
        if self._serving is not None:
            return
        self._serving = AsyncExitStack()
        listening = await self._serving.enter_async_context(serving_proxy(self.app, self.host, 0, grace_s=GRACE_S))
        self.port = listening.sockets[0].getsockname()[1]
        self.scheme = "http"
        self._root = URL(f"http://{self.host}:{self.port}")

    @property
    def started(self) -> bool:
        return self._serving is not None

    async def close(self) -> None:
        if self._serving is not None and not self._closed:
            await self._serving.aclose()
            self._root = None
            self._closed = True


def proxy_app(client: TestClient[Any, Any]) -> ProxyApp:
    """The proxy application behind a test client of the proxy listener."""
    server = client.server
    assert isinstance(server, ProxyTestServer)
    return server.app
