"""Child processes in tests: the `idemproxy` command as a user runs it, and reading what a
child (``idemproxy run``, a worker) writes, bounded."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from tests.support.redis_server import free_port


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


@dataclass(frozen=True)
class Listening:
    """A running ``idemproxy run``: its proxy and admin base URLs, and the file its log goes to."""

    url: str
    admin_url: str
    log: Path


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


def _new_file(path: Path) -> BinaryIO:
    return open(path, "wb")  # the caller closes it


@asynccontextmanager
async def idemproxy_run(
    settings: dict[str, Any], directory: Path, *, store: str | None = None, name: str = "idemproxy"
) -> AsyncIterator[Listening]:
    """``idemproxy run`` with the configuration ``settings`` (written to ``directory``), both
    listeners on free loopback ports; stopped with SIGTERM on exit. Its ledger is ``store``
    (a store URL), by default a SQLite file in ``directory``. Its log (stderr) goes to
    ``directory/NAME.log``; ``name`` tells several instances in one directory apart."""
    config = directory / ("config.yaml" if name == "idemproxy" else f"{name}.yaml")
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    log = directory / f"{name}.log"
    port, admin = free_port(), free_port()
    output = _new_file(log)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "idemproxy", "run", "--config", str(config),
            "--store", store or f"sqlite:///{directory / 'ledger.db'}",
            "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
            stderr=output,
        )  # fmt: skip
    finally:
        output.close()  # the child has its own copy
    try:
        listening = asyncio.ensure_future(log_line(log, "idemproxy listening"))
        exited = asyncio.ensure_future(process.wait())
        await asyncio.wait((listening, exited), return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        if not listening.done():
            listening.cancel()
            tail = (await asyncio.to_thread(log.read_bytes))[-3000:]
            raise AssertionError(f"idemproxy run exited with {process.returncode}: {tail!r}")
        await listening
        yield Listening(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", log)
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 20)
