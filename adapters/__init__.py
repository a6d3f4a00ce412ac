"""Client-side helpers that put agent frameworks' tool calls behind idemproxy.

The framework adapters (AutoGen, CAMEL, MCP) live here; see the README.
"""

from __future__ import annotations

__all__: list[str] = []
