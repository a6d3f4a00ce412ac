"""The multiplexed hot-path connection, against real redis-server processes."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from idemproxy.store.redis_errors import RedisConnectionError, RedisReplyError
from idemproxy.store.redis_mux import Endpoint, Login, RedisMux, locate_fixed
from tests.support.redis_server import RedisServer

ECHO = "return ARGV[1]"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", extra_args=("--requirepass", "s3cret"))
    server.start()
    yield server
    if server.process is not None:
        server.process.send_signal(signal.SIGCONT)
    server.kill()


def mux_for(server: RedisServer, *, db: int = 3, timeout_s: float = 2.0) -> RedisMux:
    login = Login(password=server.password, db=db)
    return RedisMux(locate_fixed(Endpoint("127.0.0.1", server.port)), login, timeout_s=timeout_s)


@pytest.fixture
async def mux(server: RedisServer) -> AsyncIterator[RedisMux]:
    mux = mux_for(server)
    yield mux
    await mux.close()


async def test_concurrent_commands_get_their_own_replies(mux: RedisMux) -> None:
    replies = await asyncio.gather(*(mux.call("ECHO", f"value-{i}") for i in range(500)))
    assert replies == [f"value-{i}".encode() for i in range(500)]


async def test_login_selects_the_configured_database(mux: RedisMux, server: RedisServer) -> None:
    await mux.call("SET", "where", "db3")
    other = mux_for(server, db=0)
    try:
        assert await other.call("GET", "where") is None
        assert await mux.call("GET", "where") == b"db3"
    finally:
        await other.close()


async def test_a_wrong_password_is_an_error_reply(server: RedisServer) -> None:
    mux = RedisMux(locate_fixed(Endpoint("127.0.0.1", server.port)), Login(password="nope"), timeout_s=2)
    try:
        with pytest.raises(RedisReplyError, match=r"WRONGPASS|invalid"):
            await mux.call("PING")
    finally:
        await mux.close()


async def test_error_replies_fail_only_their_own_command(mux: RedisMux) -> None:
    await mux.call("SET", "text", "not a number")
    results = await asyncio.gather(mux.call("INCR", "text"), mux.call("ECHO", "fine"), return_exceptions=True)
    assert isinstance(results[0], RedisReplyError)
    assert results[1] == b"fine"


async def test_a_script_the_server_lost_is_loaded_again(mux: RedisMux) -> None:
    import hashlib

    sha = hashlib.sha1(ECHO.encode()).hexdigest()
    assert await mux.evalsha(sha, ECHO, [], ["first"]) == b"first"
    await mux.call("SCRIPT", "FLUSH")
    assert await mux.evalsha(sha, ECHO, [], ["again"]) == b"again"


async def test_a_cancelled_caller_does_not_shift_the_replies(mux: RedisMux) -> None:
    slow = asyncio.ensure_future(mux.call("DEBUG", "SLEEP", "0.2"))
    waiting = asyncio.ensure_future(mux.call("ECHO", "second"))
    await asyncio.sleep(0)  # both are queued on the connection
    slow.cancel()
    assert await waiting == b"second"
    assert await mux.call("ECHO", "third") == b"third"


async def test_a_restarted_server_is_reconnected_to(mux: RedisMux, server: RedisServer) -> None:
    assert await mux.call("PING") == b"PONG"
    server.restart()
    assert await mux.call("PING") == b"PONG"  # the dead connection fails, the retry reconnects


async def test_a_stalled_server_fails_the_commands_in_flight(server: RedisServer) -> None:
    mux = mux_for(server, timeout_s=0.3)
    try:
        assert await mux.call("PING") == b"PONG"
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)
        with pytest.raises(RedisConnectionError):
            await mux.call("PING")
        os.kill(server.process.pid, signal.SIGCONT)
        assert await mux.call("PING") == b"PONG"
    finally:
        await mux.close()


async def test_no_server_is_a_connection_error(tmp_path: Path) -> None:
    from tests.support.redis_server import free_port

    mux = RedisMux(locate_fixed(Endpoint("127.0.0.1", free_port())), Login(), timeout_s=1)
    try:
        with pytest.raises(RedisConnectionError):
            await mux.call("PING")
    finally:
        await mux.close()


async def test_a_closed_mux_refuses_commands(mux: RedisMux) -> None:
    await mux.close()
    with pytest.raises(RedisConnectionError, match="closed"):
        await mux.call("PING")
