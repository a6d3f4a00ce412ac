"""AutoGen (``autogen-agentchat`` / ``autogen-ext`` 0.7): every tool call gets its operation.

- ``IdempotentTool`` / ``idempotent_tools``: wrap ``FunctionTool``s (or plain
  functions, or any ``BaseTool``) for ``AssistantAgent(tools=...)``;
- ``IdempotentWorkbench``: wrap any ``Workbench``;
- ``IdempotentHttpTool``: ``autogen_ext.tools.http.HttpTool`` that sends
  through the proxy with a per-call key over one pooled session;
- ``idempotent_mcp_params``: ``StreamableHttpServerParams`` for an
  ``McpWorkbench`` whose every ``tools/call`` carries its operation key in
  ``params._meta`` (the proxy's MCP route mode).

AutoGen runs a synchronous ``FunctionTool`` with ``loop.run_in_executor``,
which does not carry context variables; ``IdempotentTool`` runs it with
``asyncio.to_thread`` instead, so the operation reaches the tool's thread.
Install with ``pip install 'idemproxy[autogen]'``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Self

import aiohttp
import orjson

try:
    from autogen_core import CancellationToken
    from autogen_core.tools import BaseTool, FunctionTool, StaticWorkbench, ToolResult, ToolSchema, Workbench
    from autogen_ext.tools.http import HttpTool
    from autogen_ext.tools.http._http_tool import HttpToolConfig  # exported nowhere else
    from autogen_ext.tools.mcp import StreamableHttpServerParams
    from pydantic import BaseModel, Field, field_serializer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"idemproxy.adapters.autogen needs AutoGen: pip install 'idemproxy[autogen]' ({exc})") from exc

from idemproxy.adapters.client import ProxyClient
from idemproxy.adapters.context import AgentRun
from idemproxy.adapters.keys import KeyStrategy
from idemproxy.adapters.mcp import McpOperationKeys
from idemproxy.protocol import DEFAULT_KEY_META

__all__ = [
    "IdempotentHttpTool",
    "IdempotentHttpToolConfig",
    "IdempotentTool",
    "IdempotentWorkbench",
    "idempotent_mcp_params",
    "idempotent_tools",
]

ToolLike = BaseTool[Any, Any] | Callable[..., Any]


def _sync_function(tool: BaseTool[Any, Any]) -> Callable[..., Any] | None:
    """The function of a ``FunctionTool`` that AutoGen would hand to ``run_in_executor``."""
    if not isinstance(tool, FunctionTool):
        return None
    func: Callable[..., Any] = tool._func  # FunctionTool keeps no public handle on its function
    return None if inspect.iscoroutinefunction(func) else func


class IdempotentTool(BaseTool[BaseModel, BaseModel]):
    """A tool whose every call runs inside its own operation (``AgentRun.operation``).

    Same name, description and schema as the wrapped tool, so the model sees
    no difference. ``keys`` overrides the run's key strategy for this tool.
    """

    def __init__(self, tool: ToolLike, run: AgentRun, *, keys: KeyStrategy | None = None) -> None:
        if not isinstance(tool, BaseTool):
            # What AssistantAgent does with a plain function.
            tool = FunctionTool(tool, description=tool.__doc__ or "")
        self.tool = tool
        self.run_scope = run
        self.keys = keys
        self._sync = _sync_function(tool)
        super().__init__(
            tool.args_type(), tool.return_type(), tool.name, tool.description, tool.schema.get("strict", False)
        )

    @property
    def schema(self) -> ToolSchema:
        return self.tool.schema

    def return_value_as_string(self, value: Any) -> str:
        return self.tool.return_value_as_string(value)

    def state_type(self) -> type[BaseModel] | None:
        return self.tool.state_type()

    async def save_state_json(self) -> Mapping[str, Any]:
        return await self.tool.save_state_json()

    async def load_state_json(self, state: Mapping[str, Any]) -> None:
        await self.tool.load_state_json(state)

    async def run_json(
        self, args: Mapping[str, Any], cancellation_token: CancellationToken, call_id: str | None = None
    ) -> Any:
        with self.run_scope.operation(self.name, args, call_id=call_id, keys=self.keys):
            if self._sync is not None:
                return await super().run_json(args, cancellation_token, call_id=call_id)
            return await self.tool.run_json(args, cancellation_token, call_id=call_id)

    async def run(self, args: BaseModel, cancellation_token: CancellationToken) -> Any:
        if self._sync is None:
            return await self.tool.run(args, cancellation_token)
        # FunctionTool.run's argument binding, with asyncio.to_thread in place of
        # run_in_executor so the operation's context reaches the function.
        parameters = inspect.signature(self._sync).parameters
        kwargs = {name: getattr(args, name) for name in parameters if hasattr(args, name)}
        if "cancellation_token" in parameters:
            kwargs["cancellation_token"] = cancellation_token
        return await asyncio.to_thread(functools.partial(self._sync, **kwargs))


def idempotent_tools(
    tools: Sequence[ToolLike], run: AgentRun, *, keys: KeyStrategy | None = None
) -> list[BaseTool[Any, Any]]:
    """``tools`` wrapped for ``AssistantAgent(tools=...)`` or a ``StaticWorkbench``."""
    return [IdempotentTool(tool, run, keys=keys) for tool in tools]


class IdempotentWorkbench(Workbench):
    """A workbench whose every ``call_tool`` runs inside its own operation.

    Tools running in the caller's task see the operation (async tools, HTTP
    calls made by the workbench itself). An ``McpWorkbench`` calls its server
    from a task of its own, where the operation is not seen: give it
    ``idempotent_mcp_params(...)`` instead. A ``StaticWorkbench`` holding a
    synchronous ``FunctionTool`` is refused: AutoGen runs that function with
    ``run_in_executor``, where the operation would be lost; build the
    workbench from ``idempotent_tools(...)`` instead.
    """

    def __init__(self, workbench: Workbench, run: AgentRun, *, keys: KeyStrategy | None = None) -> None:
        if isinstance(workbench, StaticWorkbench):
            for tool in workbench._tools:  # StaticWorkbench has no public list of its tools
                if _sync_function(tool) is not None:
                    raise TypeError(
                        f"Tool {tool.name!r} is a synchronous FunctionTool, which AutoGen runs in "
                        "run_in_executor where the operation context is lost. Build the workbench as "
                        "StaticWorkbench(idempotent_tools(tools, run)) instead."
                    )
        self.workbench = workbench
        self.run_scope = run
        self.keys = keys

    async def list_tools(self) -> list[ToolSchema]:
        return await self.workbench.list_tools()

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        cancellation_token: CancellationToken | None = None,
        call_id: str | None = None,
    ) -> ToolResult:
        with self.run_scope.operation(name, arguments, call_id=call_id, keys=self.keys):
            return await self.workbench.call_tool(name, arguments, cancellation_token, call_id)

    async def start(self) -> None:
        await self.workbench.start()

    async def stop(self) -> None:
        await self.workbench.stop()

    async def reset(self) -> None:
        await self.workbench.reset()

    async def save_state(self) -> Mapping[str, Any]:
        return await self.workbench.save_state()

    async def load_state(self, state: Mapping[str, Any]) -> None:
        await self.workbench.load_state(state)


class IdempotentHttpToolConfig(HttpToolConfig):
    # HttpToolConfig requires both, yet dump_component drops them when None, so a plain
    # HttpTool without headers cannot be loaded back from its own config.
    description: str | None = None
    headers: dict[str, Any] | None = None
    run_id: str | None = None
    """The run the tool's calls belong to; a tool loaded from this config resumes it."""
    caller: str | None = None
    """Sent as the caller header (``X-Idem-Caller``)."""


