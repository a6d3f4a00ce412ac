"""CAMEL (``camel-ai`` 0.2): every tool call gets its operation.

- ``IdempotentFunctionTool``: a ``FunctionTool`` whose every call runs inside
  its own operation (``AgentRun.operation``);
- ``IdempotentChatAgent``: a ``ChatAgent`` that wraps its tools so, and passes
  the model's tool-call id through for tracing and ``key_from_call_id``;
- ``IdempotentMCPClient``: an ``MCPClient`` (Streamable HTTP, pointed at the
  proxy's MCP endpoint) whose every ``tools/call`` carries its operation key in
  ``params._meta``, so the tools it (or an ``MCPToolkit``) makes keep theirs too.

``ChatAgent.astep`` runs a synchronous tool with ``loop.run_in_executor``,
which does not carry context variables; ``IdempotentFunctionTool.async_call``
runs it with ``asyncio.to_thread`` instead, so the operation reaches the
tool's thread. Install with ``pip install 'idemproxy[camel]'``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import Any

try:
    import httpx
    from camel.agents import ChatAgent
    from camel.agents._types import ToolCallRequest
    from camel.toolkits import FunctionTool
    from camel.types.agents import ToolCallingRecord
    from camel.utils.mcp_client import MCPClient, ServerConfig, TransportType
    from mcp.client import streamable_http
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"idemproxy.adapters.camel needs CAMEL: pip install 'idemproxy[camel]' ({exc})") from exc

from idemproxy.adapters.context import AgentRun, Operation
from idemproxy.adapters.keys import KeyStrategy
from idemproxy.adapters.mcp import McpOperationKeys
from idemproxy.protocol import DEFAULT_KEY_META

__all__ = ["IdempotentChatAgent", "IdempotentFunctionTool", "IdempotentMCPClient", "idempotent_tools"]

#: The tool-call id of the call ChatAgent is executing, set by IdempotentChatAgent.
_CALL_ID: ContextVar[str | None] = ContextVar("idemproxy_camel_call_id", default=None)

ToolLike = FunctionTool | Callable[..., Any]


class IdempotentFunctionTool(FunctionTool):
    """A ``FunctionTool`` whose every call runs inside its own operation.

    Takes a function or a ``FunctionTool`` (whose schema it keeps, so the model
    sees no difference). ``keys`` overrides the run's key strategy for this tool.
    """

    def __init__(self, tool: ToolLike, run: AgentRun, *, keys: KeyStrategy | None = None) -> None:
        if isinstance(tool, FunctionTool):
            super().__init__(tool.func, openai_tool_schema=tool.get_openai_tool_schema())
        else:
            super().__init__(tool)
        self.run_scope = run
        self.keys = keys

    @contextmanager
    def _operation(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[Operation]:
        arguments = kwargs
        if args:  # ChatAgent passes keywords; a direct call may not
            arguments = dict(inspect.signature(self.func).bind_partial(*args, **kwargs).arguments)
        with self.run_scope.operation(
            self.get_function_name(), arguments, call_id=_CALL_ID.get(), keys=self.keys
        ) as opened:
            yield opened

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._operation(args, kwargs):
            return super().__call__(*args, **kwargs)

    async def async_call(self, *args: Any, **kwargs: Any) -> Any:
        with self._operation(args, kwargs):
            if inspect.iscoroutinefunction(self.func):
                return await super().async_call(*args, **kwargs)
            # FunctionTool.async_call would use run_in_executor and lose the operation.
            result = await asyncio.to_thread(functools.partial(super().__call__, *args, **kwargs))
            if inspect.iscoroutine(result):  # a sync wrapper around an async function
                return await result
            return result


def idempotent_tools(
    tools: Sequence[ToolLike], run: AgentRun, *, keys: KeyStrategy | None = None
) -> list[FunctionTool]:
    """``tools`` wrapped for ``ChatAgent(tools=...)``; tools already wrapped are kept."""
    return [
        tool if isinstance(tool, IdempotentFunctionTool) else IdempotentFunctionTool(tool, run, keys=keys)
        for tool in tools
    ]


class IdempotentChatAgent(ChatAgent):
    """A ``ChatAgent`` whose tool calls each run inside their own operation.

    Takes ``ChatAgent``'s arguments (by keyword after ``model``) plus ``run``
    (a new ``AgentRun`` if omitted: keep ``agent.run_scope.run_id`` to resume
    the run after a restart) and ``keys``. Tools given to the constructor or to
    ``add_tool`` are wrapped in ``IdempotentFunctionTool``.
    """

    def __init__(
        self,
        system_message: Any = None,
        model: Any = None,
        *,
        run: AgentRun | None = None,
        keys: KeyStrategy | None = None,
        tools: Sequence[ToolLike] | None = None,
        **kwargs: Any,
    ) -> None:
        self.run_scope = run or AgentRun()
        self.keys = keys
        wrapped: list[ToolLike] = [*idempotent_tools(tools or (), self.run_scope, keys=keys)]
        super().__init__(system_message, model, tools=wrapped, **kwargs)

    def add_tool(self, tool: ToolLike) -> None:
        super().add_tool(idempotent_tools([tool], self.run_scope, keys=self.keys)[0])

    # Each path on which ChatAgent executes a tool call, with the call id made visible
    # to the tool (it runs in this thread or task, or is handed the context).

    def _execute_tool(self, tool_call_request: ToolCallRequest) -> ToolCallingRecord:
        with _call_id(tool_call_request.tool_call_id):
            record: ToolCallingRecord = super()._execute_tool(tool_call_request)  # @observe() erases the type
            return record

    async def _aexecute_tool(self, tool_call_request: ToolCallRequest) -> ToolCallingRecord:
        with _call_id(tool_call_request.tool_call_id):
            return await super()._aexecute_tool(tool_call_request)

    def _execute_tool_from_stream_data(self, tool_call_data: dict[str, Any]) -> ToolCallingRecord | None:
        with _call_id(tool_call_data.get("id")):
            return super()._execute_tool_from_stream_data(tool_call_data)

    async def _aexecute_tool_from_stream_data(self, tool_call_data: dict[str, Any]) -> ToolCallingRecord | None:
        with _call_id(tool_call_data.get("id")):
            return await super()._aexecute_tool_from_stream_data(tool_call_data)


@contextmanager
def _call_id(call_id: str | None) -> Iterator[None]:
    token = _CALL_ID.set(call_id)
    try:
        yield
    finally:
        _CALL_ID.reset(token)


class IdempotentMCPClient(MCPClient):
    """An ``MCPClient`` whose every ``tools/call`` carries its operation key in ``params._meta``.

    Takes ``MCPClient``'s arguments; ``config`` (a ``ServerConfig`` or its dict)
    names the proxy's MCP endpoint as ``url``. The key is derived by ``run``'s key
    strategy (or ``keys``) from the run, the tool and its arguments, on the HTTP
    request itself (``McpOperationKeys``), so it does not matter which task or
    thread CAMEL calls a tool from. Only Streamable HTTP is used: CAMEL's
    fallback to the old HTTP+SSE transport, whose answers arrive on another
    stream, is refused.
    """

    def __init__(
        self,
        config: ServerConfig | dict[str, Any],
        run: AgentRun | None = None,
        *,
        key_meta: str = DEFAULT_KEY_META,
        keys: KeyStrategy | None = None,
        caller: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config, **kwargs)
        if self.config.transport_type is not TransportType.STREAMABLE_HTTP:
            raise ValueError(
                f"idemproxy records MCP tool calls over Streamable HTTP only; this config uses "
                f"{self.config.transport_type.value}. Give the proxy's MCP endpoint as url."
            )
        self.run_scope = run or AgentRun()
        self.operation_keys = McpOperationKeys(self.run_scope, key_meta=key_meta, keys=keys, caller=caller)

    @asynccontextmanager
    async def _create_transport(self, override_transport: TransportType | None = None) -> AsyncIterator[Any]:
        if (override_transport or self.config.transport_type) is not TransportType.STREAMABLE_HTTP:
            raise ConnectionError("idemproxy records MCP tool calls over Streamable HTTP only.")
        config = self.config
        assert config.url is not None
        auth, timeout = self.operation_keys, httpx.Timeout(config.timeout, read=config.sse_read_timeout)
        if not hasattr(streamable_http, "streamable_http_client"):  # older mcp 1.x
            async with streamable_http.streamablehttp_client(
                config.url,
                headers=config.headers,
                timeout=config.timeout,
                sse_read_timeout=config.sse_read_timeout,
                terminate_on_close=config.terminate_on_close,
                auth=auth,
            ) as streams:
                yield streams
            return
        async with (
            httpx.AsyncClient(headers=config.headers, timeout=timeout, auth=auth, follow_redirects=True) as http,
            streamable_http.streamable_http_client(
                config.url, http_client=http, terminate_on_close=config.terminate_on_close
            ) as streams,
        ):
            yield streams
