"""``idemproxy ops`` against a real ``idemproxy run`` with admin authentication on (issue 22, item 2).

The CLI signs in as the admin API accepts: a bearer token (flag or environment)
or an HMAC signature (key id, secret from a file or the environment); without
credentials, or with wrong ones, it fails in one line that says what to pass.
Its connection options work before or after the verb.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support.auth import ADMIN_TOKEN, PLANNER_TOKEN, token_hash
from tests.support.ops_cli import Run, assert_one_line_error
from tests.support.processes import idemproxy_run
from tests.support.upstream import Upstream
from tests.support.wire import connected

OPS_SECRET = "ops-signing-secret-0123456789abcdef"
OPS_KEY_ID = "ops-1"
UNKNOWN_OP = "0" * 32


@dataclass(frozen=True)
class Proxy:
    admin_url: str
    secret_file: Path


@pytest.fixture
async def proxy(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Proxy]:
    secret_file = tmp_path / "ops.key"
    secret_file.write_text(OPS_SECRET + "\n", encoding="utf-8")
    identities = [
        {"name": "admin", "tokens": [token_hash(ADMIN_TOKEN)], "ops": "admin"},
        {"name": "oncall", "hmac_keys": {OPS_KEY_ID: f"file:{secret_file}"}, "ops": "admin"},
        {"name": "planner", "tokens": [token_hash(PLANNER_TOKEN)], "scopes": [{"methods": ["GET"]}]},
    ]
    (tmp_path / "identities.yaml").write_text(yaml.safe_dump({"identities": identities}), encoding="utf-8")
    settings = {
        "auth": {"identities_file": str(tmp_path / "identities.yaml")},
        "routes": [{"prefix": "/", "name": "tools", "upstream": upstream.url}],
    }
    async with idemproxy_run(settings, tmp_path) as listening:
        yield Proxy(listening.admin_url, secret_file)


async def ops(*args: str, env: dict[str, str] | None = None) -> Run:
    """The CLI with none of the caller's IDEMPROXY_ADMIN_* settings, plus ``env``."""
    base = {name: value for name, value in os.environ.items() if not name.startswith("IDEMPROXY_ADMIN")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "idemproxy", "ops", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**base, **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


async def test_without_credentials_the_cli_says_how_to_sign_in(proxy: Proxy) -> None:
    run = await ops("--admin", proxy.admin_url, "list")
    assert_one_line_error(run, "401", "--token", "IDEMPROXY_ADMIN_TOKEN")


async def test_a_token_after_the_verb_or_in_the_environment_signs_in(proxy: Proxy) -> None:
    after = await ops("list", "--admin", proxy.admin_url, "--token", ADMIN_TOKEN, "--json")
    assert after.code == 0, after.err
    assert '"operations": []' in after.out

    from_env = await ops("list", env={"IDEMPROXY_ADMIN_URL": proxy.admin_url, "IDEMPROXY_ADMIN_TOKEN": ADMIN_TOKEN})
    assert from_env.code == 0, from_env.err
    assert from_env.out.strip() == "no operations match"


async def test_a_wrong_token_and_one_without_ops_access_fail_in_one_line(proxy: Proxy) -> None:
    wrong = await ops("--admin", proxy.admin_url, "--token", "not-a-token-0123456789", "list")
    assert_one_line_error(wrong, "401", "bearer token is not valid")
    planner = await ops("--admin", proxy.admin_url, "--token", PLANNER_TOKEN, "list")
    assert_one_line_error(planner, "403", "'ops: read'")


async def test_an_hmac_signature_signs_in_from_a_file_or_the_environment(proxy: Proxy) -> None:
    from_file = await ops(
        "--admin", proxy.admin_url, "list", "--hmac-key-id", OPS_KEY_ID, "--hmac-secret-file", str(proxy.secret_file)
    )
    assert from_file.code == 0, from_file.err
    assert from_file.out.strip() == "no operations match"

    # A POST signs its body too: the admin API verified it (404 for the unknown operation, not 401).
    resolve = await ops(
        "--admin", proxy.admin_url, "resolve", UNKNOWN_OP, "--not-done", "--reason", "checked by hand",
        env={"IDEMPROXY_ADMIN_HMAC_KEY_ID": OPS_KEY_ID, "IDEMPROXY_ADMIN_HMAC_SECRET": OPS_SECRET},
    )  # fmt: skip
    assert_one_line_error(resolve, "404")


async def test_a_wrong_hmac_secret_or_a_missing_one_fails_in_one_line(proxy: Proxy) -> None:
    wrong = await ops(
        "--admin", proxy.admin_url, "--hmac-key-id", OPS_KEY_ID, "list",
        env={"IDEMPROXY_ADMIN_HMAC_SECRET": "another-secret-0123456789abcdef"},
    )  # fmt: skip
    assert_one_line_error(wrong, "401", "signature is not valid")
    missing = await ops("--admin", proxy.admin_url, "--hmac-key-id", OPS_KEY_ID, "list")
    assert_one_line_error(missing, "--hmac-secret-file", "IDEMPROXY_ADMIN_HMAC_SECRET")
    both = await ops("--admin", proxy.admin_url, "--token", ADMIN_TOKEN, "--hmac-key-id", OPS_KEY_ID, "list")
    assert_one_line_error(both, "not both")


async def expect_continue(admin_url: str, headers: dict[str, str]) -> tuple[bytes, bytes]:
    """A resolve sent with ``Expect: 100-continue``: the first answer's status line, and (when
    invited) the final answer's status line after the body is sent."""
    host, _, port = admin_url.removeprefix("http://").partition(":")
    body = b'{"outcome": "not_done", "by": "test"}'
    head = [f"POST /_idem/ops/{UNKNOWN_OP}/resolve HTTP/1.1", f"Host: {host}", "Expect: 100-continue"]
    head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    async with connected(int(port), host=host) as connection:
        await connection.send(("\r\n".join(head) + "\r\n\r\n").encode())
        first = await connection.reply(within_s=10)
        if first.status != 100:
            return first.status_line, b""
        await connection.send(body)
        return first.status_line, (await connection.reply(within_s=10)).status_line


@pytest.mark.parametrize(
    ("headers", "refusal"),
    [
        pytest.param({}, b"HTTP/1.1 401", id="no-credentials"),
        pytest.param({"Authorization": "Bearer not-a-token-0123456789"}, b"HTTP/1.1 401", id="wrong-token"),
        pytest.param({"Authorization": f"Bearer {PLANNER_TOKEN}"}, b"HTTP/1.1 403", id="no-ops-access"),
        pytest.param(
            {"X-Idem-Key-Id": "nobody", "X-Idem-Timestamp": "1", "X-Idem-Signature": "0" * 64},
            b"HTTP/1.1 401",
            id="stale-signature",
        ),
    ],
)
async def test_the_admin_api_refuses_before_inviting_a_body(
    proxy: Proxy, headers: dict[str, str], refusal: bytes
) -> None:
    first, _ = await expect_continue(proxy.admin_url, headers)
    assert first.startswith(refusal), first


async def test_the_admin_api_invites_an_authenticated_body(proxy: Proxy) -> None:
    first, final = await expect_continue(proxy.admin_url, {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert first.startswith(b"HTTP/1.1 100"), first
    assert final.startswith(b"HTTP/1.1 404"), final  # authenticated, and the operation does not exist
