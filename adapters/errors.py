"""Every error the adapters raise.

The tree is shallow, and each class also inherits the built-in it behaves like::

    AdapterError
    ├── NoOperation (RuntimeError)          a side-effecting request outside any tool call
    ├── InvalidOperationKey (ValueError)    a key strategy produced an unusable key or run id
    ├── ProxyProblem                        idemproxy answered with one of its problem+json types
    ├── ProxyConnectionError (ConnectionError)
    │   └── ProxyTimeout (TimeoutError)     sent, no answer in time: retry with the same key
    ├── OperationNotFound (LookupError)     the admin API has no record of the operation
    └── UnexpectedResponse                  the admin API answered something that is not a record

aiohttp's errors are translated into these in one place, ``translate_client_errors``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import aiohttp

from idemproxy.protocol import PROBLEM_TYPE_PREFIX


class AdapterError(Exception):
    """Base class of every error raised by ``idemproxy.adapters``."""


class NoOperation(AdapterError, RuntimeError):
    """A side-effecting request was made while no tool-call operation was open."""


class InvalidOperationKey(AdapterError, ValueError):
    """A key strategy returned a key the proxy would refuse, or a run id is unusable."""


class ProxyProblem(AdapterError):
    """idemproxy refused or could not complete the call, and said why (RFC 9457).

    ``slug`` is the part of the problem ``type`` after ``urn:idemproxy:problem:``
    (``outcome-unknown``, ``operation-in-flight``, ...); ``operation`` and
    ``state`` are there whenever the proxy knows the operation.
    """

    def __init__(self, status: int, problem: Mapping[str, Any]) -> None:
        self.status = status
        self.problem = dict(problem)
        self.type = str(problem.get("type", ""))
        self.slug = self.type.removeprefix(PROBLEM_TYPE_PREFIX)
        self.detail = str(problem.get("detail", ""))
        operation = problem.get("operation")
        state = problem.get("state")
        self.operation: str | None = operation if isinstance(operation, str) else None
        self.state: str | None = state if isinstance(state, str) else None
        where = f" (operation {self.operation}, {self.state})" if self.operation else ""
        super().__init__(f"idemproxy answered {status} {self.slug}{where}: {self.detail}")


class ProxyConnectionError(AdapterError, ConnectionError):
    """The proxy (or its admin listener) could not be reached, or the connection failed.

    A request refused at connect time was never sent; after a lost connection the
    outcome is unknown. Either way, retrying with the same key is safe: that is
    what the key is for.
    """


class ProxyTimeout(ProxyConnectionError, TimeoutError):
    """The proxy did not answer in time; retry with the same key to learn the outcome."""


class OperationNotFound(AdapterError, LookupError):
    """The admin API has no record of this operation id."""


class UnexpectedResponse(AdapterError):
    """The admin API answered with something that is not an operation record."""


@contextmanager
def translate_client_errors(what: str) -> Iterator[None]:
    """aiohttp's connection errors, as the adapters' own; ``what`` names the peer."""
    try:
        yield
    except TimeoutError as exc:  # aiohttp's timeouts are TimeoutErrors too
        raise ProxyTimeout(f"{what} did not answer in time.") from exc
    except aiohttp.ClientConnectorError as exc:
        raise ProxyConnectionError(f"{what} is unreachable: {exc}") from exc
    except aiohttp.ClientError as exc:
        raise ProxyConnectionError(f"The connection to {what} failed: {type(exc).__name__}: {exc}") from exc
