"""A real proxy on a real socket, between a recording tool and a canary nobody may reach.

- ``recorder``: the only configured upstream; it records every request it
  receives (raw path, headers, body) and answers like a tool: ``201`` with a
  JSON body, or a JSON-RPC result to a ``tools/call``.
- ``canary``: a second server that no route names. It is the target of every
  absolute-form, ``CONNECT`` and ``Host`` trick; it must never see a request.
- the proxy runs on the listener ``idemproxy run`` uses
  (``idemproxy.app.serving_proxy``) with short client timeouts, on a real
  Redis ledger.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from idemproxy import metrics
from idemproxy.app import build_proxy_app, serving_proxy
from idemproxy.config.settings import ProxyConfig, parse_config
from idemproxy.store import Store, open_store
from idemproxy.store.base import OpsQuery
from tests.support.wire import Reply, exchange, request

HEALTH_PATH = "/items/__health"
#: Routes of the hostile stack: prefix -> what the recorder sees for it.
ITEMS_MAX_BODY = 1024


@dataclass(frozen=True, slots=True)
class Seen:
    method: str
    raw_path: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


@dataclass
class Recorder:
    """A tool that records what reaches it."""

    name: str
    requests: list[Seen] = field(default_factory=list)
    url: str = ""

    def seen(self) -> list[Seen]:
        """Everything but the health checks."""
        return [seen for seen in self.requests if seen.raw_path != HEALTH_PATH]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(Seen(request.method, request.raw_path, tuple(request.raw_headers), body))
        if request.method == "POST" and request.headers.get("Content-Type", "").startswith("application/json"):
            try:
                message = orjson.loads(body)
            except orjson.JSONDecodeError:
                message = None
            if isinstance(message, dict) and message.get("method") == "tools/call" and "id" in message:
                result = {"content": [{"type": "text", "text": f"{self.name} {len(self.requests)}"}], "isError": False}
                return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result})
        return web.json_response({"tool": self.name, "effect": len(self.requests)}, status=201)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


@dataclass(frozen=True, slots=True)
class Mark:
    """What the stack had seen at one moment."""

    recorded: int  # requests that reached the tool
    records: int  # operations in the ledger
    errors: float  # requests the proxy answered with its internal-error (a bug), process-wide


def internal_errors() -> float:
    """Requests counted with decision ``error`` so far: each one is a 500 from a bug."""
    return sum(
        sample.value
        for metric in metrics.REQUESTS.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels.get("decision") == "error"
    )


class AccessLog(logging.Handler):
    """The proxy's access log lines as they are written: one per request, when it is done."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.entries: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.entries.append(dict(record.__dict__))
        self._changed.set()

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], *, after: int = 0, bound_s: float = 15.0
    ) -> dict[str, Any]:
        """The first entry from index ``after`` on that ``predicate`` accepts, once it is written."""
        async with asyncio.timeout(bound_s):
            while True:
                for entry in self.entries[after:]:
                    if predicate(entry):
                        return entry
                self._changed.clear()
                await self._changed.wait()


@contextmanager
def access_log() -> Iterator[AccessLog]:
    logger = logging.getLogger("idemproxy.access")
    handler, level = AccessLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@dataclass
class Stack:
    port: int
    recorder: Recorder
    canary: Recorder
    store: Store
    config: ProxyConfig
    log: AccessLog

    @property
    def canary_authority(self) -> str:
        return self.canary.url.removeprefix("http://")

    async def records(self) -> int:
        return len(await self.store.query(OpsQuery(limit=1000)))

    async def mark(self) -> Mark:
        return Mark(len(self.recorder.seen()), await self.records(), internal_errors())

    def since(self, before: Mark) -> list[Seen]:
        """What reached the tool after ``before``."""
        return self.recorder.seen()[before.recorded :]

    def assert_sound_since(self, before: Mark) -> None:
        """No internal error after ``before``; the canary saw nothing, ever."""
        assert self.canary.requests == [], f"a request reached an unconfigured host: {self.canary.requests}"
        assert internal_errors() == before.errors, "the proxy answered with internal-error (a bug; see the log)"

    async def assert_untouched_since(self, before: Mark) -> None:
        """Nothing reached the tool and nothing was recorded after ``before``."""
        self.assert_sound_since(before)
        assert self.since(before) == [], f"a refused request reached the tool: {self.since(before)}"
        assert await self.records() == before.records, "a refused request was recorded in the ledger"

    async def assert_serving(self) -> None:
        """The proxy still answers a well-formed request, end to end."""
        reply = await exchange(self.port, request("GET", HEALTH_PATH))
        assert reply.status == 201, reply
        assert self.canary.requests == []

    async def send(self, data: bytes) -> Reply:
        return await exchange(self.port, data)


def hostile_config(recorder_url: str, store_url: str, **top: Any) -> ProxyConfig:
    return parse_config(hostile_document(recorder_url, store_url, **top))


def hostile_document(recorder_url: str, store: str | dict[str, Any], **top: Any) -> dict[str, Any]:
    """The stack's configuration file, as ``idemproxy run --config`` reads it."""
    return {
        "store": store,
        **top,
        "routes": [
            {"name": "items", "prefix": "/items", "upstream": recorder_url, "max_body": ITEMS_MAX_BODY},
            {
                "name": "tenant",
                "prefix": "/tenant/a",
                "upstream": f"{recorder_url}/base-a",
                "strip_prefix": True,
                "max_body": ITEMS_MAX_BODY,
            },
            {"name": "derive", "prefix": "/derive", "upstream": recorder_url, "key_mode": "derive"},
            {"name": "mcp", "prefix": "/mcp", "upstream": recorder_url, "mode": "mcp", "key_mode": "derive"},
        ],
    }


@asynccontextmanager
async def serving(app: web.Application, **options: Any) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None, **{"auto_decompress": False, **options})
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def hostile_stack(store_url: str, **top: Any) -> AsyncIterator[Stack]:
    """The stack, with top-level configuration ``top`` (the client timeouts)."""
    recorder, canary = Recorder("recorder"), Recorder("canary")
    async with serving(recorder.app()) as recorder.url, serving(canary.app()) as canary.url:
        config = hostile_config(recorder.url, store_url, **top)
        store = open_store(config.store)
        await store.start()
        try:
            app = build_proxy_app(config, store, run_reconciler=False)
            with access_log() as log:
                async with serving_proxy(app, "127.0.0.1", 0, grace_s=5.0) as listening:
                    yield Stack(listening.sockets[0].getsockname()[1], recorder, canary, store, config, log)
        finally:
            await store.close()
