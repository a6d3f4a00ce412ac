"""The operation context: which operation the tool code running right now belongs to.

An adapter opens one ``Operation`` per tool call (``AgentRun.operation``) in a
context variable; HTTP helpers read it to stamp ``Idempotency-Key`` and
``X-Agent-Task`` on what the tool sends. Context variables follow tasks and
``asyncio.to_thread``, but not ``loop.run_in_executor``: the adapters run
synchronous tools with ``asyncio.to_thread`` for that reason.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from idemproxy.adapters.errors import InvalidOperationKey, NoOperation
from idemproxy.adapters.keys import KeyStrategy, ToolCall, checked_key, key_from_arguments
from idemproxy.protocol import HeaderNames
from idemproxy.protocol.keys import MAX_KEY_LENGTH, fingerprint

#: Methods that never go through the ledger by default; they carry the task header only.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
DEFAULT_HEADERS = HeaderNames()

_CURRENT: ContextVar[Operation | None] = ContextVar("idemproxy_operation", default=None)


class Operation:
    """The operation of one tool call, current while the tool runs.

    A tool may send several side-effecting requests in one call (create, then
    comment). The first distinct request carries the operation key, the n-th
    distinct one ``{key}/{n}``; a request sent again (a tool's own retry) gets
    its earlier key back. The order is deterministic for a tool that sends its
    requests one after another, so a re-executed call reuses every key.
    """

    __slots__ = ("_lock", "_requests", "call", "key", "operation_ids")

    def __init__(self, call: ToolCall, key: str) -> None:
        self.call = call
        self.key = key
        #: Operation ids the proxy reported for this call's requests, in order.
        self.operation_ids: list[str] = []
        self._requests: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def run_id(self) -> str:
        return self.call.run_id

    @property
    def tool(self) -> str:
        return self.call.tool

    @property
    def call_id(self) -> str | None:
        return self.call.call_id

    def key_for(self, method: str, url: str, body: bytes = b"", content_type: str | None = None) -> str:
        """The idempotency key of one request this tool call sends."""
        parts = urlsplit(url)
        headers = {"Content-Type": content_type} if content_type else {}
        identity = fingerprint(method, f"{parts.scheme}://{parts.netloc}{parts.path}", parts.query, headers, (), body)
        with self._lock:
            key = self._requests.get(identity)
            if key is None:
                ordinal = len(self._requests) + 1
                key = self.key if ordinal == 1 else f"{self.key}/{ordinal}"
                if len(key) > MAX_KEY_LENGTH:
                    raise InvalidOperationKey(
                        f"Tool {self.tool!r} sent its request #{ordinal}, whose key {key[:40]!r}... "
                        f"exceeds {MAX_KEY_LENGTH} characters; use a shorter key strategy."
                    )
                self._requests[identity] = key
        return key

    def headers(
        self,
        method: str,
        url: str,
        body: bytes = b"",
        content_type: str | None = None,
        names: HeaderNames = DEFAULT_HEADERS,
    ) -> dict[str, str]:
        """The headers that tie one request to this operation."""
        headers = {names.task: self.run_id}
        if method.upper() not in SAFE_METHODS:
            headers[names.key] = self.key_for(method, url, body, content_type)
        return headers

    def observe(self, operation_id: str) -> None:
        """Remember an operation id the proxy reported (``Idempotency-Operation``)."""
        with self._lock:
            if operation_id not in self.operation_ids:
                self.operation_ids.append(operation_id)

    def __repr__(self) -> str:
        return f"Operation(tool={self.tool!r}, run_id={self.run_id!r}, call_id={self.call_id!r}, key={self.key!r})"


def new_run_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class AgentRun:
    """One run of an agent (a task): the scope in which a repeated tool call is a retry.

    Pass the run or task id your application already has, or let one be made
    and keep ``run_id`` so a restarted run can be given the same one: its
    re-issued calls then get the same keys, and the proxy answers them from its
    ledger instead of acting twice. ``run_id`` is also sent as the task header.
    """

    run_id: str = field(default_factory=new_run_id)
    keys: KeyStrategy = key_from_arguments

    def __post_init__(self) -> None:
        run_id = self.run_id
        if not run_id or len(run_id) > MAX_KEY_LENGTH or not (run_id.isascii() and run_id.isprintable()):
            raise InvalidOperationKey(
                f"run_id {run_id!r} is unusable: it must be 1 to {MAX_KEY_LENGTH} printable ASCII "
                "characters (it is sent as a header)."
            )

    @contextmanager
    def operation(
        self,
        tool: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        call_id: str | None = None,
        keys: KeyStrategy | None = None,
    ) -> Iterator[Operation]:
        """Make the operation of one tool call current for the code inside the block."""
        call = ToolCall(run_id=self.run_id, tool=tool, arguments=dict(arguments or {}), call_id=call_id)
        opened = Operation(call, checked_key((keys or self.keys)(call), call))
        token = _CURRENT.set(opened)
        try:
            yield opened
        finally:
            _CURRENT.reset(token)


def current_operation() -> Operation | None:
    """The operation of the tool call running in this context, if any."""
    return _CURRENT.get()


def operation_headers(
    method: str,
    url: str,
    body: bytes = b"",
    *,
    content_type: str | None = None,
    names: HeaderNames = DEFAULT_HEADERS,
) -> dict[str, str]:
    """The idempotency headers for a request, for any HTTP library.

    Raises ``NoOperation`` for a side-effecting method when no tool call is
    running in this context: sending it without a key would defeat the proxy.
    """
    opened = _CURRENT.get()
    if opened is None:
        if method.upper() in SAFE_METHODS:
            return {}
        raise NoOperation(
            f"{method.upper()} {url} was sent outside any tool-call operation. Run the tool through an "
            "idemproxy adapter (or inside AgentRun.operation(...)); a synchronous tool must run in "
            "asyncio.to_thread, because loop.run_in_executor does not carry the context."
        )
    return opened.headers(method, url, body, content_type, names)
