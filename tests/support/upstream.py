"""A real aiohttp tool server that counts the side effects it performs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import orjson
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
    - ``/flaky``: hangs without an effect until ``flaky_ok`` is set, then performs one;
    - ``/late``: answers nothing in time, performs its effect ``late_s`` later (sets ``committed``);
    - ``/keyed``: honours ``Idempotency-Key``: a repeated key gets the first answer, no new
      effect; with ``drop_first`` the first answer is lost (connection dropped after the effect).

    Reads that perform no effect, for probes: ``/lookup?key=K`` lists the effects made with
    Idempotency-Key K; ``/probe-status/{code}`` answers ``code``.
    """

    url: str = ""
    effects: list[Effect] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    committed: asyncio.Event = field(default_factory=asyncio.Event)
    flaky_ok: bool = False
    late_s: float = 0.5
    drop_first: bool = False
    keyed_answers: dict[str, bytes] = field(default_factory=dict)
    lookups: int = 0
    _background: set[asyncio.Task[None]] = field(default_factory=set)
    trickle_chunks: int = 8
    trickle_every_s: float = 0.3
    _trickled: dict[int, asyncio.Event] = field(default_factory=dict)

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

    async def flaky(self, request: web.Request) -> web.Response:
        if not self.flaky_ok:
            self.arrived.set()
            await asyncio.sleep(30)
        effect = await self._record(request)
        return web.json_response({"effect": len(self.effects), "method": effect.method}, status=201)

    async def late(self, request: web.Request) -> web.Response:
        self.arrived.set()
        body = await request.read()
        effect = Effect(request.method, request.path, dict(request.headers), body)

        async def commit_later() -> None:
            await asyncio.sleep(self.late_s)
            self.effects.append(effect)
            self.committed.set()

        # The commit happens whether or not the caller is still waiting for it.
        self._background.add(task := asyncio.create_task(commit_later()))
        task.add_done_callback(self._background.discard)
        await asyncio.shield(task)
        return web.json_response({"effect": len(self.effects)}, status=201)

    async def keyed(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("Idempotency-Key", "")
        if key in self.keyed_answers:
            await request.read()
            return web.Response(body=self.keyed_answers[key], status=201, content_type="application/json")
        await self._record(request)
        body = orjson.dumps({"effect": len(self.effects), "key": key})
        self.keyed_answers[key] = body
        if self.drop_first:
            self.drop_first = False
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        return web.Response(body=body, status=201, content_type="application/json")

    async def trickle(self, request: web.Request) -> web.StreamResponse:
        """Performs an effect, then answers slowly: a chunk every ``trickle_every_s``."""
        await self._record(request)
        response = web.StreamResponse(status=201)
        response.content_type = "text/plain"
        await response.prepare(request)
        for chunk in range(self.trickle_chunks):
            await asyncio.sleep(self.trickle_every_s)
            await response.write(f"chunk {chunk}\n".encode())
            self.trickled(chunk).set()
        await response.write_eof()
        return response

    def trickled(self, chunk: int) -> asyncio.Event:
        """Set once ``/trickle`` has sent chunk number ``chunk``."""
        return self._trickled.setdefault(chunk, asyncio.Event())

    async def lookup(self, request: web.Request) -> web.Response:
        self.lookups += 1
        key = request.query.get("key")
        matches = [
            {"effect": number, "path": effect.path, "key": key}
            for number, effect in enumerate(self.effects, start=1)
            if effect.headers.get("Idempotency-Key") == key
        ]
        return web.json_response({"matches": matches})

    async def probe_status(self, request: web.Request) -> web.Response:
        return web.json_response({"probe": True}, status=int(request.match_info["code"]))

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
        app.router.add_route("*", "/flaky", self.flaky)
        app.router.add_route("*", "/late", self.late)
        app.router.add_route("*", "/keyed", self.keyed)
        app.router.add_route("*", "/trickle", self.trickle)
        app.router.add_get("/lookup", self.lookup)
        app.router.add_get(r"/probe-status/{code:\d+}", self.probe_status)
        return app
