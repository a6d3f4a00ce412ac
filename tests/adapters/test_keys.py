"""The key derivation every adapter shares."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from idemproxy.adapters import (
    AgentRun,
    InvalidOperationKey,
    ToolCall,
    key_from_arguments,
    key_from_call_id,
    operation_key,
)
from idemproxy.protocol.keys import canonical_body, canonical_json, validate_key

ARGS = {"title": "disk full", "priority": 2, "tags": ["ops", "urgent"]}


def test_the_derivation_is_the_documented_formula() -> None:
    material = canonical_json(["run-1", "create_ticket", ARGS])
    assert operation_key("run-1", "create_ticket", ARGS) == "op1-" + hashlib.sha256(material).hexdigest()


def test_canonical_json_is_the_proxy_body_canonical_form() -> None:
    body = b'{ "tags": ["ops", "urgent"], "title": "disk full",\n "priority": 2 }'
    assert canonical_json(ARGS) == canonical_body(body, "application/json")


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
        ({"nested": {"y": [1, 2], "x": None}}, {"nested": {"x": None, "y": [1, 2]}}),
        ({"big": 2**70}, {"big": 2**70}),
        ({"text": "café"}, {"text": "café"}),
    ],
)
def test_equal_arguments_in_any_order_give_one_key(first: dict[str, Any], second: dict[str, Any]) -> None:
    assert operation_key("run", "tool", first) == operation_key("run", "tool", second)


@pytest.mark.parametrize(
    ("run_id", "tool", "arguments"),
    [
        ("run-2", "create_ticket", ARGS),
        ("run-1", "close_ticket", ARGS),
        ("run-1", "create_ticket", {**ARGS, "priority": 3}),
        ("run-1", "create_ticket", {**ARGS, "priority": 2.0}),
        ("run-1", "create_ticket", {**ARGS, "tags": ["urgent", "ops"]}),
        ("run-1", "create_ticket", {"big": 2**70 + 1}),
    ],
)
def test_any_other_run_tool_or_argument_gives_another_key(run_id: str, tool: str, arguments: dict[str, Any]) -> None:
    assert operation_key(run_id, tool, arguments) != operation_key("run-1", "create_ticket", ARGS)


def test_derived_keys_are_valid_proxy_keys() -> None:
    key = operation_key("r" * 255, "t" * 1000, {"x": "y" * 10_000})
    assert validate_key(key) == key
    assert len(key) == 68


def test_the_call_id_is_not_part_of_the_default_key() -> None:
    first = ToolCall("run-1", "create_ticket", ARGS, call_id="call_1")
    reissued = ToolCall("run-1", "create_ticket", ARGS, call_id="call_9")
    assert key_from_arguments(first) == key_from_arguments(reissued)


def test_call_id_keys_follow_the_call_id_and_the_run() -> None:
    first = ToolCall("run-1", "create_ticket", ARGS, call_id="call_1")
    assert key_from_call_id(first) == key_from_call_id(ToolCall("run-1", "other", {}, call_id="call_1"))
    assert key_from_call_id(first) != key_from_call_id(ToolCall("run-1", "create_ticket", ARGS, call_id="call_2"))
    assert key_from_call_id(first) != key_from_call_id(ToolCall("run-2", "create_ticket", ARGS, call_id="call_1"))
    assert key_from_call_id(first) != key_from_arguments(first)


def test_call_id_keys_need_a_call_id() -> None:
    with pytest.raises(InvalidOperationKey, match="without a tool-call id"):
        key_from_call_id(ToolCall("run-1", "create_ticket", ARGS))


def test_arguments_that_are_not_json_are_refused_with_the_tool_named() -> None:
    with pytest.raises(InvalidOperationKey, match="'create_ticket'"):
        operation_key("run-1", "create_ticket", {"when": {1, 2}})


@pytest.mark.parametrize("bad", ["", "x" * 256, "tab\tkey", "clé", 42])
def test_a_custom_strategy_must_return_a_valid_key(run: AgentRun, bad: object) -> None:
    def strategy(call: ToolCall) -> Any:
        return bad

    with pytest.raises(InvalidOperationKey), run.operation("create_ticket", ARGS, keys=strategy):
        pass


def test_a_custom_strategy_is_used_as_given() -> None:
    custom = AgentRun("task-42", keys=lambda call: f"ticket-{call.arguments['title'].replace(' ', '-')}")
    with custom.operation("create_ticket", ARGS) as opened:
        assert opened.key == "ticket-disk-full"


@pytest.mark.parametrize("run_id", ["", "x" * 256, "run\n1", "rün"])
def test_unusable_run_ids_are_refused(run_id: str) -> None:
    with pytest.raises(InvalidOperationKey, match="run_id"):
        AgentRun(run_id)


def test_a_new_run_has_a_fresh_id_that_can_be_reused() -> None:
    first, second = AgentRun(), AgentRun()
    assert first.run_id != second.run_id
    resumed = AgentRun(first.run_id)
    with first.operation("t", ARGS) as before, resumed.operation("t", ARGS) as after:
        assert before.key == after.key
