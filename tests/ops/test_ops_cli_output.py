"""``idemproxy ops -o json|table``: the output switch, before or after the verb (``--json`` stays)."""

from __future__ import annotations

import orjson
import pytest

from tests.support.ops_cli import Setup

pytestmark = pytest.mark.usefixtures("setup")


@pytest.mark.parametrize(
    "args",
    [("-o", "json", "show", "{op}"), ("show", "{op}", "--output", "json"), ("show", "{op}", "--json")],
    ids=["before-the-verb", "after-the-verb", "json-flag"],
)
async def test_json_output_is_the_apis_json(setup: Setup, args: tuple[str, ...]) -> None:
    op_id = await setup.needs_attention("k-output")

    run = await setup.ops(*(arg.format(op=op_id) for arg in args))

    assert run.code == 0, run.err
    assert orjson.loads(run.out)["operation"] == op_id


async def test_table_output_is_the_default_and_can_be_asked_for(setup: Setup) -> None:
    op_id = await setup.needs_attention("k-table")

    default = await setup.ops("list")
    asked = await setup.ops("list", "-o", "table")

    assert default.code == asked.code == 0
    assert (
        [line.split()[:-2] for line in default.out.splitlines()[1:]]
        == [  # all but the age
            line.split()[:-2] for line in asked.out.splitlines()[1:]
        ]
    )
    assert default.out.splitlines()[0].split()[:2] == ["OPERATION", "STATE"]
    assert op_id in default.out
