"""``idemproxy ops show|resolve`` with a shortened id, and what ``show`` tells the operator who
must decide: the request as it was forwarded (credentials redacted), the tool's answer, the
evidence, and the exact commands that settle it (issue 24, item 1)."""

from __future__ import annotations

from idemproxy.lifecycle.records import State, StoredRequest
from tests.support.ops_cli import Setup, assert_one_line_error
from tests.support.records import make_record, reserved

TWINS = ("abcdef01" + "0" * 24, "abcdef02" + "0" * 24)


async def seed(setup: Setup, op_id: str, request: StoredRequest | None = None) -> None:
    record = make_record(op_id).evolve(request=request)
    assert await setup.store.reserve(record, reserved(record)) is None


async def test_show_and_resolve_take_a_unique_prefix(setup: Setup) -> None:
    op_id = await setup.needs_attention("k-prefix")

    shown = await setup.ops("show", op_id[:8])
    resolved = await setup.ops("resolve", op_id[:8], "--not-done", "--reason", "checked the tool")

    assert shown.code == 0, shown.err
    assert shown.out.splitlines()[0].split() == ["operation", op_id]
    assert resolved.code == 0, resolved.err
    assert resolved.out.strip() == f"resolved: {op_id} is now RELEASED"
    record = await setup.store.get(op_id)
    assert record is not None
    assert record.state is State.RELEASED


async def test_a_prefix_two_operations_share_is_refused_with_both(setup: Setup) -> None:
    for op_id in TWINS:
        await seed(setup, op_id)

    run = await setup.ops("show", "abcdef")
    resolving = await setup.ops("resolve", "abcdef", "--not-done")

    assert_one_line_error(run, "400", "2 operation ids start with 'abcdef'", TWINS[0], TWINS[1])
    assert_one_line_error(resolving, "400", "give more of the id")
    for op_id in TWINS:
        record = await setup.store.get(op_id)
        assert record is not None
        assert record.state is State.PENDING
    assert (await setup.ops("show", "abcdef02")).code == 0


async def test_a_prefix_nothing_starts_with_is_a_404(setup: Setup) -> None:
    assert_one_line_error(await setup.ops("show", "fedcba98"), "404", "No operation id starts with 'fedcba98'")


async def test_show_prints_the_forwarded_request_with_credentials_redacted(setup: Setup) -> None:
    op_id = "5eed" + "0" * 28
    sent = StoredRequest(
        headers=(("Authorization", "Bearer s3cret-token"), ("Cookie", "session=s3cret"), ("X-Trace", "trace-1")),
        body=b'{"amount": 5}',
    )
    await seed(setup, op_id, sent)

    run = await setup.ops("show", op_id)

    assert run.code == 0, run.err
    assert "s3cret" not in run.out
    request = run.out.split("request as forwarded (credentials redacted):\n", 1)[1].split("\n\n")
    assert request[0].splitlines() == [
        "  POST /tickets?project=ops",
        "  Authorization: [redacted]",
        "  Cookie: [redacted]",
        "  X-Trace: trace-1",
    ]
    assert request[1].strip() == '{"amount": 5}'
    assert f"idemproxy ops resolve {op_id} --done --status STATUS --body @ANSWER.json --reason" in run.out
    assert f"idemproxy ops resolve {op_id} --not-done --reason" in run.out


async def test_show_prints_the_tools_answer_and_no_resolve_command_once_settled(setup: Setup) -> None:
    op_id = await setup.needs_attention("k-answered")
    done = await setup.ops("resolve", op_id, "--done", "--status", "201", "--body", '{"id": 7}')
    assert done.code == 0, done.err

    run = await setup.ops("show", op_id)

    answer = run.out.split("the tool's answer:\n", 1)[1].split("\nnext:", 1)[0]
    assert answer.splitlines()[0] == "  201"
    assert '{"id":7}' in answer.replace(" ", "")
    assert "to resolve it" not in run.out
