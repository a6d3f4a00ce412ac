"""The per-route ``reconcile:`` block, read through ``parse_config`` like any configuration file."""

from __future__ import annotations

from typing import Any

import pytest

from idemproxy.config.reconcile import ReconcileConfig, parse_reconcile
from idemproxy.config.settings import ConfigError, parse_config
from tests.support import reconcile_hooks

UPSTREAM = "http://127.0.0.1:9000"
PROBE = {"url": "{upstream}/lookup?key={key}", "match": "matches[0]"}
WHERE = "routes[0].reconcile"  # then ": " for the block itself, or ".sub.key: " for one of its keys


def parse(block: Any) -> ReconcileConfig:
    config = parse_config({"routes": [{"prefix": "/", "upstream": UPSTREAM, "reconcile": block}]})
    reconcile = config.routes[0].reconcile
    assert reconcile is not None
    return reconcile


def problems(block: Any) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse_config({"routes": [{"prefix": "/", "upstream": UPSTREAM, "reconcile": block}]})
    return raised.value.problems


# -- valid blocks -------------------------------------------------------------------------------


def test_probe_with_every_key() -> None:
    config = parse(
        {
            "probe": {
                "method": "post",
                "url": "{upstream}/lookup?key={key}&op={op_id}&caller={caller}&task={task}&ref={body.order.ref}",
                "headers": {"Accept": "application/json", "X-Probe": "1"},
                "timeout": "250ms",
                "match_statuses": [200, 203],
                "absent_statuses": [404, 410],
                "match": "matches[?path=='/items'] | [0]",
            },
            "found": {"status": 201, "body": "probe"},
            "settle": "15s",
            "max_probes": 3,
            "backoff": "500ms",
            "max_backoff": "10s",
            "on_demand_timeout": "2s",
        }
    )
    probe = config.probe
    assert probe is not None
    assert probe.method == "POST"
    assert probe.url.endswith("&ref={body.order.ref}")
    assert probe.headers == (("Accept", "application/json"), ("X-Probe", "1"))
    assert probe.timeout_s == 0.25
    assert probe.match_statuses == frozenset({200, 203})
    assert probe.absent_statuses == frozenset({404, 410})
    assert probe.match_source == "matches[?path=='/items'] | [0]"
    assert probe.match.search({"matches": [{"path": "/x"}, {"path": "/items", "n": 2}]}) == {"path": "/items", "n": 2}
    assert (config.found.status, config.found.body) == (201, "probe")
    assert (config.settle_s, config.max_probes, config.backoff_s, config.max_backoff_s) == (15.0, 3, 0.5, 10.0)
    assert config.on_demand_timeout_s == 2.0
    assert (config.method, config.hook, config.resend_safe) == ("probe", None, False)


def test_minimal_probe_gets_the_documented_defaults() -> None:
    config = parse({"probe": PROBE})
    probe = config.probe
    assert probe is not None
    assert (probe.method, probe.timeout_s, probe.headers) == ("GET", 5.0, ())
    assert probe.match_statuses == frozenset({200})
    assert probe.absent_statuses == frozenset({404})
    assert (config.found.status, config.found.body) == (200, "resource")
    assert (config.max_probes, config.backoff_s, config.max_backoff_s) == (5, 1.0, 60.0)
    assert (config.on_demand_timeout_s, config.settle_s) == (5.0, None)


@pytest.mark.parametrize(
    "url",
    [
        "{upstream}/lookup?key={key}",
        "http://tool.internal:8080/lookup?key={key}",
        "https://tool.example/v1/ops/{op_id}",
        "{upstream}/by-caller/{caller}/{task}",
        "{upstream}/orders/{body.order.id}",
        "{upstream}/static",
    ],
)
def test_valid_probe_urls(url: str) -> None:
    probe = parse({"probe": {**PROBE, "url": url}}).probe
    assert probe is not None
    assert probe.url == url


def test_found_template_body() -> None:
    template = {"id": "${resource.effect}", "key": "${key}", "fixed": 1, "list": ["${probe.total}", "plain"]}
    config = parse({"probe": PROBE, "found": {"status": 202, "body": template}})
    assert (config.found.status, config.found.body) == (202, template)


def test_found_template_string_body() -> None:
    assert parse({"probe": PROBE, "found": {"body": "${resource.id}"}}).found.body == "${resource.id}"


def test_hook_names_an_async_function() -> None:
    config = parse({"hook": "tests.support.reconcile_hooks:found_hook", "max_probes": 2})
    assert config.hook is reconcile_hooks.found_hook
    assert config.hook_name == "tests.support.reconcile_hooks:found_hook"
    assert (config.method, config.probe, config.resend_safe, config.max_probes) == ("hook", None, False, 2)


