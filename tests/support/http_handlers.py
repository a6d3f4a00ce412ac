"""Handlers for the proxy listener's own server (``idemproxy.wire.http_server``) under test:
one that records each request and answers with its body, one that holds its answer until
released, and the time bounds the server tests wait with (``tests/wire/test_http_*.py``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from multidict import CIMultiDict

from idemproxy.protocol.errors import ProblemError
from idemproxy.wire.http_messages import Request, Response, StreamResponse, problem_reply

#: How long the server tests let a shutdown, or something awaited, take before they fail.
UNTIL_S = 5.0
#: How long a loopback answer that should come at once may take before the server counts as stuck.
STUCK_S = 1.0


@dataclass
class Seen:
    """What a handler saw of one request."""

    method: str
    raw_path: str
    version: str
    headers: CIMultiDict[str]
    body: bytes | None = None
    error: BaseException | None = None


@dataclass
class Recorder:
    """A handler that records each request, reads its body and answers with it."""

    seen: list[Seen] = field(default_factory=list)
    read_body: bool = True

    async def __call__(self, request: Request) -> StreamResponse:
        seen = Seen(request.method, request.raw_path, request.version, CIMultiDict(request.headers))
        self.seen.append(seen)
        if self.read_body:
            try:
                seen.body = await request.read()
            except ProblemError as exc:
                seen.error = exc
                return problem_reply(exc)
        return Response(body=seen.body or b"", headers={"X-Path": request.raw_path})

    @property
    def paths(self) -> list[str]:
        return [seen.raw_path for seen in self.seen]


@dataclass
class Held(Recorder):
    """A ``Recorder`` that signals when a request reaches it and answers only once released."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, request: Request) -> StreamResponse:
        self.started.set()
        await self.release.wait()
        return await super().__call__(request)


async def answer_ok(request: Request) -> StreamResponse:
    return Response(body=b"ok", content_type="text/plain")
