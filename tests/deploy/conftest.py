"""Fixtures for the chart tests: the sidecar example chart with its dependencies, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.charts import AGENT_EXAMPLE, with_dependencies


@pytest.fixture(scope="session")
def agent_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_dependencies(AGENT_EXAMPLE, tmp_path_factory.mktemp("charts"))
