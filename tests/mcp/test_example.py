"""The runnable MCP example runs, and shows one ticket for a call issued three times."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mcp_example.py"


def test_the_mcp_example_files_one_ticket() -> None:
    finished = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=50, check=False)
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    assert lines[-1] == "tickets filed at the tool: 1"
    results = [line.split(": ", 1)[1] for line in lines if " result" in line]
    assert results == ["ticket #1 'Disk full on db-1'"] * 3
    assert any(line.startswith("verifier: Operation ") and "is COMPLETED" in line for line in lines)
