"""Child processes in tests: the `idemproxy` command as a user runs it, ``idemproxy run`` on
any store with its log in a file (read back as JSON entries, so a long-running child never
blocks on a full pipe), reading what a child writes, bounded, and the tools a child fronts
served in the test's own event loop."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
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

#: Bound of every wait on a child: to come up, to log something, to reach a condition.
WAIT_S = 20.0
#: How often a condition on a child (its log, its endpoints) is polled.
POLL_S = 0.05


async def read_until(stream: asyncio.StreamReader, marker: bytes, limit_s: float = 20.0) -> list[bytes]:
    """Lines up to and including the first containing ``marker``."""
    lines: list[bytes] = []
    async with asyncio.timeout(limit_s):
        while True:
            line = await stream.readline()
            if not line:
                raise AssertionError(f"stream ended before {marker!r}; got {b''.join(lines)!r}")
            lines.append(line)
            if marker in line:
                return lines


def idemproxy_cli(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m idemproxy ARGS`` in ``cwd``, with none of this environment's ``IDEMPROXY_*``
    settings (only ``env``'s): what a user's shell would run."""
    clean = {name: value for name, value in os.environ.items() if not name.startswith("IDEMPROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "idemproxy", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**clean, **(env or {})},
        timeout=60,
        check=False,
    )


def wait_http(
    url: str,
    timeout_s: float = 30.0,
    *,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Until ``url`` answers: a server child came up. ``RuntimeError`` (with the tail of
    ``log``) when it does not in time, or ``process`` exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
                tail = "" if log is None else "\n" + log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{url} did not come up{tail}") from None
            time.sleep(0.05)  # polling the child's port until it listens


async def log_line(log: Path, marker: str, limit_s: float = 20.0, *, after: int = 0) -> int:
    """Until the ``idemproxy run`` log ``log`` has a line containing ``marker`` past its first
    ``after`` bytes (bounded); the offset just past that line."""
    deadline = time.monotonic() + limit_s
    while True:
        text = await asyncio.to_thread(log.read_bytes)
        found = text.find(marker.encode(), after)
        if found >= 0:
            end = text.find(b"\n", found)
            return len(text) if end < 0 else end + 1
        if time.monotonic() > deadline:
            raise AssertionError(f"no {marker!r} in {log.name} within {limit_s:g}s; its tail: {text[-3000:]!r}")
        await asyncio.sleep(0.05)  # polling the child's log until it writes the line


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


def _written(directory: Path, name: str, document: Mapping[str, Any]) -> tuple[Path, Path]:
    """The configuration file, written, and where the log goes."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / f"{name}.yaml"
    config.write_text(yaml.safe_dump(dict(document)), encoding="utf-8")
    return config, directory / f"{name}.log"


def _new_file(path: Path) -> BinaryIO:
    return open(path, "wb")  # the caller closes it


async def until(predicate: Callable[[], Any], within_s: float, what: str) -> Any:
    """``predicate()`` once it is truthy, polled; fails after ``within_s``."""
    deadline = time.monotonic() + within_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {within_s} s")
        await asyncio.sleep(POLL_S)  # polling a condition the child exposes no event for
    return value


@asynccontextmanager
async def idemproxy_run(
    settings: Mapping[str, Any],
    directory: Path,
    *,
    store: str | Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    name: str = "idemproxy",
) -> AsyncIterator[RunningProxy]:
    """``python -m idemproxy run`` with ``settings`` (written to ``directory/NAME.yaml``), both
    listeners on free loopback ports, none of this environment's ``IDEMPROXY_*`` settings
    (``env`` added), run in ``directory``; stopped with SIGTERM on exit. Its ledger is
    ``store`` (a URL, or a ``store`` section), by default a SQLite file in ``directory``. Its
    output goes to ``directory/NAME.log`` (a file: a pipe nobody reads could fill and block
    it); ``name`` tells several instances in one directory apart."""
    port, admin_port = free_port(), free_port()
    document = {
        **settings,
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "store": store or f"sqlite:///{directory / 'ledger.db'}",
    }
    config, log = _written(directory, name, document)
    clean = {key: value for key, value in os.environ.items() if not key.startswith("IDEMPROXY_")}
    with _new_file(log) as output:  # the child has its own copy once started
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


async def until_true(check: Callable[[], Awaitable[bool]], within_s: float, what: str) -> None:
    """Until ``await check()`` is true, polled; fails after ``within_s``."""
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {within_s} s")
        await asyncio.sleep(POLL_S)  # polling a condition the child exposes no event for


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