class IdempotentHttpTool(HttpTool):
    """``HttpTool`` pointed at idemproxy: each call carries its operation's key.

    ``scheme``, ``host`` and ``port`` are the proxy's listener; ``path``,
    ``method``, ``json_schema`` and ``return_type`` mean what they mean for
    ``HttpTool``. Unlike ``HttpTool``, requests share one pooled session
    (``session``, or one of the tool's own: close it with ``await tool.close()``),
    and an answer that is idemproxy's own problem (``outcome-unknown``, ...)
    raises ``ProxyProblem``, which the agent reports to the model as a tool
    error. The dumped component config includes ``run_id``, so a tool loaded
    from it after a restart continues the same run.
    """

    component_provider_override = "idemproxy.adapters.autogen.IdempotentHttpTool"
    component_config_schema = IdempotentHttpToolConfig

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        json_schema: dict[str, Any],
        headers: dict[str, Any] | None = None,
        description: str = "HTTP tool",
        path: str = "/",
        scheme: Literal["http", "https"] = "http",
        method: Literal["GET", "POST", "PUT", "DELETE", "PATCH"] = "POST",
        return_type: Literal["text", "json"] = "text",
        timeout: float = 30.0,
        *,
        run: AgentRun | None = None,
        keys: KeyStrategy | None = None,
        caller: str | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        super().__init__(
            name=name,
            host=host,
            port=port,
            json_schema=json_schema,
            headers=headers,
            description=description,
            path=path,
            scheme=scheme,
            method=method,
            return_type=return_type,
            timeout=timeout,
        )
        self.run_scope = run or AgentRun()
        self.keys = keys
        self.server_params = IdempotentHttpToolConfig(
            **self.server_params.model_dump(), run_id=self.run_scope.run_id, caller=caller
        )
        self.client = ProxyClient(f"{scheme}://{host}:{port}", caller=caller, timeout=timeout, session=session)

    @classmethod
    def _from_config(cls, config: HttpToolConfig) -> Self:
        fields = {name: value for name, value in config.model_dump().items() if value is not None}
        run_id = fields.pop("run_id", None)
        return cls(**fields, run=AgentRun(run_id) if run_id else None)

    async def close(self) -> None:
        await self.client.close()

    def return_value_as_string(self, value: Any) -> str:
        # HttpTool would show the model a Python repr of a JSON answer.
        if isinstance(value, dict | list):
            return orjson.dumps(value).decode()
        return super().return_value_as_string(value)

    async def run_json(
        self, args: Mapping[str, Any], cancellation_token: CancellationToken, call_id: str | None = None
    ) -> Any:
        with self.run_scope.operation(self.name, args, call_id=call_id, keys=self.keys):
            return await super().run_json(args, cancellation_token, call_id=call_id)

    async def run(self, args: BaseModel, cancellation_token: CancellationToken) -> Any:
        params = self.server_params
        values = args.model_dump()
        path = params.path.format(**{name: values.pop(name) for name in self._path_params})
        headers = {name: str(value) for name, value in (params.headers or {}).items()}
        method = params.method or "POST"
        if method in ("GET", "DELETE"):
            query = {name: _query_value(value) for name, value in values.items()}
            response = await self.client.request(method, path, params=query, headers=headers)
        else:
            response = await self.client.request(method, path, json=values, headers=headers)
        if params.return_type == "json":
            return response.json()
        return response.text()


