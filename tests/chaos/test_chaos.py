"""A short chaos campaign on every change: faults injected, invariants checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.harness import ChaosConfig, run_campaign

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
async def test_short_chaos_campaign_keeps_every_invariant(tmp_path: Path) -> None:
    config = ChaosConfig(operations=2000, agents=24, proxies=2, seed=20261124)
    report = await run_campaign(config, tmp_path)
    print("\n" + report.table())

    assert report.violations == []
    assert sum(report.faults.values()) >= 10  # faults really happened
    assert report.completed + report.needs_attention >= 0.95 * config.operations
    assert report.effects == report.completed - _completed_without_effect(report)
    assert report.duplicates_prevented > 0


def _completed_without_effect(report: object) -> int:
    return 0  # every COMPLETED record must name the tool's one effect (checked per operation)
