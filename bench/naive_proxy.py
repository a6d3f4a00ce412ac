"""The naive baseline: an aiohttp passthrough proxy with no ledger, one process.

It does what every proxy hop must do and nothing more: read the request,
forward it over a pooled keep-alive connection, read the answer, send it
back, on aiohttp (server and client) and uvloop when installed, with
Python's default garbage-collector settings. idemproxy shares its server
half; it forwards through its own llhttp client and settles the collector
at startup (README, Performance).

    python bench/naive_proxy.py --upstream http://127.0.0.1:9000 --listen 127.0.0.1:8090
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

#: RFC 9110 §7.6.1, plus the framing headers aiohttp recomputes.
_NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)


def build_app(upstream: str) -> web.Application:
    base = upstream.rstrip("/")
    app = web.Application()

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SESSION_KEY] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=30),
        )
        yield
        await app[SESSION_KEY].close()

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        headers = _end_to_end(request.headers, drop_host=True)
        async with request.app[SESSION_KEY].request(
            request.method, base + request.path_qs, headers=headers, data=body or None, allow_redirects=False
        ) as upstream_response:
            payload = await upstream_response.read()
            return web.Response(
                status=upstream_response.status,
                body=payload,
                headers=_end_to_end(upstream_response.headers, drop_host=False),
            )

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def _end_to_end(headers: CIMultiDictProxy[str], *, drop_host: bool) -> CIMultiDict[str]:
    return CIMultiDict(
        (name, value)
        for name, value in headers.items()
        if name.lower() not in _NOT_FORWARDED and not (drop_host and name.lower() == "host")
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, metavar="URL")
    parser.add_argument("--listen", default="127.0.0.1:8090", metavar="HOST:PORT")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    try:
        import uvloop
    except ImportError:  # the comparison stays fair: idemproxy falls back the same way
        pass
    else:
        uvloop.install()
    web.run_app(build_app(args.upstream), host=host, port=int(port), access_log=None, print=None)


if __name__ == "__main__":
    main()
