"""Identities for tests: token hashes, an identities file, signed request headers."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import yaml

from idemproxy.config.settings import ProxyConfig, parse_config
from idemproxy.edge.auth import KEY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

PLANNER_TOKEN = "planner-token-0123456789"
EXECUTOR_TOKEN = "executor-token-0123456789"
EXECUTOR2_TOKEN = "executor2-token-0123456789"
VERIFIER_TOKEN = "verifier-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789"
HMAC_SECRET = b"signer-secret-0123456789abcdef"
HMAC_KEY_ID = "signer-1"


def token_hash(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def identities(secret_file: Path) -> list[dict[str, Any]]:
    """planner reads; executors and the HMAC signer read and write; verifier and admin see operations."""
    read_write = [{"routes": "*", "methods": ["GET", "POST"]}]
    return [
        {"name": "planner", "tokens": [token_hash(PLANNER_TOKEN)], "scopes": [{"methods": ["GET", "HEAD"]}]},
        {"name": "executor", "tokens": [token_hash(EXECUTOR_TOKEN)], "scopes": read_write},
        {"name": "executor2", "tokens": [token_hash(EXECUTOR2_TOKEN)], "scopes": read_write},
        {"name": "signer", "hmac_keys": {HMAC_KEY_ID: f"file:{secret_file}"}, "scopes": read_write},
        {"name": "verifier", "tokens": [token_hash(VERIFIER_TOKEN)], "scopes": read_write, "ops": "read"},
        {"name": "admin", "tokens": [token_hash(ADMIN_TOKEN)], "ops": "admin"},
    ]


def write_identities(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"identities": items}), encoding="utf-8")
    return path


def auth_setup(directory: Path) -> Path:
    """An identities file (and the HMAC secret it references) in ``directory``."""
    secret = directory / "signer.key"
    secret.write_bytes(HMAC_SECRET + b"\n")
    return write_identities(directory / "identities.yaml", identities(secret))


def auth_config(upstream_url: str, store_url: str, identities_file: Path, **route: Any) -> ProxyConfig:
    return parse_config(
        {
            "store": store_url,
            "auth": {"identities_file": str(identities_file)},
            "routes": [{"prefix": "/", "name": "tools", "upstream": upstream_url, **route}],
        }
    )


def signed(
    method: str,
    target: str,
    body: bytes = b"",
    key: str = "",
    *,
    timestamp: int | None = None,
    secret: bytes = HMAC_SECRET,
    key_id: str = HMAC_KEY_ID,
) -> dict[str, str]:
    """HMAC headers for one request (plus its Idempotency-Key when given)."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    headers = {
        KEY_ID_HEADER: key_id,
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: sign(secret, method, target, stamp, key, body),
    }
    if key:
        headers["Idempotency-Key"] = key
    return headers
