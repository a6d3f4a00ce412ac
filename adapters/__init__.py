"""Client-side helpers that put agent frameworks' tool calls behind idemproxy.

This package imports no agent framework: the AutoGen and CAMEL adapters live
in ``idemproxy.adapters.autogen`` and ``idemproxy.adapters.camel`` (extras
``idemproxy[autogen]`` and ``idemproxy[camel]``), httpx support in
``idemproxy.adapters.httpx_auth``. See the README's "Agent frameworks".
"""

from __future__ import annotations

from idemproxy.adapters._session import ClientState
from idemproxy.adapters.client import ProxyClient, ProxyResponse
from idemproxy.adapters.context import (
    SAFE_METHODS,
    AgentRun,
    Operation,
    current_operation,
    new_run_id,
    operation_headers,
)
from idemproxy.adapters.errors import (
    AdapterError,
    InvalidOperationKey,
    NoOperation,
    OperationNotFound,
    ProxyConnectionError,
    ProxyProblem,
    ProxyTimeout,
    UnexpectedResponse,
)
from idemproxy.adapters.keys import (
    KEY_VERSION,
    KeyStrategy,
    ToolCall,
    key_from_arguments,
    key_from_call_id,
    operation_key,
)
from idemproxy.adapters.verifier import ObservedOperation, Verifier, expected_operation_id
from idemproxy.protocol import OPERATION_HEADER, REPLAYED_HEADER

__all__ = [
    "KEY_VERSION",
    "OPERATION_HEADER",
    "REPLAYED_HEADER",
    "SAFE_METHODS",
    "AdapterError",
    "AgentRun",
    "ClientState",
    "InvalidOperationKey",
    "KeyStrategy",
    "NoOperation",
    "ObservedOperation",
    "Operation",
    "OperationNotFound",
    "ProxyClient",
    "ProxyConnectionError",
    "ProxyProblem",
    "ProxyResponse",
    "ProxyTimeout",
    "ToolCall",
    "UnexpectedResponse",
    "Verifier",
    "current_operation",
    "expected_operation_id",
    "key_from_arguments",
    "key_from_call_id",
    "new_run_id",
    "operation_headers",
    "operation_key",
]
