"""A route's ``mode`` and its ``mcp`` block.

``mode: http`` (the default) records side-effecting HTTP methods; ``mode: mcp``
reads each request as an MCP (Streamable HTTP) message and records only
``tools/call`` requests (``idemproxy.modes.mcp``). The ``mcp`` block says which tools
only read (they pass through) and under which ``_meta`` key a call carries its
operation key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from idemproxy.config.convert import kind
from idemproxy.config.key_paths import NestedProblems, unknown_key
from idemproxy.protocol import DEFAULT_KEY_META

_KEYS = frozenset({"read_only_tools", "key_meta"})
# MCP's _meta key syntax: an optional reverse-DNS prefix ending in '/', then a name.
_LABEL = r"[A-Za-z](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_META_KEY = re.compile(rf"^(?:{_LABEL}(?:\.{_LABEL})*/)?[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
# Prefixes whose second label is "modelcontextprotocol" or "mcp" are reserved for MCP itself.
_RESERVED = re.compile(r"^[^./]+\.(?:modelcontextprotocol|mcp)[./]")


class RouteMode(StrEnum):
    HTTP = "http"  # side-effecting methods are recorded
    MCP = "mcp"  # MCP tools/call requests are recorded; every other message passes through


@dataclass(frozen=True, slots=True)
class McpConfig:
    read_only_tools: frozenset[str] = frozenset()  # these tools/call requests pass through
    key_meta: str = DEFAULT_KEY_META  # params._meta[key_meta] carries the operation key


def parse_mode(value: Any) -> RouteMode:
    try:
        return RouteMode(value)
    except ValueError:
        choices = ", ".join(mode.value for mode in RouteMode)
        raise ValueError(f"expected one of {choices}, got {kind(value)}") from None


def parse_mcp(raw: Any) -> McpConfig:
    """Validate an ``mcp`` block; a ``NestedProblems`` (a ValueError) names every problem found."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected a mapping with read_only_tools and/or key_meta, got {kind(raw)}")
    problems = [f"{key}: {unknown_key(key, _KEYS)}" for key in raw if key not in _KEYS]
    defaults = McpConfig()
    read_only = defaults.read_only_tools
    if "read_only_tools" in raw:
        value = raw["read_only_tools"]
        if not isinstance(value, list) or not all(isinstance(name, str) and name for name in value):
            problems.append(f"read_only_tools: expected a list of tool names, got {kind(value)}")
        else:
            read_only = frozenset(value)
    key_meta = raw.get("key_meta", defaults.key_meta)
    if not isinstance(key_meta, str) or not _META_KEY.match(key_meta):
        problems.append(
            f"key_meta: expected an MCP _meta key such as {DEFAULT_KEY_META!r} "
            f"(optional reverse-DNS prefix ending in '/', then a name), got {kind(key_meta)}"
        )
    elif _RESERVED.match(key_meta):
        problems.append(f"key_meta: the prefix of {key_meta!r} is reserved for MCP itself")
    if problems:
        raise NestedProblems.from_texts(problems)
    return McpConfig(read_only_tools=read_only, key_meta=key_meta)
