"""The runnable examples run, and show one ticket for a call issued three times."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("script", ["autogen_example.py", "camel_example.py"])
def test_the_example_files_one_ticket(script: str) -> None:
    finished = subprocess.run(
        [sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=50, check=False
    )
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    assert lines[-1] == "tickets filed at the tool: 1"
    assert sum("answered from the ledger" in line for line in lines) == 2
    assert any(line.startswith("verifier: Operation ") and "is COMPLETED" in line for line in lines)
