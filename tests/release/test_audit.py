"""scripts/audit.py's verdict on pip-audit reports: fail on what has a fix, say what was not checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

REPO = Path(__file__).resolve().parents[2]


def judge(tmp_path: Path, dependencies: list[dict[str, object]], *flags: str) -> subprocess.CompletedProcess[str]:
    report = tmp_path / "report.json"
    report.write_bytes(orjson.dumps({"dependencies": dependencies, "fixes": []}))
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "audit.py"), "--report", str(report), *flags],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def vuln(fixes: list[str]) -> dict[str, object]:
    return {"id": "PYSEC-2099-1", "fix_versions": fixes, "aliases": [], "description": "x"}


def test_a_vulnerability_with_a_fix_fails(tmp_path: Path) -> None:
    result = judge(tmp_path, [{"name": "aiohttp", "version": "3.0.0", "vulns": [vuln(["3.0.1"])]}])
    assert result.returncode == 1
    assert "aiohttp 3.0.0: PYSEC-2099-1, fixed in 3.0.1: run `make lock`" in result.stderr


def test_a_vulnerability_without_a_fix_is_reported_and_passes(tmp_path: Path) -> None:
    result = judge(tmp_path, [{"name": "orjson", "version": "3.9.0", "vulns": [vuln([])]}])
    assert result.returncode == 0
    assert "no fixed version yet" in result.stdout
    assert "1 package(s) audited, 0 fixable and 1 unfixed" in result.stdout


@pytest.mark.parametrize(("flags", "code"), [((), 0), (("--strict",), 1)])
def test_nothing_audited_is_said_loudly_and_fails_only_when_strict(
    tmp_path: Path, flags: tuple[str, ...], code: int
) -> None:
    skipped = [{"name": "redis", "skip_reason": "Dependency not found on PyPI and could not be audited"}]
    result = judge(tmp_path, skipped, *flags)
    assert result.returncode == code
    assert "answered for none of the 1 pinned packages, so nothing was checked" in result.stdout + result.stderr


def test_a_clean_report_passes(tmp_path: Path) -> None:
    result = judge(tmp_path, [{"name": "msgpack", "version": "1.2.4", "vulns": []}])
    assert result.returncode == 0
    assert "1 package(s) audited, 0 fixable and 0 unfixed" in result.stdout