def _query_value(value: Any) -> str:
    # As httpx encodes query parameters for HttpTool.
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class _KeyedStreamableHttpServerParams(StreamableHttpServerParams):
    # AutoGen passes every field of the params to the mcp SDK's streamablehttp_client,
    # which takes an httpx ``auth``; a component config keeps it as null.
    auth: Any = Field(default=None)

    @field_serializer("auth", when_used="json")
    def _auth_is_not_config(self, value: Any) -> None:
        return None


def idempotent_mcp_params(
    params: StreamableHttpServerParams,
    run: AgentRun,
    *,
    key_meta: str = DEFAULT_KEY_META,
    keys: KeyStrategy | None = None,
    caller: str | None = None,
) -> StreamableHttpServerParams:
    """``params`` (whose ``url`` is the proxy's MCP endpoint) for an ``McpWorkbench`` that
    sends each ``tools/call`` with its operation key in ``params._meta[key_meta]``.

    The key is derived by ``run``'s key strategy (or ``keys``) from the run, the tool
    and its arguments, and every request carries the run as ``X-Agent-Task``. The
    workbench calls tools from a task of its own, so the key travels with the request
    itself (``McpOperationKeys``), not with the caller's context. A workbench loaded
    from a dumped component config calls tools without keys.
    """
    if not isinstance(params, StreamableHttpServerParams):
        raise TypeError(
            f"idemproxy records MCP tool calls over Streamable HTTP only, got {type(params).__name__}; "
            "use StreamableHttpServerParams with the proxy's MCP endpoint as url."
        )
    auth = McpOperationKeys(run, key_meta=key_meta, keys=keys, caller=caller)
    return _KeyedStreamableHttpServerParams(**params.model_dump(exclude={"type", "auth"}), auth=auth)
