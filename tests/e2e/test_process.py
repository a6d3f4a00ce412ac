"""The real ``idemproxy run`` process and the ``make run`` demo, as a user starts them."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis

from tests.support.processes import read_until
from tests.support.redis_server import free_port
from tests.support.upstream import Upstream
from tests.support.wire import connected

REPO = Path(__file__).resolve().parents[2]


async def spawn_proxy(
    upstream_url: str, *store_args: str, cwd: Path | None = None
) -> tuple[asyncio.subprocess.Process, str]:
    """``idemproxy run`` in front of ``upstream_url``, once it says it listens; and its base URL."""
    listen, admin = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "idemproxy", "run",
        "--upstream", upstream_url,
        "--listen", f"127.0.0.1:{listen}",
        "--admin-listen", f"127.0.0.1:{admin}",
        *store_args,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        startup = await read_until(process.stderr, b"idemproxy listening")
    except BaseException:
        process.kill()
        await process.wait()
        raise
    assert orjson.loads(startup[-1])["listen"] == f"127.0.0.1:{listen}"
    return process, f"http://127.0.0.1:{listen}"


@pytest.fixture
async def proxy_process(upstream: Upstream, tmp_path: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    process, base = await spawn_proxy(upstream.url, "--store", f"sqlite:///{tmp_path / 'ledger.db'}")
    yield process, base
    if process.returncode is None:
        process.kill()
        await process.wait()


async def test_sigterm_drains_in_flight_requests_then_exits_cleanly(
    proxy_process: tuple[asyncio.subprocess.Process, str], upstream: Upstream
) -> None:
    process, base = proxy_process
    async with aiohttp.ClientSession() as session:
        in_flight = asyncio.create_task(session.post(f"{base}/gate", json={}, headers={"Idempotency-Key": "k"}))
        await upstream.arrived.wait()
        process.send_signal(signal.SIGTERM)
        assert process.stderr is not None
        await read_until(process.stderr, b"shutting down")
        upstream.release.set()
        response = await in_flight
        assert response.status == 201
        assert (await response.json())["effect"] == 1
    assert await asyncio.wait_for(process.wait(), 20) == 0
    assert upstream.count() == 1


async def test_run_replays_across_a_restart_of_the_process(upstream: Upstream, tmp_path: Path) -> None:
    """The embedded store is durable: a new process answers a duplicate from the file."""
    bodies = []
    for _ in range(2):
        # the default store: ./.idemproxy/ledger.db
        process, base = await spawn_proxy(upstream.url, cwd=tmp_path)
        async with aiohttp.ClientSession() as session:
            response = await session.post(f"{base}/items", json={"n": 1}, headers={"Idempotency-Key": "k"})
            bodies.append((response.status, await response.read()))
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    assert bodies[0] == bodies[1]
    assert upstream.count() == 1
    assert (tmp_path / ".idemproxy" / "ledger.db").exists()


async def test_run_on_redis_by_its_unix_socket_replays_a_duplicate(upstream: Upstream, redis_unix_url: str) -> None:
    process, base = await spawn_proxy(upstream.url, "--store", redis_unix_url)
    try:
        async with aiohttp.ClientSession() as session:
            answers = []
            for _ in range(2):
                response = await session.post(f"{base}/items", json={"n": 1}, headers={"Idempotency-Key": "k"})
                answers.append((response.status, await response.read(), response.headers.get("Idempotent-Replayed")))
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    assert answers[0][:2] == answers[1][:2]
    assert [replayed for *_, replayed in answers] == [None, "true"]
    assert upstream.count() == 1
    with redis.Redis.from_url(redis_unix_url) as ledger:
        assert len(ledger.keys("idem:*:op:*")) == 1, "the record is in the Redis behind the socket"


async def test_make_run_demo_starts_both_prints_a_curl_line_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    ports = {"DEMO_TOOL_PORT": free_port(), "DEMO_PROXY_PORT": free_port(), "DEMO_ADMIN_PORT": free_port()}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO / "examples" / "demo.py"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=tmp_path,
        env={**os.environ, **{name: str(port) for name, port in ports.items()}},
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        printed = b"".join(await read_until(process.stdout, b"Ctrl-C"))
        assert b"The scenario passed." in printed  # then it stays up for the user
        assert b"curl -i -X POST" in printed
        proxy = f"http://127.0.0.1:{ports['DEMO_PROXY_PORT']}"
        async with aiohttp.ClientSession() as session:
            answers = []
            for _ in range(2):
                response = await session.post(
                    f"{proxy}/tickets", json={"title": "printer on fire"}, headers={"Idempotency-Key": "demo"}
                )
                answers.append((response.status, await response.read(), response.headers.get("Idempotent-Replayed")))
            listing = await (await session.get(f"{proxy}/tickets?external_id=demo")).json()
        assert answers[0][:2] == answers[1][:2]
        assert answers[0][0] == 201
        assert answers[1][2] == "true"
        assert listing["count"] == 1
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


async def test_a_request_the_parser_refuses_is_one_warning_line_not_a_traceback(
    proxy_process: tuple[asyncio.subprocess.Process, str], upstream: Upstream
) -> None:
    process, base = proxy_process
    assert process.stderr is not None
    host, port = base.removeprefix("http://").split(":")
    async with connected(int(port), host=host) as connection:
        await connection.send(b"POST /items HTTP/1.1\r\nHost: x\r\nBad\x01Header: 1\r\n\r\n")
        answer = await connection.reply()  # answered 400 (problem+json), then closed

    [line] = (await read_until(process.stderr, b"refused a request"))[-1:]
    entry = orjson.loads(line)
    assert answer.status == 400
    assert entry["level"] == "warning"
    assert entry["logger"] == "idemproxy.wire.http_server"
    assert "exc" not in entry  # no traceback
    assert "Invalid header token" in entry["error"]
    async with aiohttp.ClientSession() as session, session.get(f"{base}/items") as response:
        assert response.status == 201  # still serving
    assert upstream.count() == 1
