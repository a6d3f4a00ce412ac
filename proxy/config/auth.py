"""The ``auth`` configuration: identities, their scopes, secrets and budgets, validated.

Read from ``auth.identities`` in the main configuration and from the
identities file (``auth.identities_file``), whose shape is ``identities:
[...]``. Problems are reported with the key path, like the rest of the
configuration. Secrets are referenced as ``env:NAME`` or ``file:PATH``; bearer
tokens only ever as ``sha256:<hex>`` hashes. ``idemproxy.edge.auth`` uses these to
authenticate requests.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from idemproxy.config.budgets import BudgetOverride, read_override
from idemproxy.config.convert import kind, positive_duration
from idemproxy.config.key_paths import Problems
from idemproxy.config.source import YamlError, load_yaml

MIN_HMAC_KEY_BYTES = 16
_TOKEN_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_METHOD = re.compile(r"[A-Z]{1,20}")


class OpsAccess(StrEnum):
    """What an identity may do on the admin API's ``/_idem/ops``."""

    NONE = "none"
    READ = "read"  # show and list its own operations
    ADMIN = "admin"  # every caller's operations, and resolve them


@dataclass(frozen=True, slots=True)
class Grant:
    """One scope entry: these routes (``None``: all) with these methods (``None``: all)."""

    routes: frozenset[str] | None
    methods: frozenset[str] | None

    def allows(self, route: str, method: str) -> bool:
        return (self.routes is None or route in self.routes) and (self.methods is None or method in self.methods)


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    token_hashes: tuple[str, ...] = ()
    hmac_keys: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    scopes: tuple[Grant, ...] = ()
    ops: OpsAccess = OpsAccess.NONE
    budgets: BudgetOverride | None = None  # None: the top-level budgets.identity applies

    def allows(self, route: str, method: str) -> bool:
        return any(grant.allows(route, method) for grant in self.scopes)

    def can_see(self, caller: str) -> bool:
        """Whether this identity may read operations recorded for ``caller``."""
        return self.ops is OpsAccess.ADMIN or (self.ops is OpsAccess.READ and caller == self.name)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    identities: tuple[Identity, ...] = ()  # inline, from the main configuration
    identities_file: Path | None = None
    max_skew_s: float = 300.0
    reload_check_s: float = 2.0


class AuthConfigError(ValueError):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


# -- secrets and parsing -----------------------------------------------------------------


