"""`make run`: the example ticket tool, and idemproxy in front of it on the embedded store.

Starts both as child processes on 127.0.0.1, prints a curl line that shows a
replay, and stops both cleanly on Ctrl-C. Ports: DEMO_TOOL_PORT (9000),
DEMO_PROXY_PORT (8080), DEMO_ADMIN_PORT (8081).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOOL_PORT = int(os.environ.get("DEMO_TOOL_PORT", "9000"))
PROXY_PORT = int(os.environ.get("DEMO_PROXY_PORT", "8080"))
ADMIN_PORT = int(os.environ.get("DEMO_ADMIN_PORT", "8081"))


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"demo: {process.args[1]} exited with {process.returncode} during startup")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"demo: {url} did not come up in {timeout_s:g}s")


def main() -> int:
    for name, port in (
        ("DEMO_TOOL_PORT", TOOL_PORT),
        ("DEMO_PROXY_PORT", PROXY_PORT),
        ("DEMO_ADMIN_PORT", ADMIN_PORT),
    ):
        if not port_free(port):
            print(f"demo: port {port} is in use; set {name} to a free port", file=sys.stderr)
            return 1
    tool = subprocess.Popen([sys.executable, str(HERE / "ticket_tool.py"), "--port", str(TOOL_PORT)])
    proxy = subprocess.Popen(
        [
            sys.executable, "-m", "idemproxy", "run",
            "--upstream", f"http://127.0.0.1:{TOOL_PORT}",
            "--listen", f"127.0.0.1:{PROXY_PORT}",
            "--admin-listen", f"127.0.0.1:{ADMIN_PORT}",
        ]
    )  # fmt: skip
    children = (proxy, tool)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        wait_until_up(f"http://127.0.0.1:{TOOL_PORT}/tickets", tool)
        wait_until_up(f"http://127.0.0.1:{ADMIN_PORT}/healthz", proxy)
        key = f"demo-{int(time.time())}"
        print(
            f"""
idemproxy is on http://127.0.0.1:{PROXY_PORT} in front of the ticket tool on :{TOOL_PORT}
(ledger: ./.idemproxy/ledger.db). Send the same call twice; the second is a replay:

  curl -i -X POST http://127.0.0.1:{PROXY_PORT}/tickets -H 'Idempotency-Key: {key}' \\
       -H 'Content-Type: application/json' -d '{{"title": "printer on fire"}}'

The tool filed one ticket however often you run it:

  curl http://127.0.0.1:{PROXY_PORT}/tickets

Health: curl http://127.0.0.1:{ADMIN_PORT}/readyz    Ctrl-C stops both.
""",
            flush=True,
        )
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        print("demo: a child process exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: stopping", file=sys.stderr)
        return 0
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()


if __name__ == "__main__":
    sys.exit(main())
