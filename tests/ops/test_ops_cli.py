"""``idemproxy ops list|show|resolve``: the real CLI, as a subprocess, against a real admin listener.

The admin app is served by aiohttp's TestServer on a loopback port; the CLI runs
through ``asyncio.create_subprocess_exec`` so the event loop keeps serving the
API while the blocking CLI talks to it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from idemproxy.lifecycle.records import State
from tests.support.ops_cli import Setup, assert_one_line_error, idemproxy_ops
from tests.support.records import op_id_for
from tests.support.redis_server import free_port

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


# -- list -------------------------------------------------------------------------------------------


async def test_list_prints_a_table(setup: Setup) -> None:
    op_id = await setup.needs_attention("k-list", task="task-9")
    run = await setup.ops("list", "--state", "NEEDS_ATTENTION")
    assert run.code == 0, run.err
    header, *rows = run.out.splitlines()
    assert header.split() == [
        "OPERATION",
        "STATE",
        "ROUTE",
        "TASK",
        "REQUEST",
        "ATTEMPT",
        "PROBES",
        "RETRY",
        "CLASS",
        "UPDATED",
    ]
    assert len(rows) == 1
    cells = rows[0].split()
    assert cells[:8] == [op_id, "NEEDS_ATTENTION", "root", "task-9", "POST", "/reset", "1", "0"]
    assert cells[8] == "connection-lost"
    assert rows[0].endswith("ago")


async def test_list_filters_and_says_when_nothing_matches(setup: Setup) -> None:
    await setup.needs_attention("k-f", task="t-1")
    assert (await setup.ops("list", "--state", "COMPLETED")).out.strip() == "no operations match"
    assert (await setup.ops("list", "--task", "t-2")).out.strip() == "no operations match"
    assert (await setup.ops("list", "--older-than", "1h")).out.strip() == "no operations match"
    assert op_id_for("k-f") in (await setup.ops("list", "--task", "t-1", "--route", "root")).out


async def test_list_json(setup: Setup) -> None:
    first = await setup.needs_attention("k-j1")
    second = await setup.needs_attention("k-j2")
    run = await setup.ops("--json", "list", "--state", "needs_attention", "--limit", "5")
    assert run.code == 0, run.err
    data = orjson.loads(run.out)
    assert {op["operation"] for op in data["operations"]} == {first, second}
    assert all(op["state"] == "NEEDS_ATTENTION" for op in data["operations"])
    limited = orjson.loads((await setup.ops("--json", "list", "--limit", "1")).out)
    assert len(limited["operations"]) == 1


async def test_list_bad_filter_is_a_one_line_error(setup: Setup) -> None:
    assert_one_line_error(await setup.ops("list", "--state", "FINISHED"), "400", "'state'")


# -- show -------------------------------------------------------------------------------------------


async def test_show_prints_fields_next_and_evidence(setup: Setup) -> None:
    op_id = await setup.needs_attention("k-show", task="t-show")
    run = await setup.ops("show", op_id)
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    fields = {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in lines[:11]}
    assert fields["operation"] == op_id
    assert fields["state"] == "NEEDS_ATTENTION"
    assert fields["route"] == "root"
    assert fields["caller"] == "anonymous"
    assert fields["key"] == "k-show"
    assert fields["task"] == "t-show"
    assert fields["request"] == "POST /reset"
    assert fields["attempt"] == "1"
    assert fields["retry class"] == "connection-lost"
    assert fields["owner"].endswith("(fence 2)")
    assert fields["probes"] == "0"
    assert (
        f"next: Nothing automatic will change it: an operator must resolve it: idemproxy ops resolve {op_id}" in run.out
    )
    evidence = run.out.split("evidence:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.split()[2] for line in evidence] == ["reserved", "unknown", "escalated"]
    assert all(line.startswith("  ") and line.split()[1].endswith("Z") for line in evidence)
    assert "no reconcile method configured" in evidence[2]


async def test_show_json(setup: Setup) -> None:
    op_id = await setup.needs_attention("k-sj")
    data = orjson.loads((await setup.ops("--json", "show", op_id)).out)
    assert (data["operation"], data["state"], data["fence"]) == (op_id, "NEEDS_ATTENTION", 2)
    assert [entry["kind"] for entry in data["evidence"]] == ["reserved", "unknown", "escalated"]


# -- resolve ----------------------------------------------------------------------------------------


async def test_resolve_done_then_show_says_completed(setup: Setup) -> None:
    op_id = await setup.needs_attention("k-done")
    run = await setup.ops(
        "resolve",
        op_id,
        "--done",
        "--status",
        "201",
        "--body",
        '{"id": 7}',
        "--by",
        "alice",
        "--reason",
        "probe-was-down",
    )
    assert run.code == 0, run.err
    assert run.out.strip() == f"resolved: {op_id} is now COMPLETED"

    shown = await setup.ops("show", op_id)
    assert "COMPLETED (reconciled)" in shown.out
    assert "201, 8 bytes, sha256 " in shown.out
    assert "next: Final: duplicates get the stored answer" in shown.out
    resolved_line = shown.out.splitlines()[-1]
    assert resolved_line.split()[2] == "resolved"
    detail = orjson.loads(resolved_line.split("resolved", 1)[1])
    assert detail == {"outcome": "done", "by": "alice", "reason": "probe-was-down", "status": 201}

    duplicate = await setup.proxy.post("/reset", json={"n": 1}, headers={"Idempotency-Key": "k-done"})
    assert (duplicate.status, await duplicate.read()) == (201, b'{"id":7}')
    assert duplicate.headers["Idempotent-Reconciled"] == "true"
    assert setup.upstream.count() == 1


async def test_resolve_done_with_headers_and_a_body_file(setup: Setup, tmp_path: Path) -> None:
    op_id = await setup.needs_attention("k-file")
    body_file = tmp_path / "body.txt"
    body_file.write_text("ticket 42 exists, not JSON")
    run = await setup.ops(
        "--json", "resolve", op_id, "--done", "--body", f"@{body_file}", "--header", "X-Ticket: 42", "--by", "carol"
    )
    assert run.code == 0, run.err
    data = orjson.loads(run.out)
    assert data["state"] == "COMPLETED"
    assert data["response"]["status"] == 200  # --status defaults to 200
    assert data["response"]["body"] == "ticket 42 exists, not JSON"
    assert data["response"]["headers"] == {"X-Ticket": "42"}
    assert data["evidence"][-1]["by"] == "carol"


async def test_resolve_not_done(setup: Setup) -> None:
    op_id = await setup.needs_attention("k-nd")
    run = await setup.ops("resolve", op_id, "--not-done", "--by", "bob", "--reason", "no ticket")
    assert run.code == 0, run.err
    assert run.out.strip() == f"resolved: {op_id} is now RELEASED"
    record = await setup.store.get(op_id)
    assert record is not None
    assert record.state is State.RELEASED
    assert record.evidence[-1].detail == {"outcome": "not_done", "by": "bob", "reason": "no ticket"}
    shown = await setup.ops("show", op_id)
    assert "forwarded as attempt 2 of 5" in shown.out


# -- errors -----------------------------------------------------------------------------------------


async def test_unknown_operation_is_a_one_line_404(setup: Setup) -> None:
    missing = "0" * 32
    assert_one_line_error(await setup.ops("show", missing), "404", "No such operation", missing)
    assert_one_line_error(await setup.ops("resolve", missing, "--not-done"), "404", "No such operation")


@pytest.mark.parametrize("op_id", ["not-an-id", "ABCDEF0123456789ABCDEF0123456789", "0" * 5, "0" * 33])
async def test_invalid_operation_id_is_a_one_line_error(setup: Setup, op_id: str) -> None:
    assert_one_line_error(await setup.ops("show", op_id), "is not an operation id", "32 hex characters")


async def test_unreachable_admin_url_is_a_one_line_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert_one_line_error(await idemproxy_ops(url, "list"), f"cannot reach the admin API at {url}", "--admin")


async def test_not_done_with_a_status_is_refused_before_anything_is_sent(setup: Setup) -> None:
    op_id = await setup.needs_attention("k-nds")
    assert_one_line_error(
        await setup.ops("resolve", op_id, "--not-done", "--status", "200"),
        "--status, --body and --header go with --done",
    )
    record = await setup.store.get(op_id)
    assert record is not None
    assert record.state is State.NEEDS_ATTENTION


async def test_resolving_a_completed_operation_is_a_one_line_409(setup: Setup) -> None:
    response = await setup.proxy.post("/items", json={}, headers={"Idempotency-Key": "k-c"})
    op_id = response.headers["Idempotency-Operation"]
    run = await setup.ops("resolve", op_id, "--done", "--body", "{}")
    assert_one_line_error(run, "409", "COMPLETED")


async def test_bad_header_argument_is_a_one_line_error(setup: Setup) -> None:
    op_id = await setup.needs_attention("k-h")
    assert_one_line_error(
        await setup.ops("resolve", op_id, "--done", "--header", "no-colon"), "--header takes NAME:VALUE"
    )
