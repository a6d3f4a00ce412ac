"""The admin listener: liveness and readiness for orchestrators."""

from __future__ import annotations

from aiohttp import web

from idemproxy.errors import LedgerUnavailable, ProblemError
from idemproxy.store import Store, StoreUnavailable

STORE_KEY = web.AppKey("store", Store)


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and serving."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """The ledger answers: side-effecting calls can be recorded."""
    try:
        await request.app[STORE_KEY].ping()
    except StoreUnavailable as exc:
        raise LedgerUnavailable(f"The ledger is unreachable: {exc}") from exc
    return web.json_response({"status": "ready"})


def admin_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


__all__ = ["STORE_KEY", "ProblemError", "admin_routes"]
