"""How each kind of route turns its wire messages into operations: plain HTTP and MCP."""
