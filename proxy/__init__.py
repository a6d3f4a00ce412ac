"""idemproxy: an idempotent tool-proxy sidecar for AI agents.

For every operation id, the tool's side effect happens at most once, and every
caller that asks about the operation gets the same answer.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
