"""MCP clients behind idemproxy: every ``tools/call`` carries its operation key in ``params._meta``.

``McpOperationKeys`` is an ``httpx.Auth``: on the way out it adds
``_meta["io.idemproxy/idempotency-key"]`` (the route's ``mcp.key_meta``) to
each ``tools/call`` request that has none, derived by the run's key strategy
from the run, the tool and the arguments (``operation_key``, the derivation
the proxy itself uses), and stamps every request with the run as
``X-Agent-Task``. It works on the HTTP request, so it is indifferent to the
``mcp`` SDK's version and to the task or thread the client runs in; any
client of the Streamable HTTP transport built on httpx can use it::

    keys = McpOperationKeys(AgentRun("ticket-triage-42"))
    async with (
        httpx.AsyncClient(auth=keys) as http,
        streamable_http_client("http://127.0.0.1:8080/mcp", http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        ...

AutoGen's ``McpWorkbench`` and CAMEL's ``MCPClient`` build their own httpx
clients: ``idemproxy.adapters.autogen.idempotent_mcp_params`` and
``idemproxy.adapters.camel.IdempotentMCPClient`` hand this auth to them.
"""

from __future__ import annotations

from collections.abc import Generator

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"idemproxy.adapters.mcp needs httpx: pip install 'idemproxy[mcp]' ({exc})") from exc

from idemproxy.adapters.context import DEFAULT_HEADERS, AgentRun
from idemproxy.adapters.keys import KeyStrategy, ToolCall, checked_key
from idemproxy.protocol import DEFAULT_KEY_META, HeaderNames
from idemproxy.protocol.exact_json import dumps, loads

__all__ = ["DEFAULT_KEY_META", "McpOperationKeys"]


class McpOperationKeys(httpx.Auth):
    """Puts each ``tools/call``'s operation key in ``params._meta[key_meta]``.

    ``keys`` overrides the run's key strategy; it sees no call id (a JSON-RPC id
    numbers a session's messages, not a model's tool calls), so strategies that
    need one, such as ``key_from_call_id``, do not fit here. A key the caller
    already put in ``_meta`` is kept. ``caller`` is sent as the caller header.
    """

    requires_request_body = True

    def __init__(
        self,
        run: AgentRun,
        *,
        key_meta: str = DEFAULT_KEY_META,
        keys: KeyStrategy | None = None,
        caller: str | None = None,
        header_names: HeaderNames = DEFAULT_HEADERS,
    ) -> None:
        self.run = run
        self.key_meta = key_meta
        self.keys = keys or run.keys
        self.caller = caller
        self.names = header_names

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers[self.names.task] = self.run.run_id
        if self.caller is not None:
            request.headers[self.names.caller] = self.caller
        yield self.stamped(request)

    def stamped(self, request: httpx.Request) -> httpx.Request:
        """``request``, with the operation key added if it is a ``tools/call`` without one."""
        if request.method != "POST":
            return request
        try:
            message = loads(request.content)  # as the proxy reads it: integers of any size exactly
        except ValueError:
            return request
        params = message.get("params") if isinstance(message, dict) else None
        if not isinstance(message, dict) or message.get("method") != "tools/call" or not isinstance(params, dict):
            return request
        name = params.get("name")
        arguments = params.get("arguments") or {}
        meta = params.setdefault("_meta", {})
        if not isinstance(name, str) or not isinstance(arguments, dict) or not isinstance(meta, dict):
            return request  # malformed: the proxy answers it
        if self.key_meta in meta:
            return request
        call = ToolCall(run_id=self.run.run_id, tool=name, arguments=arguments)
        meta[self.key_meta] = checked_key(self.keys(call), call)
        headers = [(key, value) for key, value in request.headers.multi_items() if key.lower() != "content-length"]
        return httpx.Request(
            request.method, request.url, headers=headers, content=dumps(message), extensions=request.extensions
        )
