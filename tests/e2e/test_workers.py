"""``idemproxy run --workers N``: processes sharing the ports, the store and the metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import read_until
from tests.support.redis_server import free_port
from tests.support.upstream import Upstream

pytestmark = pytest.mark.slow


def requests_counted(exposition: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition)
        if family.name == "idemproxy_requests"
        for sample in family.samples
        if sample.name == "idemproxy_requests_total"
    )


async def test_two_workers_share_ports_store_and_metrics(upstream: Upstream, redis_url: str, tmp_path: Path) -> None:
    listen, admin = free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "idemproxy", "run", "--workers", "2",
        "--upstream", upstream.url, "--listen", f"127.0.0.1:{listen}", "--admin-listen", f"127.0.0.1:{admin}",
        "--store", redis_url,
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        await read_until(process.stderr, b"idemproxy listening")
        await read_until(process.stderr, b"idemproxy listening")  # both workers are up
        keys = [f"k{n % 20}" for n in range(60)]  # 20 operations, each sent 3 times
        # A new connection per request, so the kernel spreads them over both workers.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def post(key: str) -> tuple[int, bytes]:
                async with session.post(
                    f"http://127.0.0.1:{listen}/items", json={"k": key}, headers={"Idempotency-Key": key}
                ) as response:
                    return response.status, await response.read()

            answers = await asyncio.gather(*(post(key) for key in keys))
            async with session.get(f"http://127.0.0.1:{admin}/metrics") as response:
                exposition = await response.text()

        by_key: dict[str, set[tuple[int, bytes]]] = {}
        for key, answer in zip(keys, answers, strict=True):
            by_key.setdefault(key, set()).add(answer)
        assert all(len(distinct) == 1 for distinct in by_key.values())  # same answer for every copy
        assert {status for status, _ in answers} == {201}
        assert upstream.count() == 20
        assert requests_counted(exposition) == 60  # one scrape, every worker's requests
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
        log = [orjson.loads(line) for line in (await process.stderr.read()).splitlines() if line.startswith(b"{")]
        serving = {entry["pid"] for entry in log if entry["logger"] == "idemproxy.access"}
        assert len(serving) == 2  # both workers took requests
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
