"""``idemproxy.config.budgets``: rates, the top-level ``budgets``, an identity's own
``budgets``, and how ``check-config`` names every bad key."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from idemproxy.config.auth import AuthConfigError, load_identities_file
from idemproxy.config.budgets import (
    UNLIMITED,
    BudgetConfig,
    BudgetOverride,
    CallerBudget,
    Rate,
    parse_rate,
)
from idemproxy.config.settings import ConfigError, parse_config
from tests.support.auth import token_hash

ROUTES = [{"prefix": "/", "name": "tools", "upstream": "http://127.0.0.1:9000"}]


def budgets_of(raw: Any) -> BudgetConfig:
    return parse_config({"routes": ROUTES, "budgets": raw}).budgets


def problems_of(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config({"routes": ROUTES, **raw})
    return caught.value.problems


def identity(**fields: Any) -> dict[str, Any]:
    return {"name": "executor", "tokens": [token_hash("t-0123456789")], **fields}


# -- rates ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("100/1m", Rate(100, 60.0)),
        ("1/500ms", Rate(1, 0.5)),
        (" 3 / 2h ", Rate(3, 7200.0)),
        ("500/1d", Rate(500, 86400.0)),
        ("100000/30", Rate(100_000, 30.0)),  # a bare number is seconds, as everywhere
    ],
)
def test_rates_are_limit_per_window(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("100", "expected 'LIMIT/WINDOW' such as '100/1m'"),
        (100, "expected 'LIMIT/WINDOW' such as '100/1m' (at most LIMIT calls in any sliding WINDOW), got int 100"),
        ("ten/1m", "expected 'LIMIT/WINDOW'"),
        ("-1/1m", "expected 'LIMIT/WINDOW'"),
        ("0/1m", "the limit must be from 1 to 100000, got 0 in '0/1m'"),
        ("100001/1d", "the limit must be from 1 to 100000"),
        ("5/soon", "'soon' is not a duration"),
        ("5/0s", "the window must be at least 1ms, got '0s' in '5/0s'"),
        (None, "got nothing"),
    ],
)
def test_bad_rates_say_what_was_expected(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=r"expected|must") as caught:
        parse_rate(value)
    assert message in str(caught.value)


# -- the top-level section -------------------------------------------------------------------------


def test_top_level_budgets_are_read() -> None:
    budgets = budgets_of({"identity": {"calls": "100/1m", "attempts_per_operation": 3}, "task": {"calls": "500/1h"}})
    assert budgets == BudgetConfig(CallerBudget(Rate(100, 60.0), 3), Rate(500, 3600.0))
    assert budgets.configured


@pytest.mark.parametrize("raw", [None, {}, {"identity": {}}], ids=["absent", "empty", "no-caps"])
def test_budgets_without_a_cap_are_not_configured(raw: dict[str, Any] | None) -> None:
    config = parse_config({"routes": ROUTES} if raw is None else {"routes": ROUTES, "budgets": raw})
    assert config.budgets == BudgetConfig()
    assert not config.budgets.configured


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param([], ["budgets: expected a mapping, got list []"], id="not-a-mapping"),
        pytest.param({"tasks": {}}, ["budgets.tasks: unknown key; did you mean 'task'?"], id="unknown"),
        pytest.param(
            {"identity": {"call": "1/1m", "calls": "1/minute", "attempts_per_operation": 0}},
            [
                "budgets.identity.call: unknown key; did you mean 'calls'?",
                "budgets.identity.calls: expected 'LIMIT/WINDOW' such as '100/1m' (at most LIMIT calls in any "
                "sliding WINDOW); 'minute' is not a duration",
                "budgets.identity.attempts_per_operation: expected a whole number of at least 1, got int 0",
            ],
            id="identity",
        ),
        pytest.param(
            {"identity": {"calls": "unlimited"}},
            [
                "budgets.identity.calls: 'unlimited' lifts a default in one identity's own budgets; "
                "here, leave the key out"
            ],
            id="unlimited-default",
        ),
        pytest.param(
            {"task": {"attempts_per_operation": 2}},
            [
                "budgets.task.attempts_per_operation: unknown key; expected one of calls",
                "budgets.task.calls: is required: 'LIMIT/WINDOW' such as '100/1m' (at most LIMIT calls in any "
                "sliding WINDOW)",
            ],
            id="task",
        ),
        pytest.param({"task": "500/1h"}, ["budgets.task: expected a mapping, got str '500/1h'"], id="task-shape"),
    ],
)
def test_every_bad_key_is_named(raw: Any, expected: list[str]) -> None:
    assert problems_of({"budgets": raw}) == expected


# -- an identity's own budgets -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "default", "effective"),
    [
        pytest.param(BudgetOverride(), CallerBudget(Rate(1, 60), 2), CallerBudget(Rate(1, 60), 2), id="keeps"),
        pytest.param(
            BudgetOverride(calls=Rate(9, 1)), CallerBudget(Rate(1, 60), 2), CallerBudget(Rate(9, 1), 2), id="replaces"
        ),
        pytest.param(
            BudgetOverride(calls=UNLIMITED, attempts_per_operation=UNLIMITED),
            CallerBudget(Rate(1, 60), 2),
            CallerBudget(),
            id="lifts",
        ),
        pytest.param(BudgetOverride(attempts_per_operation=3), CallerBudget(), CallerBudget(None, 3), id="adds"),
    ],
)
def test_an_identitys_budgets_replace_the_defaults_key_by_key(
    override: BudgetOverride, default: CallerBudget, effective: CallerBudget
) -> None:
    assert override.over(default) == effective


def test_inline_identity_budgets_are_read() -> None:
    config = parse_config(
        {
            "routes": ROUTES,
            "auth": {"identities": [identity(budgets={"calls": "unlimited", "attempts_per_operation": 2})]},
        }
    )
    assert config.auth is not None
    assert config.auth.identities[0].budgets == BudgetOverride(UNLIMITED, 2)


def test_bad_inline_identity_budgets_are_named() -> None:
    problems = problems_of(
        {
            "auth": {
                "identities": [
                    identity(budgets={"calls": "lots", "attempts_per_operation": -1, "window": "1m"}),
                    {**identity(budgets="none"), "name": "other", "tokens": [token_hash("u-0123456789")]},
                ]
            }
        }
    )
    assert problems == [
        "auth.identities[0].budgets.window: unknown key; expected one of attempts_per_operation, calls",
        "auth.identities[0].budgets.calls: expected 'LIMIT/WINDOW' such as '100/1m' (at most LIMIT calls in any "
        "sliding WINDOW), got str 'lots'; or 'unlimited' for no cap",
        "auth.identities[0].budgets.attempts_per_operation: expected a whole number of at least 1, got int -1; "
        "or 'unlimited' for no cap",
        "auth.identities[1].budgets: expected a mapping, got str 'none'",
    ]


def test_bad_budgets_in_the_identities_file_are_named(tmp_path: Path) -> None:
    path = tmp_path / "identities.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            identities:
              - name: executor
                tokens: ["{token_hash("t-0123456789")}"]
                budgets: {{calls: 10/1x}}
            """
        ),
        encoding="utf-8",
    )
    with pytest.raises(AuthConfigError) as caught:
        load_identities_file(path, frozenset({"tools"}))
    assert caught.value.problems == [
        f"{path}: identities[0].budgets.calls: expected 'LIMIT/WINDOW' such as '100/1m' (at most LIMIT calls "
        "in any sliding WINDOW); '1x' is not a duration; or 'unlimited' for no cap"
    ]


def test_check_config_names_every_bad_budget_key(tmp_path: Path) -> None:
    path = tmp_path / "idemproxy.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            budgets:
              identity: {calls: 0/1m, attempt_per_operation: 3}
              task: {calls: 5}
            auth:
              identities:
                - name: executor
                  tokens: ["sha256:0000000000000000000000000000000000000000000000000000000000000000"]
                  budgets: {attempts_per_operation: many}
            routes:
              - {prefix: /, upstream: "http://127.0.0.1:9000"}
            """
        ),
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "idemproxy", "check-config", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    # in file order, each with its line
    keys = [line.removeprefix(f"idemproxy: {path}:").split(": ")[0:2] for line in result.stderr.splitlines()]
    assert keys == [
        ["2", "budgets.identity.attempt_per_operation"],
        ["2", "budgets.identity.calls"],
        ["3", "budgets.task.calls"],
        ["8", "auth.identities[0].budgets.attempts_per_operation"],
    ]
