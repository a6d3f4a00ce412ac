"""``idemproxy run`` as a child process on any store, for the tests that inject a fault through
the real process: its log in a file (read back as JSON entries, so a long-running child never
blocks on a full pipe), any extra environment (libfaketime), and the tools it fronts served in
the test's own event loop."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import orjson
import yaml
from aiohttp import web

from tests.support.metrics import Scrape
from tests.support.redis_server import free_port

#: Bound of every wait on the child: to come up, to log something, to reach a condition.
WAIT_S = 20.0
#: How often a condition on the child (its log, its endpoints) is polled.
POLL_S = 0.05


@dataclass(frozen=True)
class RunningProxy:
    """A started ``idemproxy run``: its listeners and its log file."""

    process: asyncio.subprocess.Process
    port: int
    admin_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def entries(self) -> list[dict[str, Any]]:
        """Every JSON log line so far (a traceback's lines are part of its entry's ``exc``)."""
        found = []
        for line in self.log.read_bytes().splitlines():
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(entry, dict):
                found.append(entry)
        return found

    def logged(self, message: str) -> list[dict[str, Any]]:
        return [entry for entry in self.entries() if message in str(entry.get("msg", ""))]

    async def until_logged(self, message: str, within_s: float = WAIT_S) -> dict[str, Any]:
        """The first entry whose message holds ``message``, once the child wrote it."""
        entries: list[dict[str, Any]] = await until(lambda: self.logged(message), within_s, f"log line {message!r}")
        return entries[0]

    def errors(self) -> list[dict[str, Any]]:
        """Entries at level error or above, or carrying a traceback."""
        return [entry for entry in self.entries() if entry.get("level") in ("error", "critical") or "exc" in entry]

    async def scrape(self, session: aiohttp.ClientSession) -> Scrape:
        async with session.get(f"{self.admin_url}/metrics") as response:
            assert response.status == 200
            return Scrape(await response.text())


async def until(predicate: Callable[[], Any], within_s: float, what: str) -> Any:
    """``predicate()`` once it is truthy, polled; fails after ``within_s``."""
    deadline = time.monotonic() + within_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {within_s} s")
        await asyncio.sleep(POLL_S)  # polling a condition the child exposes no event for
    return value


async def until_true(check: Callable[[], Awaitable[bool]], within_s: float, what: str) -> None:
    """Until ``await check()`` is true, polled; fails after ``within_s``."""
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {within_s} s")
        await asyncio.sleep(POLL_S)  # polling a condition the child exposes no event for


@asynccontextmanager
async def running_proxy(
    settings: Mapping[str, Any],
    directory: Path,
    *,
    store: str | Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    name: str = "idemproxy",
) -> AsyncIterator[RunningProxy]:
    """``python -m idemproxy run`` with ``settings`` (written to ``directory``), ledger ``store``
    (a URL, or a ``store`` section), both listeners on free loopback ports, none of this
    environment's ``IDEMPROXY_*`` settings (``env`` added); its output in ``directory/NAME.log``.
    SIGTERM on exit."""
    port, admin_port = free_port(), free_port()
    document = {**settings, "listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin_port}", "store": store}
    config, log = _written(directory, name, document)
    clean = {key: value for key, value in os.environ.items() if not key.startswith("IDEMPROXY_")}
    with _output(log) as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "idemproxy", "run", "--config", str(config),
            stdout=output, stderr=output, env={**clean, **(env or {})}, cwd=directory,
        )  # fmt: skip
    running = RunningProxy(process, port, admin_port, log)
    try:

        def started() -> bool:
            if process.returncode is not None:
                raise AssertionError(f"idemproxy run exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            return bool(running.logged("idemproxy listening"))

        await until(started, WAIT_S, "'idemproxy listening'")
        yield running
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), WAIT_S)
            except TimeoutError:
                process.kill()
                await process.wait()


def _written(directory: Path, name: str, document: Mapping[str, Any]) -> tuple[Path, Path]:
    """The configuration file, written, and where the log goes."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / f"{name}.yaml"
    config.write_text(yaml.safe_dump(dict(document)), encoding="utf-8")
    return config, directory / f"{name}.log"


def _output(log: Path) -> BinaryIO:
    """Opened for the child's output; the caller closes it once the child has its own copy."""
    return open(log, "wb")


@asynccontextmanager
async def served(app: web.Application) -> AsyncIterator[str]:
    """``app`` on a free loopback port in this event loop; its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