def test_resend_safe() -> None:
    config = parse({"resend_safe": True, "found": {"status": 201}})
    assert (config.method, config.resend_safe, config.probe, config.hook) == ("resend", True, None, None)


def test_parse_reconcile_directly_names_problems_without_the_route_path() -> None:
    with pytest.raises(ValueError, match=r"^max_probes: expected a whole number"):
        parse_reconcile({"resend_safe": True, "max_probes": -1})


# -- invalid blocks -----------------------------------------------------------------------------

INVALID = [
    # exactly one method
    pytest.param({}, "exactly one of probe, hook or resend_safe: true is required, got none", id="no-method"),
    pytest.param({"resend_safe": False}, "exactly one of probe, hook or resend_safe", id="resend-safe-false-only"),
    pytest.param({"found": {"status": 201}}, "got none", id="found-without-method"),
    pytest.param(
        {"probe": PROBE, "hook": "tests.support.reconcile_hooks:found_hook"},
        "got ['probe', 'hook']",
        id="probe-and-hook",
    ),
    pytest.param({"probe": PROBE, "resend_safe": True}, "got ['probe', 'resend_safe']", id="probe-and-resend"),
    pytest.param(
        {"hook": "tests.support.reconcile_hooks:found_hook", "resend_safe": True},
        "got ['hook', 'resend_safe']",
        id="hook-and-resend",
    ),
    # unknown keys at each level
    pytest.param({"probe": PROBE, "retries": 3}, "retries: unknown key", id="unknown-top-key"),
    pytest.param({"probe": {**PROBE, "verb": "GET"}}, "probe.verb: unknown key", id="unknown-probe-key"),
    pytest.param(
        {"probe": PROBE, "found": {"status": 201, "headers": {}}}, "found.headers: unknown key", id="unknown-found-key"
    ),
    # shapes
    pytest.param("probe", "expected a mapping with probe, hook or resend_safe, got str", id="block-not-mapping"),
    pytest.param({"probe": "{upstream}/x"}, "probe: expected a mapping with url and match", id="probe-not-mapping"),
    pytest.param({"probe": PROBE, "found": "resource"}, "found: expected a mapping", id="found-not-mapping"),
    # probe.url
    pytest.param({"probe": {"match": "x"}}, "probe.url: a URL template is required", id="url-missing"),
    pytest.param({"probe": {**PROBE, "url": ""}}, "probe.url: a URL template is required", id="url-empty"),
    pytest.param(
        {"probe": {**PROBE, "url": "{upstream}/x?k={nope}"}}, "probe.url: unknown placeholder {nope}", id="url-nope"
    ),
    pytest.param({"probe": {**PROBE, "url": "{upstream}/{body.}"}}, "unknown placeholder {body.}", id="url-body-dot"),
    pytest.param({"probe": {**PROBE, "url": "{upstream}/{0}"}}, "unknown placeholder {0}", id="url-positional"),
    pytest.param({"probe": {**PROBE, "url": "{upstream}/{}"}}, "unknown placeholder {}", id="url-empty-field"),
    pytest.param({"probe": {**PROBE, "url": "{upstream}/{key"}}, "probe.url: not a valid template", id="url-unclosed"),
    pytest.param(
        {"probe": {**PROBE, "url": "ftp://tool/{key}"}},
        "probe.url: must start with {upstream} or http(s)://",
        id="url-ftp",
    ),
    pytest.param(
        {"probe": {**PROBE, "url": "/lookup?key={key}"}},
        "probe.url: must start with {upstream} or http(s)://",
        id="url-relative",
    ),
    pytest.param(
        {"probe": {**PROBE, "url": "x{upstream}/lookup"}},
        "probe.url: must start with {upstream} or http(s)://",
        id="url-upstream-not-first",
    ),
    # probe.match
    pytest.param({"probe": {"url": PROBE["url"]}}, "probe.match: a JMESPath expression is required", id="no-match"),
    pytest.param(
        {"probe": {**PROBE, "match": "matches["}}, "probe.match: not a valid JMESPath expression", id="bad-jmespath"
    ),
    pytest.param({"probe": {**PROBE, "match": 3}}, "probe.match: a JMESPath expression is required", id="match-int"),
    # other probe keys
    pytest.param({"probe": {**PROBE, "method": "FETCH"}}, "probe.method: expected one of", id="bad-method"),
    pytest.param({"probe": {**PROBE, "headers": {"X": 1}}}, "probe.headers: expected a mapping", id="bad-headers"),
    pytest.param({"probe": {**PROBE, "timeout": "soon"}}, "probe.timeout: expected a duration", id="bad-timeout"),
    pytest.param({"probe": {**PROBE, "timeout": 0}}, "probe.timeout: expected a duration greater than zero", id="t0"),
    pytest.param({"probe": {**PROBE, "match_statuses": "200"}}, "probe.match_statuses: expected a list", id="ms-str"),
    pytest.param({"probe": {**PROBE, "match_statuses": [99]}}, "probe.match_statuses: expected status", id="ms-99"),
    pytest.param({"probe": {**PROBE, "absent_statuses": [600]}}, "probe.absent_statuses: expected status", id="as-600"),
    pytest.param(
        {"probe": {**PROBE, "match_statuses": [200, 404]}},
        "probe.absent_statuses: [404] also listed in match_statuses",
        id="overlap-default-absent",
    ),
    pytest.param(
        {"probe": {**PROBE, "absent_statuses": [200, 410]}},
        "probe.absent_statuses: [200] also listed in match_statuses",
        id="overlap-default-match",
    ),
    # found
    pytest.param({"probe": PROBE, "found": {"status": 404}}, "found.status: expected a 2xx status, got 404", id="f404"),
    pytest.param({"probe": PROBE, "found": {"status": 199}}, "found.status: expected a 2xx status", id="found-199"),
    pytest.param({"probe": PROBE, "found": {"status": "201"}}, "found.status: expected a 2xx status", id="found-str"),
    pytest.param({"probe": PROBE, "found": {"status": True}}, "found.status: expected a 2xx status", id="found-bool"),
    pytest.param(
        {"probe": PROBE, "found": {"body": "whatever"}},
        "found.body: expected 'resource', 'probe' or a JSON template, got 'whatever'",
        id="found-body-string",
    ),
    pytest.param(
        {"probe": PROBE, "found": {"body": {"id": "${resource[}"}}},
        "found.body: template expression 'resource[' is not valid JMESPath",
        id="template-bad-expression",
    ),
    pytest.param(
        {"probe": PROBE, "found": {"body": {"items": [{"deep": "${[[}"}]}}},
        "found.body: template expression '[[' is not valid JMESPath",
        id="template-nested-bad-expression",
    ),
    pytest.param(
        {"probe": PROBE, "found": {"body": "${}"}},
        "found.body: template expression '' is not valid JMESPath",
        id="template-empty-expression",
    ),
    # hook
    pytest.param({"hook": "tests.support.reconcile_hooks"}, "hook: expected 'module:function'", id="hook-no-colon"),
    pytest.param({"hook": "a:b:c"}, "hook: expected 'module:function', got 'a:b:c'", id="hook-two-colons"),
    pytest.param({"hook": 42}, "hook: expected 'module:function', got 42", id="hook-not-string"),
    pytest.param(
        {"hook": "tests.no_such_hooks:lookup"},
        "hook: cannot import module 'tests.no_such_hooks'",
        id="hook-module-missing",
    ),
    pytest.param(
        {"hook": "tests.support.reconcile_hooks:missing"},
        "hook: 'tests.support.reconcile_hooks:missing' must name an async function",
        id="hook-function-missing",
    ),
    pytest.param(
        {"hook": "tests.support.reconcile_hooks:sync_hook"},
        "hook: 'tests.support.reconcile_hooks:sync_hook' must name an async function",
        id="hook-not-async",
    ),
    pytest.param(
        {"hook": "tests.support.reconcile_hooks:NOT_CALLABLE"},
        "must name an async function",
        id="hook-not-a-function",
    ),
    # resend_safe and durations
    pytest.param({"resend_safe": "yes"}, "resend_safe: expected true or false", id="resend-safe-string"),
    pytest.param({"probe": PROBE, "max_probes": 0}, "max_probes: expected a whole number of at least 1", id="mp-0"),
    pytest.param({"probe": PROBE, "max_probes": True}, "max_probes: expected a whole number", id="max-probes-bool"),
    pytest.param({"probe": PROBE, "backoff": "fast"}, "backoff: expected a duration", id="backoff-word"),
    pytest.param({"probe": PROBE, "backoff": 0}, "backoff: expected a duration greater than zero", id="backoff-0"),
    pytest.param({"probe": PROBE, "max_backoff": "1 week"}, "max_backoff: expected a duration", id="max-backoff"),
    pytest.param({"probe": PROBE, "on_demand_timeout": -1}, "on_demand_timeout: expected", id="on-demand-negative"),
    pytest.param({"probe": PROBE, "settle": "later"}, "settle: expected a duration", id="settle-word"),
    pytest.param({"probe": PROBE, "settle": -5}, "settle: expected a non-negative duration", id="settle-negative"),
]


