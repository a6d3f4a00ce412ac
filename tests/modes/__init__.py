"""The route modes (``idemproxy.modes``): the plain HTTP mode end to end (the MCP mode is in tests/mcp)."""
