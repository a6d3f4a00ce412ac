"""The chaos suite's tool: performs side effects, logs each durably, and misbehaves on request.

Run as its own process (``python -m tests.chaos.tool --port P --log FILE``) so
proxy crashes never touch it. Every effect is appended to the log (fsynced)
before the tool answers; ``GET /effects?key=K`` shows the effects a key caused,
which is what the proxies' reconcile probe reads.

Faults, chosen per request with the probabilities set through
``POST /_chaos/faults`` (JSON: ``timeout``, ``reset``, ``bad_gateway``,
``unavailable``):

- ``timeout``: commits, then answers only after the proxy stopped waiting;
- ``reset``: commits, then drops the connection (a lost acknowledgment);
- ``bad_gateway``: answers 502, having committed or not (a coin flip);
- ``unavailable``: answers 503 without committing (the proxy may retry).

``--commit-after S`` makes every effect land S seconds after its request arrives
(a slow tool, for faults that need an attempt in flight).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

FAULTS = web.AppKey("faults", dict)
STATE = web.AppKey("state", dict)


def reconcile_config(**overrides: Any) -> dict[str, Any]:
    """A route's ``reconcile`` section that probes this tool's ``/effects`` (``overrides``
    replace its timings)."""
    return {
        "probe": {"url": "{upstream}/effects?key={key}", "match": "matches[0]", "timeout": "1s"},
        "found": {"status": 201, "body": "resource"},
        "settle": "1s",
        "backoff": "200ms",
        **overrides,
    }


def effect_body(effect_id: int, key: str) -> bytes:
    """The tool's answer for an effect, byte for byte what a probe's resource re-encodes to."""
    return orjson.dumps({"effect_id": effect_id, "key": key})


class EffectLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.by_key: dict[str, list[int]] = {}
        self.count = 0
        if path.exists():
            for line in path.read_bytes().splitlines():
                entry = orjson.loads(line)
                self.by_key.setdefault(entry["key"], []).append(entry["effect_id"])
                self.count = max(self.count, entry["effect_id"])
        self._file = open(path, "ab")  # noqa: SIM115 - kept open for the process's life

    def commit(self, key: str) -> int:
        self.count += 1
        self._file.write(orjson.dumps({"effect_id": self.count, "key": key}) + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.by_key.setdefault(key, []).append(self.count)
        return self.count


LOG = web.AppKey("log", EffectLog)


async def act(request: web.Request) -> web.StreamResponse:
    await request.read()
    key = request.headers.get("Idempotency-Key", "")
    faults: dict[str, float] = request.app[FAULTS]
    log = request.app[LOG]
    roll = random.random()
    for fault in ("timeout", "reset", "bad_gateway", "unavailable"):
        chance = faults.get(fault, 0.0)
        if roll < chance:
            break
        roll -= chance
    else:
        fault = "none"
    if fault == "unavailable":
        return web.json_response({"error": "try later"}, status=503)
    if fault == "bad_gateway":
        if random.random() < 0.5:
            log.commit(key)
        return web.json_response({"error": "bad gateway"}, status=502)
    if commit_after_s := request.app[STATE]["commit_after_s"]:
        await asyncio.sleep(commit_after_s)  # a slow tool: the effect lands this long after the request
    effect_id = log.commit(key)
    if fault == "reset":
        assert request.transport is not None
        request.transport.abort()
        return web.Response()
    if fault == "timeout":
        await asyncio.sleep(request.app[STATE]["late_s"])
    return web.Response(body=effect_body(effect_id, key), status=201, content_type="application/json")


async def effects(request: web.Request) -> web.Response:
    key = request.query.get("key", "")
    ids = request.app[LOG].by_key.get(key, [])
    return web.json_response({"matches": [{"effect_id": effect_id, "key": key} for effect_id in ids]})


async def set_faults(request: web.Request) -> web.Response:
    payload: dict[str, Any] = await request.json()
    request.app[FAULTS].clear()
    request.app[FAULTS].update({name: float(value) for name, value in payload.items()})
    return web.json_response(request.app[FAULTS])


def build_app(log_path: Path, late_s: float, commit_after_s: float = 0.0) -> web.Application:
    app = web.Application()
    app[LOG] = EffectLog(log_path)
    app[FAULTS] = {}
    app[STATE] = {"late_s": late_s, "commit_after_s": commit_after_s}
    app.router.add_post("/act", act)
    app.router.add_get("/effects", effects)
    app.router.add_post("/_chaos/faults", set_faults)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--late", type=float, default=1.5, help="seconds a 'timeout' answer is late")
    parser.add_argument("--commit-after", type=float, default=0.0, help="seconds each effect takes to land")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    random.seed(args.seed)
    app = build_app(args.log, args.late, args.commit_after)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
