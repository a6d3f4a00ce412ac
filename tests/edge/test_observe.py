"""A request's observation: immutable events, folded into what is logged and counted."""

from __future__ import annotations

import pytest

from idemproxy.edge.observe import (
    SIDE_EFFECTING,
    Decided,
    Keyed,
    Observation,
    RouteMatched,
    Summary,
    TaskNamed,
    UpstreamTimed,
)
from idemproxy.protocol import Decision


def test_a_request_nothing_was_learned_about_is_an_error_on_no_route() -> None:
    assert Observation().summary() == Summary("-", Decision.ERROR, None, None, None, None, 0.0, False)


def test_the_events_fold_into_one_summary() -> None:
    observation = Observation()
    for event in (
        RouteMatched("tickets"),
        SIDE_EFFECTING,
        TaskNamed("run-7"),
        Keyed("op-1", "k-1"),
        Decided(Decision.FORWARDED, 2),
        UpstreamTimed(0.25),
    ):
        observation.record(event)

    assert observation.summary() == Summary("tickets", Decision.FORWARDED, "op-1", 2, "run-7", "k-1", 0.25, True)


def test_the_first_decision_is_the_requests() -> None:
    """A problem raised after the decision (a timeout once forwarded, say) does not replace it."""
    observation = Observation()
    observation.record(Decided(Decision.FORWARDED, 1))
    observation.record(Decided(Decision.FAIL_CLOSED))

    summary = observation.summary()
    assert (summary.decision, summary.attempt) == (Decision.FORWARDED, 1)


def test_the_last_route_and_upstream_time_count() -> None:
    observation = Observation()
    for event in (RouteMatched("a"), UpstreamTimed(1.0), RouteMatched("b"), UpstreamTimed(2.0)):
        observation.record(event)

    summary = observation.summary()
    assert (summary.route, summary.upstream_s, summary.side_effecting) == ("b", 2.0, False)


@pytest.mark.parametrize(
    ("event", "field", "value"),
    [
        pytest.param(RouteMatched("r"), "route", "other", id="route-matched"),
        pytest.param(TaskNamed("t"), "task", None, id="task-named"),
        pytest.param(Keyed("op", "k"), "op_id", "op-2", id="keyed"),
        pytest.param(Decided(Decision.REPLAYED, 1), "decision", Decision.ERROR, id="decided"),
        pytest.param(UpstreamTimed(0.1), "seconds", 0.0, id="upstream-timed"),
    ],
)
def test_events_are_immutable(event: object, field: str, value: object) -> None:
    with pytest.raises(AttributeError):  # FrozenInstanceError is one
        setattr(event, field, value)