def resolve_secret(value: Any, *, literal_ok: bool = True) -> str:
    """``env:NAME`` or ``file:PATH`` (trailing newline dropped); else the literal, if allowed."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected 'env:NAME' or 'file:PATH', got {kind(value)}")
    source, _, ref = value.partition(":")
    if source == "env" and ref:
        if ref not in os.environ:
            raise ValueError(f"environment variable {ref} is not set")
        return os.environ[ref]
    if source == "file" and ref:
        try:
            return Path(ref).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"cannot read secret file {ref}: {exc.strerror}") from None
    if literal_ok:
        return value
    raise ValueError("secrets must be referenced as 'env:NAME' or 'file:PATH', never written in the configuration")


_AUTH_KEYS = frozenset({"identities", "identities_file", "max_skew", "reload_check"})
_IDENTITY_KEYS = frozenset({"name", "tokens", "hmac_keys", "scopes", "ops", "budgets"})
_SCOPE_KEYS = frozenset({"routes", "methods"})


def parse_auth(raw: Any, route_names: frozenset[str]) -> tuple[AuthConfig | None, list[str]]:
    """The ``auth`` section; problems are relative key paths with a message."""
    out = Problems()
    data = out.mapping(raw, _AUTH_KEYS)
    if data is None:
        return None, out.problems
    config = AuthConfig()
    durations: dict[str, float] = {}
    for key, default in (("max_skew", config.max_skew_s), ("reload_check", config.reload_check_s)):
        try:
            durations[key] = positive_duration(data[key]) if key in data else default
        except (ValueError, TypeError) as exc:
            out.fail(key, str(exc))
            durations[key] = default
    inline: tuple[Identity, ...] = ()
    if "identities" in data:
        with out.at("identities"):
            inline = _identities(out, data["identities"], route_names)
    path: Path | None = None
    from_file: tuple[Identity, ...] = ()
    if "identities_file" in data:
        if not isinstance(data["identities_file"], str) or not data["identities_file"]:
            out.fail("identities_file", f"expected a file path, got {kind(data['identities_file'])}")
        else:
            path = Path(data["identities_file"])
            try:
                from_file = load_identities_file(path, route_names)
            except AuthConfigError as exc:
                for problem in exc.problems:
                    out.fail("identities_file", problem)
    elif "identities" not in data:
        out.fail(None, "needs 'identities', 'identities_file' or both")
    try:
        merge(inline, from_file)
    except AuthConfigError as exc:
        for problem in exc.problems:
            out.fail("identities", problem)
    config = AuthConfig(inline, path, durations["max_skew"], durations["reload_check"])
    return (None if out.problems else config), out.problems


def load_identities_file(path: Path, route_names: frozenset[str]) -> tuple[Identity, ...]:
    """The identities in ``path``: ``identities: [...]`` (raises ``AuthConfigError``)."""
    try:
        document = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except OSError as exc:
        raise AuthConfigError([f"{path}: cannot read the file: {exc.strerror}"]) from exc
    except YamlError as exc:
        where = f"{path}:{exc.line}" if exc.line is not None else str(path)
        raise AuthConfigError([f"{where}: {exc.message}"]) from exc
    raw = document.data
    out = Problems()
    out.problems.extend(f"{key}: {message}" for key, _, message in document.problems)
    data = out.mapping(raw, frozenset({"identities"}))
    identities: tuple[Identity, ...] = ()
    if data is not None:
        with out.at("identities"):
            identities = _identities(out, data.get("identities", []), route_names)
    if out.problems:
        raise AuthConfigError([f"{path}: {problem}" for problem in out.problems])
    return identities


def merge(first: tuple[Identity, ...], second: tuple[Identity, ...]) -> tuple[Identity, ...]:
    """Both sets, refusing a name, token hash or key id that two identities share."""
    problems: list[str] = []
    seen: dict[str, dict[str, str]] = {"name": {}, "token hash": {}, "key id": {}}
    for identity in (*first, *second):
        for what, values in (
            ("name", (identity.name,)),
            ("token hash", identity.token_hashes),
            ("key id", tuple(identity.hmac_keys)),
        ):
            for value in values:
                owner = seen[what].setdefault(value, identity.name)
                if owner is not identity.name:
                    shown = value if what != "token hash" else value[:15] + "..."
                    problems.append(f"{what} {shown!r} is used more than once ({owner!r} and {identity.name!r})")
    if problems:
        raise AuthConfigError(problems)
    return (*first, *second)


def _identities(out: Problems, raw: Any, route_names: frozenset[str]) -> tuple[Identity, ...]:
    if not isinstance(raw, list):
        out.fail(None, f"expected a list of identities, got {kind(raw)}")
        return ()
    identities: list[Identity] = []
    for index, item in enumerate(raw):
        with out.at(f"[{index}]"):
            before = len(out.problems)
            identity = _identity(out, item, route_names)
            if identity is not None and len(out.problems) == before:
                identities.append(identity)
    return tuple(identities)


def _identity(out: Problems, raw: Any, route_names: frozenset[str]) -> Identity | None:
    data = out.mapping(raw, _IDENTITY_KEYS)
    if data is None:
        return None
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        out.fail("name", f"expected 1-64 letters, digits, '_', '.', '@' or '-', got {kind(name)}")
    tokens = out.strings(data.get("tokens", []), "tokens") or []
    for index, token in enumerate(tokens):
        if not _TOKEN_HASH.fullmatch(token):
            out.fail(
                f"tokens[{index}]",
                "expected 'sha256:<64 lower-case hex digits>' (tokens are only ever stored as hashes; "
                "compute one with: printf %s TOKEN | sha256sum)",
            )
    keys: dict[str, bytes] = {}
    raw_keys = data.get("hmac_keys", {})
    if not isinstance(raw_keys, dict):
        out.fail("hmac_keys", f"expected a mapping of key id to 'env:NAME' or 'file:PATH', got {kind(raw_keys)}")
        raw_keys = {}
    for key_id, ref in raw_keys.items():
        if not isinstance(key_id, str) or not _NAME.fullmatch(key_id):
            out.fail("hmac_keys", f"key ids are 1-64 letters, digits, '_', '.', '@' or '-', got {key_id!r}")
            continue
        try:
            secret = resolve_secret(ref, literal_ok=False).encode()
        except ValueError as exc:
            out.fail(f"hmac_keys.{key_id}", str(exc))
            continue
        if len(secret) < MIN_HMAC_KEY_BYTES:
            out.fail(f"hmac_keys.{key_id}", f"the key must be at least {MIN_HMAC_KEY_BYTES} bytes long")
        keys[key_id] = secret
    if not tokens and not keys:
        out.fail(None, "needs at least one of 'tokens' or 'hmac_keys'")
    grants: list[Grant] = []
    raw_scopes = data.get("scopes", [])
    if not isinstance(raw_scopes, list):
        out.fail("scopes", f"expected a list of {{routes, methods}}, got {kind(raw_scopes)}")
        raw_scopes = []
    for index, item in enumerate(raw_scopes):
        with out.at(f"scopes[{index}]"):
            grant = _grant(out, item, route_names)
            if grant is not None:
                grants.append(grant)
    ops = OpsAccess.NONE
    if "ops" in data:
        try:
            ops = OpsAccess(data["ops"])
        except ValueError:
            out.fail("ops", f"expected one of none, read, admin, got {kind(data['ops'])}")
    budgets: BudgetOverride | None = None
    if "budgets" in data:
        with out.at("budgets"):
            budgets = read_override(out, data["budgets"])
    if not isinstance(name, str):
        return None
    return Identity(name, tuple(tokens), keys, tuple(grants), ops, budgets)


def _grant(out: Problems, raw: Any, route_names: frozenset[str]) -> Grant | None:
    data = out.mapping(raw, _SCOPE_KEYS)
    if data is None:
        return None
    chosen: list[frozenset[str] | None] = []
    complete = True
    for key in ("routes", "methods"):
        value = data.get(key, "*")
        if value == "*":
            chosen.append(None)
            continue
        items = out.strings(value, key)
        if items is None:
            complete = False  # the other key is still checked
            continue
        if key == "methods":
            items = [item.upper() for item in items]
            if bad := [item for item in items if not _METHOD.fullmatch(item)]:
                out.fail(key, f"not HTTP methods: {bad}")
        elif unknown := sorted(set(items) - route_names):
            out.fail(key, f"no route is named {', '.join(map(repr, unknown))}; routes: {sorted(route_names)}")
        chosen.append(frozenset(items))
    return Grant(chosen[0], chosen[1]) if complete else None
