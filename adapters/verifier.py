"""Reading an operation's state from the proxy, so a verifier reasons from observed state.

A verifier agent should not trust what a worker agent *says* it did; it asks
the ledger. ``Verifier.observe`` reads ``GET /_idem/ops/{op_id}`` on the
admin listener and returns the record; ``Verifier.check_operation`` is the same
as a tool for an agent (a sentence it can act on, never an exception).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from yarl import URL

from idemproxy.adapters._session import ManagedSession, SessionClient
from idemproxy.adapters.client import problem_of
from idemproxy.adapters.errors import (
    OperationNotFound,
    ProxyConnectionError,
    ProxyProblem,
    UnexpectedResponse,
    translate_client_errors,
)
from idemproxy.lifecycle.records import State
from idemproxy.protocol import ANONYMOUS
from idemproxy.protocol.keys import Scope, operation_id

OPS_PATH = "/_idem/ops"
_OP_ID = re.compile(r"[A-Za-z0-9._:-]{1,255}")
#: States whose outcome is established: the answer a retry gets will not change.
SETTLED_STATES = frozenset({State.COMPLETED, State.RELEASED})


def expected_operation_id(key: str, *, route: str, caller: str = ANONYMOUS) -> str:
    """The id the proxy files a request under: (caller, route name, key), as the proxy computes it."""
    return operation_id(Scope(caller=caller, route=route, key=key))


@dataclass(frozen=True, slots=True)
class ObservedOperation:
    """An operation record as the admin API returned it; ``record`` is the whole JSON."""

    op_id: str
    state: State
    attempt: int | None
    retry_class: str | None
    response_status: int | None
    next_step: str | None  # the proxy's own words for what moves the operation forward
    record: Mapping[str, Any] = field(repr=False)

    @property
    def settled(self) -> bool:
        return self.state in SETTLED_STATES

    @classmethod
    def from_record(cls, requested: str, record: Any) -> ObservedOperation:
        if not isinstance(record, dict) or not isinstance(record.get("state"), str):
            raise UnexpectedResponse(f"The admin API returned no operation record for {requested}: {record!r:.200}")
        try:
            state = State(record["state"])
        except ValueError as exc:
            raise UnexpectedResponse(f"Operation {requested} has an unknown state {record['state']!r}.") from exc
        response = record.get("response")
        status = response.get("status") if isinstance(response, dict) else None
        attempt = record.get("attempt")
        retry_class = record.get("retry_class")
        next_step = record.get("next")
        return cls(
            op_id=str(record.get("operation") or requested),
            state=state,
            attempt=attempt if isinstance(attempt, int) else None,
            retry_class=retry_class if isinstance(retry_class, str) else None,
            response_status=status if isinstance(status, int) else None,
            next_step=next_step if isinstance(next_step, str) else None,
            record=record,
        )

    def summary(self) -> str:
        """What the state means for whoever must decide the next step."""
        meaning = self._meaning()
        return f"{meaning} Proxy: {self.next_step}" if self.next_step else meaning

    def _meaning(self) -> str:
        attempt = f" after attempt {self.attempt}" if self.attempt is not None else ""
        match self.state:
            case State.COMPLETED:
                status = f" with status {self.response_status}" if self.response_status is not None else ""
                return (
                    f"Operation {self.op_id} is COMPLETED{attempt}: the tool answered{status}. "
                    "The effect must not be repeated; a retry with the same key gets the same answer."
                )
            case State.RELEASED:
                return (
                    f"Operation {self.op_id} is RELEASED{attempt}: the tool did not act "
                    f"({self.retry_class or 'not applied'}). Retrying with the same key is safe."
                )
            case State.PENDING:
                return (
                    f"Operation {self.op_id} is PENDING (attempt {self.attempt}): a request is in flight. "
                    "Wait and check again; do not send it under a new key."
                )
            case State.UNKNOWN:
                return (
                    f"Operation {self.op_id} is UNKNOWN{attempt} ({self.retry_class or 'no detail'}): the "
                    "request was sent but nobody knows whether it took effect. Do not retry blindly; "
                    "check the tool's own state or ask an operator to resolve it."
                )
            case State.NEEDS_ATTENTION:
                return (
                    f"Operation {self.op_id} NEEDS_ATTENTION{attempt}: its outcome could not be established "
                    "automatically. An operator must resolve it as done or not done."
                )
        raise AssertionError(f"no summary for {self.state}")


class Verifier(SessionClient):
    """Reads operation records from idemproxy's admin listener (``admin_url``).

    ``headers`` are sent with every request (for example ``Authorization`` for
    an admin identity). Lifecycle as ``ProxyClient``: opened on first use,
    closed once, never reopened.
    """

    def __init__(
        self,
        admin_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        url = URL(admin_url)
        if not url.is_absolute() or url.scheme not in ("http", "https"):
            raise ValueError(f"admin_url {admin_url!r} must be an absolute http(s) URL of the admin listener.")
        self.admin_url = str(url).rstrip("/")
        self._headers = dict(headers or {})
        self._session = ManagedSession("Verifier", timeout, session)

    async def observe(self, op_id: str) -> ObservedOperation:
        """The operation's record as the proxy holds it now.

        Raises ``OperationNotFound`` (404), ``ProxyProblem`` (the admin API's own
        problem, e.g. ``ledger-unavailable``), ``ProxyConnectionError`` and
        ``UnexpectedResponse``.
        """
        if not _OP_ID.fullmatch(op_id):
            raise ValueError(f"{op_id!r} is not an operation id.")
        session = await self._session.open()
        url = f"{self.admin_url}{OPS_PATH}/{op_id}"
        with translate_client_errors(f"idemproxy's admin API at {self.admin_url}"):
            async with session.get(url, headers=self._headers) as response:
                status, headers, body = response.status, response.headers, await response.read()
        if status == 404:
            raise OperationNotFound(f"idemproxy has no record of operation {op_id}.")
        if status != 200:
            problem = problem_of(status, headers, body)
            if problem is not None:
                raise problem
            raise UnexpectedResponse(f"The admin API answered {status} for operation {op_id}: {body[:200]!r}")
        try:
            record = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise UnexpectedResponse(f"The admin API's answer for {op_id} is not JSON: {body[:200]!r}") from exc
        return ObservedOperation.from_record(op_id, record)

    async def check_operation(self, operation_id: str) -> str:
        """Report the observed state of an operation at the idempotency proxy.

        Args:
            operation_id (str): The operation id the proxy returned in the
                Idempotency-Operation header of the tool call's response.

        Returns:
            str: The operation's state and what it means for the next step.
        """
        try:
            return (await self.observe(operation_id)).summary()
        except ValueError as exc:
            return f"{exc} Operation ids are the Idempotency-Operation values the proxy returned."
        except OperationNotFound:
            return (
                f"The proxy has no record of operation {operation_id}: no request with it reached the "
                "ledger (or its record expired after the route's retention)."
            )
        except (ProxyProblem, ProxyConnectionError, UnexpectedResponse) as exc:
            return f"The state of operation {operation_id} could not be read: {exc}"
