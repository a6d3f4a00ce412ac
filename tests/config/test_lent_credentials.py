"""A proxy listener others can reach must not lend a route's credentials to anyone (the trust
issue: "assume every other pod in the cluster is hostile").

A route with ``upstream_headers`` sends the tool's credentials with every request it forwards.
On a non-loopback ``listen`` without ``auth``, any pod that reaches it could act with them,
under any caller name: ``idemproxy run`` and ``check-config`` refuse, in one line that says how
to fix it, unless the operator says the network is trusted
(``allow_unauthenticated_credential_use: true``).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from idemproxy.config.settings import ConfigError, Overrides, parse_config
from tests.support.auth import auth_setup
from tests.support.redis_server import free_port
from tests.support.upstream import Upstream

CREDENTIALED = {
    "prefix": "/tickets",
    "name": "tickets",
    "upstream": "http://127.0.0.1:9",
    "upstream_headers": {"Authorization": "Bearer tool-token-in-the-config"},
}
PLAIN = {"prefix": "/search", "name": "search", "upstream": "http://127.0.0.1:9"}


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "[::]:8080", "10.1.2.3:8080", "proxy.internal:8080"])
def test_credentials_are_not_lent_to_unauthenticated_callers_beyond_loopback(listen: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"listen": listen, "routes": [PLAIN, CREDENTIALED]})
    (problem,) = raised.value.problems
    assert problem.startswith("listen: ")
    assert "'tickets'" in problem
    assert "'search'" not in problem
    assert "configure 'auth'" in problem
    assert "allow_unauthenticated_credential_use: true" in problem
    assert "tool-token-in-the-config" not in problem  # the refusal never shows the secret


def test_the_environment_cannot_expose_them_either() -> None:
    with pytest.raises(ConfigError, match=r"listen: .*upstream_headers"):
        parse_config({"routes": [CREDENTIALED]}, overrides=Overrides(listen="0.0.0.0:8080"))


@pytest.mark.parametrize(
    "document",
    [
        pytest.param({"listen": "127.0.0.1:8080", "routes": [CREDENTIALED]}, id="loopback (a sidecar)"),
        pytest.param({"listen": "0.0.0.0:8080", "routes": [PLAIN]}, id="no credentials to lend"),
        pytest.param(
            {"listen": "0.0.0.0:8080", "allow_unauthenticated_credential_use": True, "routes": [CREDENTIALED]},
            id="the operator trusts the network",
        ),
    ],
)
def test_what_is_accepted(document: dict[str, Any]) -> None:
    assert parse_config(document).routes


def test_authenticated_callers_may_use_them_from_anywhere(tmp_path: Path) -> None:
    identities = auth_setup(tmp_path)
    config = parse_config(
        {"listen": "0.0.0.0:8080", "auth": {"identities_file": str(identities)}, "routes": [CREDENTIALED]}
    )
    assert config.auth is not None


def test_the_opt_in_is_a_boolean() -> None:
    with pytest.raises(ConfigError, match="allow_unauthenticated_credential_use"):
        parse_config({"allow_unauthenticated_credential_use": "yes please", "routes": [PLAIN]})


async def test_run_refuses_in_one_line(upstream: Upstream, tmp_path: Path) -> None:
    route = {**CREDENTIALED, "upstream": upstream.url}
    config = tmp_path / "exposed.yaml"
    config.write_text(yaml.safe_dump({"listen": f"0.0.0.0:{free_port()}", "routes": [route]}), encoding="utf-8")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "idemproxy", "run", "--config", str(config), stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    lines = err.decode().splitlines()
    assert len(lines) == 1, err
    assert "upstream_headers" in lines[0]
    assert upstream.count() == 0