@pytest.mark.parametrize(("block", "message"), INVALID)
def test_invalid_block_names_the_route_and_sub_key(block: Any, message: str) -> None:
    found = problems(block)
    assert all(problem.startswith(WHERE) for problem in found)
    assert any(message in problem for problem in found), found


def test_every_problem_of_a_block_is_reported_at_once() -> None:
    found = problems(
        {
            "probe": {"url": "{upstream}/{nope}", "match": "[["},
            "found": {"status": 500},
            "backoff": "x",
            "extra": 1,
        }
    )
    # one problem each, under its own key path
    assert [problem.split(": ", 1)[0] for problem in found] == [
        f"{WHERE}.extra",
        f"{WHERE}.probe.url",
        f"{WHERE}.probe.match",
        f"{WHERE}.found.status",
        f"{WHERE}.backoff",
    ]
    assert "extra: unknown key" in found[0]
    assert "probe.url: unknown placeholder {nope}" in found[1]
    assert "backoff: expected a duration" in found[4]


def test_problem_messages_quote_the_users_expression_as_written() -> None:
    # config.py turns "routes.[0]" into "routes[0]" by replacing ".[" in the whole message,
    # which also rewrites the quoted expression: the operator must see what they wrote.
    found = problems({"probe": {**PROBE, "match": "matches.["}, "found": {"body": {"id": "${resource.[}"}}})
    text = " ".join(found)
    assert "'resource.['" in text
    assert '"matches.["' in text


