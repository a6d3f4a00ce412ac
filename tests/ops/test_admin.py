"""The ``/_idem/ops`` admin API, on both stores, driving records through the real proxy.

Two routes in front of one counting tool: ``a`` has no reconcile method (an
unknown outcome is escalated to NEEDS_ATTENTION by the first duplicate) and
``b`` probes a lookup that always fails (a duplicate leaves it UNKNOWN). The
proxy runs without its background reconciler, so records change only when a
test makes them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from typing import Any

import orjson
import pytest

from idemproxy.lifecycle.records import Evidence, OperationRecord, State
from idemproxy.protocol.keys import Scope
from tests.support.admin_ops import (
    Ops,
    kinds,
    problem,
)
from tests.support.records import op_id_for

# -- show -------------------------------------------------------------------------------------------


async def test_show_needs_attention_record(ops: Ops) -> None:
    before_ms = int(time.time() * 1000)
    op_id = await ops.needs_attention("k-na", task="task-7")
    view = await ops.show(op_id)

    assert view["operation"] == op_id
    assert (view["state"], view["route"], view["caller"], view["key"], view["task"]) == (
        "NEEDS_ATTENTION",
        "a",
        "anonymous",
        "k-na",
        "task-7",
    )
    assert (view["method"], view["target"]) == ("POST", "/a/reset")
    assert (view["attempt"], view["probes"], view["retry_class"], view["reconciled"]) == (
        1,
        0,
        "connection-lost",
        False,
    )
    assert view["fence"] == 2  # reserved with 1, bumped by the escalation's change of owner
    assert ":reconciler:" in view["owner"]
    assert view["lease_until_ms"] == 0
    assert len(view["fingerprint"]) == 64
    assert before_ms <= view["created_ms"] <= view["attempt_ms"] <= view["updated_ms"]
    assert view["response"] is None
    assert kinds(view) == ["reserved", "unknown", "escalated"]
    reserved, unknown, escalated = view["evidence"]
    assert (reserved["attempt"], unknown["failure"]) == (1, "connection-lost")
    assert escalated["reason"] == "no reconcile method configured"
    stamps = [entry["at_ms"] for entry in view["evidence"]]
    assert stamps == sorted(stamps)
    assert f"idemproxy ops resolve {op_id} --done|--not-done" in view["next"]
    assert "operator must resolve" in view["next"]


async def test_show_unknown_record_says_when_the_next_probe_runs(ops: Ops) -> None:
    op_id = await ops.unknown("k-u")
    view = await ops.show(op_id)
    assert (view["state"], view["route"], view["probes"], view["owner"]) == ("UNKNOWN", "b", 1, "")
    assert view["next_probe_ms"] > view["updated_ms"]
    assert kinds(view) == ["reserved", "unknown", "claimed", "probe"]
    assert view["evidence"][-1]["result"] == "unknown"
    assert view["evidence"][-1]["reason"] == "unexpected probe status 500"
    assert f"A probe runs at {view['next_probe_ms']} (ms)" in view["next"]
    assert f"idemproxy ops resolve {op_id}" in view["next"]


async def test_show_completed_record_with_inline_body(ops: Ops) -> None:
    op_id = await ops.completed("k-c")
    view = await ops.show(op_id)
    response = view["response"]
    assert view["state"] == "COMPLETED"
    assert view["retry_class"] is None
    assert kinds(view) == ["reserved", "completed"]
    assert response["status"] == 201
    assert response["headers"]["X-Tool"] == "items"
    assert response["stored"] is True
    assert orjson.loads(response["body"]) == {"effect": 1, "method": "POST", "body": '{"n": 1}'}
    assert response["size"] == len(response["body"].encode())
    assert response["sha256"] == hashlib.sha256(response["body"].encode()).hexdigest()
    assert view["next"].startswith("Final: duplicates get the stored answer")


async def test_show_large_body_by_size_and_hash_only(ops: Ops) -> None:
    op_id = await ops.completed("k-big", path="/a/big/20000")
    response = (await ops.show(op_id))["response"]
    assert (response["status"], response["size"], response["stored"]) == (200, 20000, True)
    assert response["sha256"] == hashlib.sha256(b"x" * 20000).hexdigest()
    assert "body" not in response
    assert "body_base64" not in response


async def test_show_pending_record_with_a_live_lease(ops: Ops) -> None:
    task = asyncio.ensure_future(ops.proxy.post("/a/gate", json={}, headers={"Idempotency-Key": "k-gate"}))
    try:
        await ops.upstream.arrived.wait()
        op_id = op_id_for("k-gate", route="a")
        view = await ops.show(op_id)
        assert view["state"] == "PENDING"
        assert view["owner"]
        assert view["lease_until_ms"] > int(time.time() * 1000)
        assert view["next"].startswith(f"Waiting for owner {view['owner']} to record the outcome of attempt 1")
        assert kinds(view) == ["reserved"]

        refused = await ops.resolve(op_id, {"outcome": "not_done", "by": "alice"})
        body = await problem(refused, 409, "invalid-transition")
        assert "live lease" in body["detail"]
        assert (await ops.record(op_id)).state is State.PENDING
    finally:
        ops.upstream.release.set()
        response = await task
    assert response.status == 201
    assert (await ops.show(op_id))["state"] == "COMPLETED"


async def test_show_unknown_operation_is_a_404_problem(ops: Ops) -> None:
    response = await ops.admin.get(f"/_idem/ops/{'0' * 32}")
    body = await problem(response, 404, "operation-not-found")
    assert "0" * 32 in body["detail"]


@pytest.mark.parametrize("op_id", ["not-an-operation", "ABCDEF0123456789ABCDEF0123456789"])
async def test_show_malformed_operation_id_is_a_404_problem(ops: Ops, op_id: str) -> None:
    # Every answer idemproxy gives itself is problem+json (README), including ids that
    # cannot be operation ids at all.
    response = await ops.admin.get(f"/_idem/ops/{op_id}")
    await problem(response, 404)


async def test_resolve_unknown_operation_is_a_404_problem(ops: Ops) -> None:
    response = await ops.resolve("f" * 32, {"outcome": "not_done"})
    await problem(response, 404, "operation-not-found")


# -- list -------------------------------------------------------------------------------------------


async def test_list_by_state(ops: Ops) -> None:
    attention = await ops.needs_attention("k-1")
    unknown = await ops.unknown("k-2")
    completed = await ops.completed("k-3")

    assert await ops.listed(state="NEEDS_ATTENTION") == [attention]
    assert await ops.listed(state="UNKNOWN") == [unknown]
    assert await ops.listed(state="COMPLETED") == [completed]
    assert await ops.listed(state="needs_attention") == [attention]
    assert await ops.listed(state="RELEASED") == []
    assert await ops.listed(state="PENDING") == []
    assert set(await ops.listed()) == {attention, unknown, completed}


async def test_list_rows_are_summaries(ops: Ops) -> None:
    op_id = await ops.needs_attention("k-row", task="t-row")
    (row,) = await ops.listing(state="NEEDS_ATTENTION")
    assert row["operation"] == op_id
    assert (row["state"], row["route"], row["caller"], row["task"]) == ("NEEDS_ATTENTION", "a", "anonymous", "t-row")
    assert (row["method"], row["target"], row["attempt"], row["retry_class"]) == (
        "POST",
        "/a/reset",
        1,
        "connection-lost",
    )
    assert "evidence" not in row
    assert "response" not in row


async def test_list_by_route(ops: Ops) -> None:
    in_a = await ops.needs_attention("k-a")
    in_b = await ops.unknown("k-b")
    completed_b = await ops.completed("k-b2", path="/b/items")
    assert await ops.listed(route="a") == [in_a]
    assert set(await ops.listed(route="b")) == {in_b, completed_b}
    assert await ops.listed(route="b", state="UNKNOWN") == [in_b]
    assert await ops.listed(route="nope") == []


async def test_list_by_task(ops: Ops) -> None:
    first = await ops.needs_attention("k-t1", task="task-1")
    second = await ops.needs_attention("k-t2", task="task-2")
    done = await ops.completed("k-t3", task="task-1")
    untasked = await ops.needs_attention("k-t4")
    assert set(await ops.listed(task="task-1")) == {first, done}
    assert await ops.listed(task="task-2") == [second]
    assert await ops.listed(task="task-1", state="NEEDS_ATTENTION") == [first]
    assert await ops.listed(task="task-3") == []
    assert untasked in await ops.listed(state="NEEDS_ATTENTION")


async def test_list_older_than(ops: Ops) -> None:
    now = int(time.time() * 1000)
    two_hours_ago = now - 2 * 3600 * 1000
    stale = OperationRecord(
        op_id="5" * 32,
        scope=Scope(caller="anonymous", route="a", key="k-stale"),
        state=State.PENDING,
        fence=1,
        fingerprint="f" * 64,
        attempt=1,
        owner="instance-that-died:1",
        lease_until_ms=two_hours_ago + 60_000,
        method="POST",
        target="/a/items",
        created_ms=two_hours_ago,
        updated_ms=two_hours_ago,
        attempt_ms=two_hours_ago,
    )
    assert await ops.store.reserve(stale, Evidence(two_hours_ago, "reserved", {"attempt": 1})) is None
    fresh = await ops.needs_attention("k-fresh")

    assert await ops.listed(older_than="1h") == [stale.op_id]
    assert await ops.listed(older_than="1h", state="PENDING") == [stale.op_id]
    assert await ops.listed(older_than="90m", state="NEEDS_ATTENTION") == []
    assert await ops.listed(older_than="3h") == []
    assert await ops.listed(older_than="1d", state="PENDING") == []
    assert set(await ops.listed()) == {stale.op_id, fresh}
    (row,) = await ops.listing(state="PENDING")
    assert row["updated_ms"] == two_hours_ago


async def test_list_limit_and_order(ops: Ops) -> None:
    created = [await ops.completed(f"k-l{n}") for n in range(4)]
    limited = await ops.listing(state="COMPLETED", limit="2")
    everything = await ops.listing(state="COMPLETED", limit="1000")
    assert len(limited) == 2
    assert {op["operation"] for op in everything} == set(created)
    assert {op["operation"] for op in limited} <= set(created)
    stamps = [op["updated_ms"] for op in everything]
    assert stamps == sorted(stamps, reverse=True)  # most recently updated first
    assert len(await ops.listing(limit="1")) == 1


@pytest.mark.parametrize(
    ("params", "named"),
    [
        pytest.param({"state": "DONE"}, "'state'", id="state"),
        pytest.param({"state": ""}, "'state'", id="state-empty"),
        pytest.param({"limit": "0"}, "'limit'", id="limit-zero"),
        pytest.param({"limit": "1001"}, "'limit'", id="limit-too-big"),
        pytest.param({"limit": "ten"}, "'limit'", id="limit-word"),
        pytest.param({"limit": "-1"}, "'limit'", id="limit-negative"),
        pytest.param({"older_than": "yesterday"}, "'older_than'", id="older-than"),
        pytest.param({"older_than": "-5m"}, "'older_than'", id="older-than-negative"),
        pytest.param({"sate": "UNKNOWN"}, "sate", id="unknown-parameter"),
    ],
)
async def test_list_bad_query_is_a_400_problem_naming_the_parameter(
    ops: Ops, params: dict[str, str], named: str
) -> None:
    response = await ops.admin.get("/_idem/ops", params=params)
    body = await problem(response, 400)
    assert named in body["detail"]


# -- resolve: done ----------------------------------------------------------------------------------

RESOLUTION = {
    "outcome": "done",
    "response": {"status": 201, "headers": {"X-Resolved": "yes"}, "body": {"id": 7}},
    "by": "alice",
    "reason": "checked the tool: ticket 7 exists",
}


async def test_resolve_done_then_the_duplicate_gets_exactly_that_response(ops: Ops) -> None:
    op_id = await ops.needs_attention("k-done")
    assert ops.upstream.count() == 1

    resolved = await ops.resolve(op_id, RESOLUTION)
    assert resolved.status == 200
    answer = await resolved.json()
    assert (answer["operation"], answer["state"], answer["reconciled"]) == (op_id, "COMPLETED", True)

    view = await ops.show(op_id)
    assert (view["state"], view["reconciled"], view["attempt"]) == ("COMPLETED", True, 1)
    assert kinds(view) == ["reserved", "unknown", "escalated", "resolved"]
    entry = view["evidence"][-1]
    assert (entry["outcome"], entry["by"], entry["reason"], entry["status"]) == (
        "done",
        "alice",
        "checked the tool: ticket 7 exists",
        201,
    )
    assert view["response"]["status"] == 201
    assert view["response"]["body"] == '{"id":7}'
    assert view["next"].startswith("Final:")
    assert answer["evidence"] == view["evidence"]

    duplicate = await ops.send("/a/reset", "k-done")
    assert duplicate.status == 201
    assert await duplicate.read() == b'{"id":7}'
    assert duplicate.headers["Idempotent-Replayed"] == "true"
    assert duplicate.headers["Idempotent-Reconciled"] == "true"
    assert duplicate.headers["X-Resolved"] == "yes"
    assert duplicate.headers["Content-Type"] == "application/json"
    assert duplicate.headers["Idempotency-Operation"] == op_id
    assert ops.upstream.count() == 1  # no new effect

    assert await ops.listed(state="NEEDS_ATTENTION") == []
    assert await ops.listed(state="COMPLETED") == [op_id]


async def test_resolve_done_on_an_unknown_record(ops: Ops) -> None:
    op_id = await ops.unknown("k-unk")
    resolved = await ops.resolve(op_id, {**RESOLUTION, "response": {"status": 200, "body": "plain text"}})
    assert resolved.status == 200
    duplicate = await ops.send("/b/reset", "k-unk")
    assert (duplicate.status, await duplicate.read()) == (200, b"plain text")
    assert duplicate.headers["Idempotent-Reconciled"] == "true"
    assert ops.upstream.count() == 1
    assert await ops.listed(state="UNKNOWN") == []


async def test_resolve_done_with_base64_body_and_no_by(ops: Ops) -> None:
    op_id = await ops.needs_attention("k-b64")
    raw = bytes(range(256))
    resolved = await ops.resolve(
        op_id,
        {
            "outcome": "done",
            "response": {
                "status": 200,
                "headers": {"Content-Type": "application/octet-stream"},
                "body_base64": base64.b64encode(raw).decode(),
            },
        },
    )
    assert resolved.status == 200
    view = await ops.show(op_id)
    assert view["evidence"][-1]["by"] == "unknown"
    assert view["response"]["body_base64"] == base64.b64encode(raw).decode()
    assert "body" not in view["response"]
    duplicate = await ops.send("/a/reset", "k-b64")
    assert await duplicate.read() == raw
    assert duplicate.headers["Content-Type"] == "application/octet-stream"


async def test_resolve_done_with_an_empty_body(ops: Ops) -> None:
    op_id = await ops.needs_attention("k-204")
    assert (await ops.resolve(op_id, {"outcome": "done", "response": {"status": 204}})).status == 200
    duplicate = await ops.send("/a/reset", "k-204")
    assert duplicate.status == 204
    assert await duplicate.read() == b""


async def test_resolved_headers_override_the_json_default_whatever_their_case(ops: Ops) -> None:
    op_id = await ops.needs_attention("k-ct")
    payload = {"outcome": "done", "response": {"status": 200, "headers": {"content-type": "text/csv"}, "body": [1]}}
    assert (await ops.resolve(op_id, payload)).status == 200
    duplicate = await ops.send("/a/reset", "k-ct")
    assert duplicate.headers.getall("Content-Type") == ["text/csv"]


async def test_resolution_framing_headers_never_corrupt_the_replay(ops: Ops) -> None:
    # The proxy never stores Content-Length or Transfer-Encoding from the tool (they are
    # recomputed per response); an operator's resolution must either be refused or have them
    # dropped, never replayed as a malformed response.
    op_id = await ops.needs_attention("k-framing")
    headers = {"Content-Length": "3", "Transfer-Encoding": "chunked", "X-Resolved": "yes"}
    resolved = await ops.resolve(
        op_id, {"outcome": "done", "response": {"status": 201, "headers": headers, "body": {"id": 7}}}
    )
    if resolved.status == 400:
        await problem(resolved, 400, "invalid-resolution")
        assert (await ops.record(op_id)).state is State.NEEDS_ATTENTION
        return
    assert resolved.status == 200
    duplicate = await ops.send("/a/reset", "k-framing")
    assert (duplicate.status, await duplicate.read()) == (201, b'{"id":7}')
    assert duplicate.headers["X-Resolved"] == "yes"


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "nul\x00"])
async def test_resolution_header_with_control_characters_is_refused(ops: Ops, value: str) -> None:
    # Such a header can never be sent: accepting it would make every duplicate a dropped
    # connection, forever.
    op_id = await ops.needs_attention("k-crlf")
    payload = {"outcome": "done", "response": {"status": 200, "headers": {"X-Note": value}, "body": "ok"}}
    await problem(await ops.resolve(op_id, payload), 400, "invalid-resolution")
    assert (await ops.record(op_id)).state is State.NEEDS_ATTENTION


# -- resolve: not done --------------------------------------------------------------------------------


async def test_resolve_not_done_forwards_the_duplicate_as_attempt_two(ops: Ops) -> None:
    op_id = await ops.needs_attention("k-nd")
    assert ops.upstream.count() == 1

    resolved = await ops.resolve(op_id, {"outcome": "not_done", "by": "bob", "reason": "no ticket at the tool"})
    assert resolved.status == 200
    view = await ops.show(op_id)
    assert (view["state"], view["attempt"], view["response"]) == ("RELEASED", 1, None)
    entry = view["evidence"][-1]
    assert (entry["kind"], entry["outcome"], entry["by"], entry["reason"]) == (
        "resolved",
        "not_done",
        "bob",
        "no ticket at the tool",
    )
    assert "forwarded as attempt 2 of 5" in view["next"]

    retry = await ops.send("/a/reset", "k-nd")  # forwarded again: this tool loses the answer again
    assert retry.status == 502
    assert ops.upstream.count() == 2
    assert ops.upstream.effects[-1].headers["Idempotency-Key"] == "k-nd"
    record = await ops.record(op_id)
    assert (record.attempt, record.state) == (2, State.UNKNOWN)
    assert [e.kind for e in record.evidence][-2:] == ["reserved", "unknown"]
    assert record.evidence[-2].detail["attempt"] == 2


async def test_resolve_not_done_moves_an_unknown_record_out_of_the_unresolved_index(ops: Ops) -> None:
    op_id = await ops.unknown("k-nd2")
    assert (await ops.resolve(op_id, {"outcome": "not_done"})).status == 200
    assert await ops.listed(state="RELEASED") == [op_id]
    assert await ops.listed(state="UNKNOWN") == []


# -- resolve: refused ---------------------------------------------------------------------------------


async def test_resolving_a_completed_operation_is_an_invalid_transition(ops: Ops) -> None:
    op_id = await ops.completed("k-done-already")
    before = await ops.record(op_id)
    for payload in (RESOLUTION, {"outcome": "not_done", "by": "mallory"}):
        body = await problem(await ops.resolve(op_id, payload), 409, "invalid-transition")
        assert (body["operation"], body["state"]) == (op_id, "COMPLETED")
    assert await ops.record(op_id) == before
    replay = await ops.send("/a/items", "k-done-already")
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Reconciled" not in replay.headers


async def test_resolving_twice_is_an_invalid_transition(ops: Ops) -> None:
    op_id = await ops.needs_attention("k-twice")
    assert (await ops.resolve(op_id, {"outcome": "not_done"})).status == 200
    body = await problem(await ops.resolve(op_id, RESOLUTION), 409, "invalid-transition")
    assert body["state"] == "RELEASED"
    assert (await ops.record(op_id)).state is State.RELEASED


BAD_RESOLUTIONS = [
    pytest.param(b"outcome=done", id="not-json"),
    pytest.param(b"", id="empty-body"),
    pytest.param(b'["done"]', id="json-array"),
    pytest.param({"by": "alice"}, id="outcome-missing"),
    pytest.param({"outcome": "maybe"}, id="outcome-invalid"),
    pytest.param({"outcome": "DONE", "response": {"status": 200}}, id="outcome-wrong-case"),
    pytest.param({"outcome": "done"}, id="done-without-response"),
    pytest.param({"outcome": "done", "response": None}, id="done-null-response"),
    pytest.param({"outcome": "done", "response": "ok"}, id="response-not-object"),
    pytest.param({"outcome": "not_done", "response": {"status": 200}}, id="not-done-with-response"),
    pytest.param({"outcome": "done", "response": {"body": "x"}}, id="status-missing"),
    pytest.param({"outcome": "done", "response": {"status": 199}}, id="status-too-low"),
    pytest.param({"outcome": "done", "response": {"status": 600}}, id="status-too-high"),
    pytest.param({"outcome": "done", "response": {"status": "201"}}, id="status-string"),
    pytest.param({"outcome": "done", "response": {"status": True}}, id="status-bool"),
    pytest.param({"outcome": "done", "response": {"status": 201.5}}, id="status-fraction"),  # 201.0 is 201 in JSON
    pytest.param({"outcome": "done", "response": {"status": 200, "body_base64": "not base64!"}}, id="bad-base64"),
    pytest.param({"outcome": "done", "response": {"status": 200, "body_base64": "abc"}}, id="base64-bad-padding"),
    pytest.param({"outcome": "done", "response": {"status": 200, "body_base64": 12}}, id="base64-not-string"),
    pytest.param({"outcome": "done", "response": {"status": 200, "headers": {"X": 1}}}, id="header-not-string"),
    pytest.param({"outcome": "done", "response": {"status": 200, "headers": ["X: 1"]}}, id="headers-list"),
    pytest.param({"outcome": "not_done", "by": 5}, id="by-not-string"),
    pytest.param({"outcome": "not_done", "reason": ["x"]}, id="reason-not-string"),
]


@pytest.mark.parametrize("payload", BAD_RESOLUTIONS)
async def test_bad_resolution_is_a_400_and_leaves_the_record_unchanged(ops: Ops, payload: Any) -> None:
    op_id = await ops.needs_attention("k-bad")
    before = await ops.record(op_id)
    body = await problem(await ops.resolve(op_id, payload), 400, "invalid-resolution")
    assert body["detail"]
    assert await ops.record(op_id) == before
    still = await ops.send("/a/reset", "k-bad")
    await problem(still, 409, "needs-attention")
    assert ops.upstream.count() == 1
