"""The admin API against its own OpenAPI description (``proxy/openapi/admin.yaml``), with
schemathesis: valid and invalid inputs for every operation, then stateful runs that follow the
description's links (list -> show -> resolve) through seeded operations.

Every response must conform to the description (status, content type, headers, body), no
response is a 5xx, invalid input is refused with a 4xx, and every error is problem+json.

The admin app is served from a thread of its own with its own event loop, on a real socket in
front of the session's redis-server: schemathesis calls it through ``requests``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from schemathesis import Case, CheckContext, Response

from idemproxy.app import build_admin_app
from idemproxy.config.settings import parse_config
from idemproxy.lifecycle.records import Evidence, OperationRecord, RetryClass, State, StoredResponse
from idemproxy.ops.admin import openapi_document
from idemproxy.protocol import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_PREFIX
from idemproxy.protocol.keys import Scope, operation_id
from idemproxy.store import Store, Transition, open_store
from idemproxy.wire.inbound import server_options
from tests.hostile.stack import serving
from tests.support.redis_server import RedisServer

#: One seeded operation per state an operator meets; the PENDING one's lease is long expired.
SEEDED = {
    state: Scope(caller="agent", route="tickets", key=f"seeded-{state.value.lower()}", task="task-1")
    for state in (State.NEEDS_ATTENTION, State.UNKNOWN, State.PENDING, State.COMPLETED, State.RELEASED)
}


async def seed(store: Store) -> None:
    """The seeded operations, each updated at a time of its own: a listing (most recently
    updated first) is in one order every time, so the links' data is the same every run."""
    for number, (state, scope) in enumerate(SEEDED.items()):
        now = int(time.time() * 1000) - number * 1000
        pending = OperationRecord(
            op_id=operation_id(scope),
            scope=scope,
            state=State.PENDING,
            fence=1,
            fingerprint="f" * 64,
            attempt=1,
            owner="seed",
            lease_until_ms=now - 60_000,
            method="POST",
            target=f"/tickets?n={number}",
            created_ms=now - 120_000,
            updated_ms=now - 120_000,
            attempt_ms=now - 120_000,
        )
        assert await store.reserve(pending, Evidence(now, "reserved")) is None
        if state is State.PENDING:
            continue
        response = None
        if state is State.COMPLETED:
            body = b'{"id": 42}'
            response = StoredResponse(201, (("Content-Type", "application/json"),), body, len(body), "0" * 64)
        retry = RetryClass.AMBIGUOUS_STATUS if state in (State.UNKNOWN, State.NEEDS_ATTENTION) else None
        new = pending.evolve(state=state, fence=2, response=response, retry_class=retry, updated_ms=now)
        changed = Transition(new, 1, frozenset({State.PENDING}), Evidence(now, "seeded"), ttl_s=3600)
        assert await store.transition(changed) is None


def described_with_seeds() -> dict[str, Any]:
    """The shipped description, with the seeded operations as examples of an operation id, so
    that show and resolve reach real records too."""
    document = openapi_document()
    parameters = document["components"]["parameters"]
    examples = {f"seeded-{state.value.lower()}": {"value": operation_id(scope)} for state, scope in SEEDED.items()}
    with_examples = {name: {**parameter, "examples": examples} for name, parameter in parameters.items()}
    return {**document, "components": {**document["components"], "parameters": with_examples}}


class AdminThread:
    """The admin app on a loopback port, served by an event loop in a thread of its own."""

    def __init__(self, store_url: str) -> None:
        self.store_url = store_url
        self.url = ""
        self.store: Store | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="hostile-admin", daemon=True)

    def __enter__(self) -> AdminThread:
        self._thread.start()
        if not self._ready.wait(30) or self._failure is not None:
            raise RuntimeError("the admin app did not start") from self._failure
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def reseed(self, redis_server: RedisServer) -> None:
        """Back to the seeded operations only (the tests resolve them)."""
        assert self.store is not None
        redis_server.flush()
        asyncio.run_coroutine_threadsafe(seed(self.store), self._loop).result(30)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._failure = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        config = parse_config(
            {"store": self.store_url, "routes": [{"prefix": "/tickets", "upstream": "http://127.0.0.1:9"}]}
        )
        self.store = store = open_store(config.store)
        await store.start()
        try:
            await seed(store)
            options = server_options(config.client_header_timeout_s)
            async with serving(build_admin_app(store, config), **options) as self.url:
                self._ready.set()
                await self._stop.wait()
        finally:
            await store.close()


