"""A real aiohttp tool server that counts the side effects it performs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Effect:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    """Behaviour by path:

    - ``/items`` (any method): performs an effect, answers 201 with a JSON body
      numbering the effect;
    - ``/status/{code}``: performs an effect, answers ``code``;
    - ``/gate``: performs an effect, then waits until ``release`` is set;
    - ``/slow``: performs an effect, then never answers in time (sleeps);
    - ``/reset``: performs an effect, then drops the connection without answering;
    - ``/big/{size}``: performs an effect, answers ``size`` bytes;
    - ``/cookie``: performs an effect, answers with a Set-Cookie header;
    - ``/echo``: performs an effect, answers with the headers it received.
    """

    url: str = ""
    effects: list[Effect] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def count(self, path: str | None = None) -> int:
        return sum(1 for effect in self.effects if path is None or effect.path == path)

    async def _record(self, request: web.Request) -> Effect:
        effect = Effect(request.method, request.path, dict(request.headers), await request.read())
        self.effects.append(effect)
        self.arrived.set()
        return effect

    async def items(self, request: web.Request) -> web.Response:
        effect = await self._record(request)
        return web.json_response(
            {
                "effect": len(self.effects),
                "method": effect.method,
                "body": effect.body.decode(errors="replace"),
            },
            status=201,
            headers={"X-Tool": "items", "ETag": f'"{len(self.effects)}"'},
        )

    async def status(self, request: web.Request) -> web.Response:
        await self._record(request)
        code = int(request.match_info["code"])
        return web.json_response({"status": code}, status=code)

    async def gate(self, request: web.Request) -> web.Response:
        await self._record(request)
        await self.release.wait()
        return web.json_response({"effect": len(self.effects)}, status=201)

    async def slow(self, request: web.Request) -> web.Response:
        await self._record(request)
        await asyncio.sleep(30)
        return web.json_response({"too": "late"})

    async def reset(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    async def big(self, request: web.Request) -> web.Response:
        await self._record(request)
        size = int(request.match_info["size"])
        return web.Response(body=b"x" * size, status=200, content_type="application/octet-stream")

    async def cookie(self, request: web.Request) -> web.Response:
        await self._record(request)
        response = web.json_response({"ok": True}, status=200)
        response.set_cookie("session", "secret-of-first-caller")
        return response

    async def echo(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"headers": dict(request.headers), "raw_path": request.raw_path}, status=200)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/items", self.items)
        app.router.add_route("*", "/items/{tail:.*}", self.items)
        app.router.add_route("*", r"/status/{code:\d+}", self.status)
        app.router.add_route("*", "/gate", self.gate)
        app.router.add_route("*", "/slow", self.slow)
        app.router.add_route("*", "/reset", self.reset)
        app.router.add_route("*", r"/big/{size:\d+}", self.big)
        app.router.add_route("*", "/cookie", self.cookie)
        app.router.add_route("*", "/echo", self.echo)
        app.router.add_route("*", "/echo/{tail:.*}", self.echo)
        return app