def test_problems_name_the_route_index() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(
            {
                "routes": [
                    {"prefix": "/a", "upstream": UPSTREAM, "reconcile": {"probe": PROBE}},
                    {"prefix": "/b", "upstream": UPSTREAM, "reconcile": {"hook": "nope"}},
                ]
            }
        )
    assert len(raised.value.problems) == 1
    assert raised.value.problems[0].startswith("routes[1].reconcile.hook: expected 'module:function'")


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("{upstream}/lookup?key={key!r}", id="conversion"),
        pytest.param("{upstream}/lookup?key={key:>20}", id="format-spec"),
    ],
)
def test_url_placeholders_with_conversions_or_format_specs_are_refused(url: str) -> None:
    # The README promises substituted values are percent-encoded; `!r` would wrap the key in
    # quotes and a format spec pads it with raw spaces, so the probe would silently look up
    # the wrong thing. Such templates must be configuration errors.
    found = problems({"probe": {**PROBE, "url": url}})
    assert any("probe.url" in problem for problem in found), found


# -- derived properties -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "stores"),
    [
        pytest.param({"resend_safe": True}, True, id="resend-safe"),
        pytest.param({"hook": "tests.support.reconcile_hooks:found_hook"}, True, id="hook"),
        pytest.param({"probe": {**PROBE, "url": "{upstream}/orders/{body.order.id}"}}, True, id="probe-quotes-body"),
        pytest.param({"probe": {**PROBE, "url": "{upstream}/x?a={key}&b={body.ref}"}}, True, id="probe-body-in-query"),
        pytest.param({"probe": PROBE}, False, id="probe-key-only"),
        pytest.param({"probe": {**PROBE, "url": "{upstream}/body/{key}?body=1"}}, False, id="literal-body-text"),
        pytest.param({"probe": {**PROBE, "url": "https://tool/{op_id}/{caller}/{task}"}}, False, id="probe-no-body"),
    ],
)
def test_stores_request(block: dict[str, Any], stores: bool) -> None:
    assert parse(block).stores_request is stores


@pytest.mark.parametrize(
    ("backoff", "max_backoff", "expected"),
    [
        pytest.param("1s", "1m", [1.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0], id="default"),
        pytest.param("250ms", "1s", [0.25, 0.25, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], id="small-cap"),
        pytest.param("3s", "2s", [2.0] * 9, id="cap-below-base"),
    ],
)
def test_backoff_after_doubles_and_is_capped(backoff: str, max_backoff: str, expected: list[float]) -> None:
    config = parse({"probe": PROBE, "backoff": backoff, "max_backoff": max_backoff})
    assert [config.backoff_after(probes) for probes in range(9)] == expected


def test_backoff_stays_capped_up_to_a_large_max_probes() -> None:
    # max_probes only has a lower bound, so the reconciler may ask for the backoff after
    # thousands of probes; the cap must hold instead of the doubling overflowing a float.
    config = parse({"probe": PROBE, "max_probes": 5000, "backoff": "1s", "max_backoff": "1m"})
    assert config.backoff_after(1100) == 60.0
    assert config.backoff_after(config.max_probes) == 60.0