@pytest.fixture(scope="module")
def admin(redis_server: RedisServer) -> Iterator[AdminThread]:
    redis_server.flush()
    with AdminThread(redis_server.url) as running:
        yield running


schema = schemathesis.openapi.from_dict(
    described_with_seeds(),
    config=schemathesis.Config.from_dict(
        {
            "seed": 8,
            "generation": {"mode": "all", "max-examples": 25, "deterministic": True, "database": "none"},
        }
    ),
)


def errors_are_problems(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    """Every 4xx and 5xx is problem+json, with a type of its own and the response's status."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])[0].split(";", 1)[0]
    assert content_type == PROBLEM_CONTENT_TYPE, f"{response.status_code} answered as {content_type!r}"
    body = response.json()
    assert str(body["type"]).startswith(PROBLEM_TYPE_PREFIX), body
    assert body["status"] == response.status_code, body
    return True


@schema.parametrize()
@hypothesis.settings(deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
def test_admin_api_conforms_to_its_description(case: Case[Any], admin: AdminThread) -> None:
    case.call_and_validate(base_url=admin.url, additional_checks=[errors_are_problems])


def test_admin_api_stateful_links(admin: AdminThread, redis_server: RedisServer) -> None:
    """list -> show / resolve on the operations a list returns (the description's links)."""
    admin.reseed(redis_server)

    class Checked(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            # Every scenario starts from the same ledger: a resolve in one must not change what
            # the next one's links draw from (hypothesis replays scenarios and expects that).
            admin.reseed(redis_server)

        def get_call_kwargs(self, case: Case[Any]) -> dict[str, Any]:
            return {"base_url": admin.url}

        def validate_response(self, response: Response, case: Case[Any], **kwargs: Any) -> None:
            case.validate_response(response, additional_checks=[errors_are_problems])

    Checked.run(
        settings=hypothesis.settings(
            max_examples=15,
            stateful_step_count=6,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
    )


def test_the_description_is_served_and_is_the_shipped_one(admin: AdminThread) -> None:
    response = requests.get(f"{admin.url}/_idem/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.json() == openapi_document()


@pytest.mark.parametrize(
    "query",
    [
        pytest.param({"limit": "\u00b2"}, id="superscript-limit"),  # "²".isdigit(): once a 500
        pytest.param({"limit": "9" * 5000}, id="limit-of-5000-digits"),
        pytest.param({"older_than": "9" * 400}, id="older-than-infinite"),  # once a 500
        pytest.param({"older_than": "1" * 33}, id="older-than-too-long"),
        pytest.param({"older_than": "\u0661s"}, id="older-than-arabic-indic-digit"),
    ],
)
def test_list_query_values_that_do_not_parse_are_400(admin: AdminThread, query: dict[str, str]) -> None:
    response = requests.get(f"{admin.url}/_idem/ops", params=query, timeout=10)
    assert response.status_code == 400, response.text
    assert response.headers["Content-Type"] == PROBLEM_CONTENT_TYPE
    assert response.json()["type"] == f"{PROBLEM_TYPE_PREFIX}invalid-query"


def test_an_age_beyond_the_epoch_lists_nothing(admin: AdminThread) -> None:
    response = requests.get(f"{admin.url}/_idem/ops", params={"older_than": "9" * 30 + "d"}, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json() == {"operations": []}


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/nope", 404), ("DELETE", "/_idem/ops", 405)])
def test_unknown_paths_and_methods_are_problems(admin: AdminThread, method: str, path: str, status: int) -> None:
    response = requests.request(method, f"{admin.url}{path}", timeout=10)
    assert response.status_code == status
    assert response.headers["Content-Type"] == PROBLEM_CONTENT_TYPE
    if status == 405:
        assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD"}
