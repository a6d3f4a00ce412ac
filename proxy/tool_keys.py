"""The operation key of a tool call: one derivation for the adapters and the MCP route mode.

A model mints a fresh tool-call id each time it re-issues a call, so the key
comes from what stays the same: the run (task) the call belongs to, the tool's
name and the canonical JSON of its arguments::

    key = "op1-" + sha256(canonical_json([run_id, tool, arguments])).hexdigest()

The adapters put it on the requests a tool sends (``Idempotency-Key``) or in
an MCP ``tools/call``'s ``params._meta``; an MCP route derives the very same
key for a call that carries none, with the ``X-Agent-Task`` header as the run.
This module imports nothing but the proxy's canonical JSON, so both sides can
use it without pulling in a framework.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from idemproxy.fingerprint import canonical_json

#: Bumped if the derivation ever changes, so old and new keys never collide.
KEY_VERSION = "op1"


def tool_call_key(run_id: str, tool: str, arguments: Mapping[str, Any]) -> str:
    """The operation key of a call of ``tool`` with ``arguments`` in run ``run_id``.

    Two calls get the same key exactly when they belong to the same run, name
    the same tool and carry equal arguments (key order and whitespace do not
    matter; ``1`` and ``1.0`` differ, as in the proxy's fingerprints). Raises
    ``TypeError`` when the arguments are not JSON values.
    """
    material = canonical_json([run_id, tool, arguments])
    return f"{KEY_VERSION}-{hashlib.sha256(material).hexdigest()}"
