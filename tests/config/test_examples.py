"""The shipped example configurations stay valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from idemproxy.config.settings import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_configuration_is_valid(path: Path) -> None:
    config = load_config(path, environ={})
    assert config.routes


def test_worked_reconciliation_example_probes_the_ticket_tool() -> None:
    config = load_config(Path(__file__).resolve().parents[2] / "examples" / "tickets.yaml", environ={})
    reconcile = config.routes[0].reconcile
    assert reconcile is not None
    assert reconcile.probe is not None
    assert reconcile.probe.url == "{upstream}/tickets?external_id={key}"
    assert reconcile.found.status == 201
