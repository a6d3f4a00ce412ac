"""The operations API never answers unauthenticated on a non-loopback address (issue 22, item 1).

A real ``idemproxy run`` refuses to start with an exposed admin listener and no
``auth``, in one line that says how to fix it; ``check-config`` says the same.
Health and metrics have a listener of their own that serves nothing else.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from idemproxy.config.settings import ConfigError, HostPort, Overrides, parse_config
from tests.support.auth import ADMIN_TOKEN, auth_setup, bearer
from tests.support.processes import read_until
from tests.support.redis_server import free_port
from tests.support.upstream import Upstream

ROUTES = [{"prefix": "/", "name": "tools", "upstream": "http://127.0.0.1:9"}]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.7", False),
        ("admin.internal", False),  # a name may resolve to anything
        ("localhost.evil.example", False),
    ],
)
def test_which_addresses_count_as_loopback(host: str, loopback: bool) -> None:
    assert HostPort(host, 8081).is_loopback is loopback


@pytest.mark.parametrize("admin_listen", ["0.0.0.0:8081", "[::]:8081", "10.1.2.3:8081", "admin.internal:8081"])
def test_an_exposed_admin_listener_without_auth_is_refused(admin_listen: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"admin_listen": admin_listen, "routes": ROUTES})
    (problem,) = raised.value.problems
    assert problem.startswith("admin_listen: ")
    assert "not a loopback address" in problem
    assert "bind admin_listen to 127.0.0.1, or configure 'auth'" in problem


def test_the_environment_cannot_expose_the_admin_listener_either() -> None:
    with pytest.raises(ConfigError, match=r"admin_listen.*not a loopback address"):
        parse_config({"routes": ROUTES}, overrides=Overrides(admin_listen="0.0.0.0:8081"))


def test_an_exposed_admin_listener_with_auth_and_a_loopback_one_without_are_accepted(tmp_path: Path) -> None:
    identities = auth_setup(tmp_path)
    exposed = parse_config(
        {"admin_listen": "0.0.0.0:8081", "auth": {"identities_file": str(identities)}, "routes": ROUTES}
    )
    assert str(exposed.admin_listen) == "0.0.0.0:8081"
    assert parse_config({"routes": ROUTES}).admin_listen.is_loopback
    assert parse_config({"routes": ROUTES}).metrics_listen is None


def test_the_metrics_listener_must_not_share_a_port() -> None:
    with pytest.raises(ConfigError, match="metrics_listen: must differ"):
        parse_config({"metrics_listen": "127.0.0.1:8081", "routes": ROUTES})


async def test_run_refuses_an_exposed_admin_listener_without_auth_in_one_line(upstream: Upstream) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "idemproxy", "run", "--upstream", upstream.url,
        "--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"0.0.0.0:{free_port()}",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    lines = err.decode().splitlines()
    assert len(lines) == 1, err
    assert "admin_listen" in lines[0]
    assert "configure 'auth'" in lines[0]
    assert upstream.count() == 0


async def test_check_config_refuses_it_too(tmp_path: Path) -> None:
    config = tmp_path / "exposed.yaml"
    config.write_text(yaml.safe_dump({"admin_listen": "0.0.0.0:8081", "routes": ROUTES}), encoding="utf-8")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "idemproxy", "check-config", str(config), stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert "not a loopback address" in err.decode()


async def test_the_metrics_listener_serves_health_and_metrics_and_no_operations(
    upstream: Upstream, tmp_path: Path
) -> None:
    """Exposed on every address with auth on: Prometheus and the kubelet need no credentials there,
    and the operations API is not there at all; on the admin listener it needs credentials."""
    identities = auth_setup(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "auth": {"identities_file": str(identities)},
                "routes": [{"prefix": "/", "name": "tools", "upstream": upstream.url}],
            }
        ),
        encoding="utf-8",
    )
    listen, admin, metrics = free_port(), free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "idemproxy", "run", "--config", str(config),
        "--store", f"sqlite:///{tmp_path / 'ledger.db'}",
        "--listen", f"127.0.0.1:{listen}", "--admin-listen", f"0.0.0.0:{admin}",
        "--metrics-listen", f"0.0.0.0:{metrics}",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        startup = await read_until(process.stderr, b"idemproxy listening")
        assert orjson.loads(startup[-1])["metrics"] == f"0.0.0.0:{metrics}"
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{metrics}"
            for path in ("/healthz", "/readyz"):
                async with session.get(base + path) as response:
                    assert response.status == 200, path
            async with session.get(base + "/metrics") as response:
                assert response.status == 200
                assert "idemproxy_" in await response.text()
            for path in ("/_idem/ops", "/_idem/openapi.json"):
                async with session.get(base + path) as response:
                    assert response.status == 404, path
            async with session.get(f"http://127.0.0.1:{admin}/_idem/ops") as response:
                assert response.status == 401
            async with session.get(f"http://127.0.0.1:{admin}/_idem/ops", headers=bearer(ADMIN_TOKEN)) as response:
                assert response.status == 200
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 20)
