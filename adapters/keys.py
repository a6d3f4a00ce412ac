"""Operation keys for tool calls: the one derivation every adapter shares.

A model mints a fresh tool-call id each time it re-issues a call, so the call
id alone cannot recognise a retry. The default key is therefore derived from
what stays the same: the run (task) the call belongs to, the tool's name and
the canonical JSON of its arguments (the proxy's own canonical form,
``idemproxy.protocol.keys.canonical_json``)::

    key = "op1-" + sha256(canonical_json([run_id, tool, arguments])).hexdigest()

The derivation itself lives in ``idemproxy.protocol.keys``, where the proxy's MCP
route mode uses it too, so a key an adapter sends and a key the proxy derives
for the same call are the same key.

The call id is kept beside the key, for tracing. Applications that want one
operation per call id use ``key_from_call_id``; any other rule is a function
from ``ToolCall`` to ``str``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from idemproxy.adapters.errors import InvalidOperationKey
from idemproxy.protocol.errors import InvalidKey
from idemproxy.protocol.keys import KEY_VERSION, canonical_json, tool_call_key, validate_key

__all__ = [
    "KEY_VERSION",
    "KeyStrategy",
    "ToolCall",
    "checked_key",
    "key_from_arguments",
    "key_from_call_id",
    "operation_key",
]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call as a key strategy sees it."""

    run_id: str
    tool: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    call_id: str | None = None  # the model's tool-call id: tracing only, unless a strategy uses it


#: Maps a tool call to its operation key. The result must be a valid idempotency
#: key: 1 to 255 printable ASCII characters.
KeyStrategy = Callable[[ToolCall], str]


def operation_key(run_id: str, tool: str, arguments: Mapping[str, Any]) -> str:
    """The default operation key of a tool call: stable across retries and re-proposals.

    Two calls get the same key exactly when they belong to the same run, name
    the same tool and carry equal arguments (key order and whitespace do not
    matter; ``1`` and ``1.0`` differ, as in the proxy's fingerprints).
    """
    try:
        return tool_call_key(run_id, tool, arguments)
    except TypeError as exc:
        raise InvalidOperationKey(
            f"The arguments of tool {tool!r} are not JSON values, so no key can be derived "
            f"from them: {exc}. Pass JSON-compatible arguments or use a key strategy of your own."
        ) from exc


def key_from_arguments(call: ToolCall) -> str:
    """The default strategy: ``operation_key`` of the run, the tool and its arguments."""
    return operation_key(call.run_id, call.tool, call.arguments)


def key_from_call_id(call: ToolCall) -> str:
    """One operation per tool-call id (scoped by the run, since some models number calls per
    conversation). A re-proposal under a new call id is a new operation."""
    if call.call_id is None:
        raise InvalidOperationKey(
            f"Tool {call.tool!r} was called without a tool-call id, which key_from_call_id needs; "
            "use the default key_from_arguments, or an adapter that passes call ids through."
        )
    material = canonical_json(["call", call.run_id, call.call_id])
    return f"{KEY_VERSION}-call-{hashlib.sha256(material).hexdigest()}"


def checked_key(key: object, call: ToolCall) -> str:
    """``key`` if the proxy would accept it; otherwise an error naming the tool."""
    if not isinstance(key, str):
        raise InvalidOperationKey(
            f"The key strategy returned {type(key).__name__} for tool {call.tool!r}; expected str."
        )
    try:
        return validate_key(key)
    except InvalidKey as exc:
        raise InvalidOperationKey(f"The key for tool {call.tool!r} is invalid: {exc.detail}") from exc
