"""Clocks that disagree, or jump, never duplicate an effect (the trust issue, item 14).

Real ``idemproxy run`` processes share one ledger (Redis, or one SQLite file on
this host) in front of a slow tool (each effect lands 3 s after its request;
the lease is 5 s, renewed by its owner). One instance's wall clock
is shifted with libfaketime (its monotonic clock left alone, as a real clock
step leaves it): 10 s ahead, 10 s behind, or jumping 10 s forward while the
attempts are in flight. Before leases were measured on the store's clock, the
duplicates sent meanwhile found the lease "expired" by the skewed clock, a
reconciler probed, found nothing yet, released the operation and it was sent
again: every operation ran twice. Now each runs once, and every duplicate gets
the first attempt's answer.
"""

from __future__ import annotations

import asyncio
import glob
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.chaos.tool import reconcile_config
from tests.support.processes import wait_http
from tests.support.redis_server import free_port
from tests.support.topologies import RedisNode

pytestmark = pytest.mark.slow

OPERATIONS = 4
COMMIT_AFTER_S = 3.0
SKEW = "10s"


def libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        pytest.fail(
            "libfaketime is not installed: apt-get install libfaketime "
            "(make test installs it with scripts/bootstrap.sh test-tools)"
        )
    return found[0]


def shifted(offset: str | None = None, *, offset_file: Path | None = None) -> dict[str, str]:
    """Environment that shifts a process's wall clock (not its monotonic clock) by ``offset``
    ("+8s"), or by whatever ``offset_file`` says at each reading."""
    env = {"LD_PRELOAD": libfaketime(), "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    if offset_file is not None:
        env |= {"FAKETIME_TIMESTAMP_FILE": str(offset_file), "FAKETIME_NO_CACHE": "1"}
    else:
        assert offset is not None
        env["FAKETIME"] = offset
    return env


@dataclass(frozen=True)
class Proxy:
    url: str
    admin: str


class Deployment:
    """The tool, the ledger, and as many proxies as a test starts."""

    def __init__(self, directory: Path, store_url: str, stack: ExitStack) -> None:
        self.directory = directory
        self.store_url = store_url
        self.stack = stack
        self.tool_url = self._start_tool()

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = self.directory / f"{name}.log"
        with open(log, "ab") as output:
            process = subprocess.Popen(
                args, stdout=output, stderr=output, env=None if env is None else {**_base_env(), **env}
            )
        self.stack.callback(_stop, process)
        return process

    def _start_tool(self) -> str:
        port = free_port()
        process = self._spawn(
            "tool",
            [sys.executable, "-m", "tests.chaos.tool", "--port", str(port), "--log", str(self.directory / "effects"),
             "--commit-after", str(COMMIT_AFTER_S)],
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/effects?key=-", process=process, log=self.directory / "tool.log")
        return url

    def proxy(self, name: str, env: dict[str, str] | None = None) -> Proxy:
        listen, admin = free_port(), free_port()
        config = {
            "listen": f"127.0.0.1:{listen}",
            "admin_listen": f"127.0.0.1:{admin}",
            "log_level": "warning",
            "store": {"url": self.store_url},
            "routes": [
                {
                    "name": "tool",
                    "prefix": "/",
                    "upstream": self.tool_url,
                    "connect_timeout": "500ms",
                    "read_timeout": "4s",
                    "lease": "5s",
                    "wait": "8s",
                    "reconcile": reconcile_config(max_probes=20, on_demand_timeout="3s"),
                }
            ],
        }
        path = self.directory / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        process = self._spawn(name, [sys.executable, "-m", "idemproxy", "run", "--config", str(path)], env)
        wait_http(f"http://127.0.0.1:{admin}/healthz", process=process, log=self.directory / f"{name}.log")
        return Proxy(f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{admin}")

    async def effects(self, session: aiohttp.ClientSession, key: str) -> list[int]:
        async with session.get(f"{self.tool_url}/effects", params={"key": key}) as response:
            return [match["effect_id"] for match in (await response.json())["matches"]]


def _base_env() -> dict[str, str]:
    return dict(os.environ)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        return
    server = RedisNode(tmp_path / "redis")
    server.start()
    try:
        yield server.url
    finally:
        server.kill()


@pytest.fixture
def deployment(tmp_path: Path, store_url: str) -> Iterator[Deployment]:
    with ExitStack() as stack:
        yield Deployment(tmp_path, store_url, stack)


async def send(session: aiohttp.ClientSession, proxy: Proxy, key: str) -> tuple[int, bytes]:
    async with session.post(f"{proxy.url}/act", data=b"{}", headers={"Idempotency-Key": key}) as response:
        return response.status, await response.read()


async def in_flight(session: aiohttp.ClientSession, proxy: Proxy, deployment: Deployment, keys: list[str]) -> None:
    """Until the ledger holds every key's attempt as PENDING (reserved before it is
    forwarded), none of them landed yet at the slow tool."""
    deadline = time.monotonic() + COMMIT_AFTER_S
    while True:
        async with session.get(f"{proxy.admin}/_idem/ops", params={"state": "PENDING"}) as response:
            pending = (await response.json())["operations"]
        if len(pending) >= len(keys):
            break
        assert time.monotonic() < deadline, f"only {len(pending)} of {len(keys)} attempts were reserved"
        await asyncio.sleep(0.02)  # polling the ledger for the condition
    landed = [key for key in keys if await deployment.effects(session, key)]
    assert not landed, f"effects landed before the duplicates were sent: {landed}"


async def run_with_duplicates(
    deployment: Deployment, first: Proxy, duplicate: Proxy, prefix: str, meanwhile: Callable[[], object] = str
) -> None:
    """Operations sent to ``first``; once all are in flight, ``meanwhile()``, then a duplicate
    of each to ``duplicate``: one effect each, and the duplicate gets the first one's answer."""
    keys = [f"{prefix}-{n}" for n in range(OPERATIONS)]
    async with aiohttp.ClientSession() as session:
        firsts = [asyncio.ensure_future(send(session, first, key)) for key in keys]
        await in_flight(session, first, deployment, keys)
        meanwhile()
        duplicates = await asyncio.gather(*(send(session, duplicate, key) for key in keys))
        answers = await asyncio.gather(*firsts)
        for key, answer, again in zip(keys, answers, duplicates, strict=True):
            effects = await deployment.effects(session, key)
            assert len(effects) == 1, f"{key}: {len(effects)} effects ({answer[0]} then {again[0]})"
            assert answer[0] == 201
            assert again == answer, f"{key}: the duplicate got {again[0]} {again[1]!r}"


@pytest.mark.parametrize("skew", ["ahead", "behind"])
async def test_an_instance_whose_clock_is_off_never_duplicates_an_effect(deployment: Deployment, skew: str) -> None:
    """Ahead: its duplicates see the other's lease as long over. Behind: the leases it
    writes look long over to the other instance."""
    punctual = deployment.proxy("punctual")
    offset = f"+{SKEW}" if skew == "ahead" else f"-{SKEW}"
    skewed = deployment.proxy("skewed", shifted(offset))
    first, duplicate = (punctual, skewed) if skew == "ahead" else (skewed, punctual)

    await run_with_duplicates(deployment, first, duplicate, skew)


async def test_a_clock_jumping_forward_mid_flight_never_duplicates_an_effect(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The instance's own leases, its own duplicates and its own reconciler (every 200 ms),
    after its wall clock jumps 10 s forward with every attempt in flight."""
    offset_file = tmp_path / "offset"
    offset_file.write_text("+0s")
    proxy = deployment.proxy("jumping", shifted(offset_file=offset_file))

    await run_with_duplicates(deployment, proxy, proxy, "jump", lambda: offset_file.write_text(f"+{SKEW}"))
