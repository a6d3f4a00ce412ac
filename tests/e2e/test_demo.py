"""``make run``'s narrated scenario (examples/demo.py) against the real processes."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from tests.support.redis_server import free_port

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "demo.py"


def run_demo(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEMO)],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_the_scenario_replays_reconciles_and_resolves_then_exits(tmp_path: Path) -> None:
    ports = {"DEMO_TOOL_PORT": free_port(), "DEMO_PROXY_PORT": free_port(), "DEMO_ADMIN_PORT": free_port()}
    done = run_demo(tmp_path, DEMO_EXIT="1", **{name: str(port) for name, port in ports.items()})

    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    # 1. the repeat is a replay
    assert re.search(r"^   <- 201  Idempotent-Replayed: true  \{", out, re.M)
    assert "=> replayed:" in out
    # 2. the lost answer is a 502, and the retry is reconciled
    assert out.count("<- 502 upstream-connection-lost") == 2
    assert "Idempotent-Reconciled: true" in out
    assert "=> reconciled:" in out
    # 3. the retry waits for an operator, who resolves it with the real CLI
    assert "<- 409 needs-attention" in out
    [op_id] = re.findall(r"^     ([0-9a-f]{32})  NEEDS_ATTENTION  notify", out, re.M)
    assert f"-m idemproxy ops resolve {op_id} --done --status 201" in out
    assert f"resolved: {op_id} is now COMPLETED" in out
    assert "=> resolved:" in out
    assert "The scenario passed." in out
    assert "Ctrl-C" not in out, "DEMO_EXIT=1 stops after the scenario"

    # What the tool itself did (its own log): one effect per key, whatever was retried.
    tool_log = (tmp_path / ".idemproxy" / "tool.log").read_text()
    tickets = re.findall(r"^filed ticket \d+ for key (\S+):", tool_log, re.M)
    notifications = re.findall(r"^sent notification \d+ for key (\S+)$", tool_log, re.M)
    assert len(tickets) == 2
    assert len(set(tickets)) == 2
    assert len(notifications) == 1
    assert tool_log.count("dropped the connection") == 2
    assert all(port_free(port) for port in ports.values()), "both children stopped"


def test_scenario_can_be_skipped(tmp_path: Path) -> None:
    ports = {"DEMO_TOOL_PORT": free_port(), "DEMO_PROXY_PORT": free_port(), "DEMO_ADMIN_PORT": free_port()}
    done = run_demo(tmp_path, DEMO_SCRIPT="0", DEMO_EXIT="1", **{name: str(port) for name, port in ports.items()})

    assert done.returncode == 0, done.stdout + done.stderr
    assert "idemproxy is on" in done.stdout
    assert "1. " not in done.stdout
    assert (tmp_path / ".idemproxy" / "tool.log").read_text() == ""


def test_a_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        done = run_demo(
            tmp_path,
            DEMO_TOOL_PORT=str(taken),
            DEMO_PROXY_PORT=str(free_port()),
            DEMO_ADMIN_PORT=str(free_port()),
        )
    assert done.returncode == 1
    assert done.stderr.strip() == f"demo: port {taken} is in use; set DEMO_TOOL_PORT to a free port"
