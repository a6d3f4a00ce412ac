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
from typing import Any

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
    """A running ``idemproxy run``: its proxy and admin base URLs."""

    url: str
    admin_url: str


@asynccontextmanager
async def idemproxy_run(settings: dict[str, Any], directory: Path) -> AsyncIterator[Listening]:
    """``idemproxy run`` with the configuration ``settings`` (written to ``directory``), its ledger
    a SQLite file there, both listeners on free loopback ports; stopped with SIGTERM on exit."""
    config = directory / "config.yaml"
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    port, admin = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "idemproxy", "run", "--config", str(config),
        "--store", f"sqlite:///{directory / 'ledger.db'}",
        "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        await read_until(process.stderr, b"idemproxy listening")
        yield Listening(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}")
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 20)
