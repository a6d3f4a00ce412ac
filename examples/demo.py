"""`make run`: the example ticket tool, and idemproxy in front of it on the embedded store.

Starts both as child processes on 127.0.0.1 (idemproxy with examples/demo.yaml),
then plays a short narrated scenario against them: a retry replayed, a lost
acknowledgment reconciled, an operator resolving what nobody could know. Then
both keep running for you to try; Ctrl-C stops both.

    DEMO_TOOL_PORT (9000), DEMO_PROXY_PORT (8080), DEMO_ADMIN_PORT (8081)
    DEMO_SCRIPT=0  skip the scenario          DEMO_EXIT=1  stop after the scenario

The children log to .idemproxy/tool.log and .idemproxy/proxy.log, beside the ledger.
Only the standard library here: `make run` has the runtime dependencies alone.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "demo.yaml"
STATE = Path(".idemproxy")  # the ledger's directory (demo.yaml), relative to where `make run` runs
TOOL_PORT = int(os.environ.get("DEMO_TOOL_PORT", "9000"))
PROXY_PORT = int(os.environ.get("DEMO_PROXY_PORT", "8080"))
ADMIN_PORT = int(os.environ.get("DEMO_ADMIN_PORT", "8081"))
SCRIPT = os.environ.get("DEMO_SCRIPT", "1") != "0"
EXIT_AFTER = os.environ.get("DEMO_EXIT", "0") == "1"
TOOL = f"http://127.0.0.1:{TOOL_PORT}"
PROXY = f"http://127.0.0.1:{PROXY_PORT}"
ADMIN = f"http://127.0.0.1:{ADMIN_PORT}"
DROP = {"X-Demo-Drop-Answer": "1"}  # the ticket tool does the work, then drops the connection

T = TypeVar("T")


class Failed(Exception):
    """A step did not show what it should: one line for the user, and the demo exits 1."""


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_until_up(url: str, process: subprocess.Popen[bytes], name: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise Failed(f"{name} exited with {process.returncode} during startup (see {STATE / name}.log)")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise Failed(f"{url} did not come up in {timeout_s:g}s (see {STATE / name}.log)")


def config_file() -> Path:
    """demo.yaml itself, or a copy of it in .idemproxy/ pointing at DEMO_TOOL_PORT."""
    if TOOL_PORT == 9000:
        return CONFIG
    copy = STATE / "demo.yaml"
    copy.write_text(CONFIG.read_text().replace("http://127.0.0.1:9000", TOOL))
    return copy


def shown(path: Path) -> str:
    """``path`` as the user would type it from here."""
    relative = os.path.relpath(path)
    return path.as_posix() if relative.startswith("..") else relative


# --- HTTP, the standard library's ---------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: Message
    body: Any = field(default=None)

    @property
    def problem(self) -> str:
        """The problem type's slug (``upstream-connection-lost``), or ''."""
        if isinstance(self.body, dict) and isinstance(self.body.get("type"), str):
            return str(self.body["type"]).replace("/", ":").rsplit(":", 1)[-1]
        return ""

    def flag(self, name: str) -> bool:
        return self.headers.get(name) == "true"


def call(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Answer:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            status, answer_headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:  # 4xx and 5xx are answers here, not failures
        status, answer_headers, raw = error.code, error.headers, error.read()
    except OSError as error:
        raise Failed(f"{method} {url}: {getattr(error, 'reason', error)}") from None
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode(errors="replace")
    return Answer(status, answer_headers, parsed)


def poll(what: str, attempt: Callable[[], T], done: Callable[[T], bool], timeout_s: float = 15.0) -> T:
    """``attempt()`` until ``done`` says yes, for up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = attempt()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise Failed(f"{what}: still {describe(value)} after {timeout_s:g}s")
        time.sleep(0.2)


# --- what the reader sees -----------------------------------------------------------------


def describe(value: Any) -> str:
    if not isinstance(value, Answer):
        return repr(value)
    if value.problem:
        return f"{value.status} {value.problem}"
    marks = [f"{name}: true" for name in ("Idempotent-Replayed", "Idempotent-Reconciled") if value.flag(name)]
    return "  ".join([str(value.status), *marks, json.dumps(value.body)])


STEP = ["startup"]  # where a failure happened


def step(title: str) -> None:
    STEP[0] = f"step {title.split('.', 1)[0]}"
    print(f"\n{title}", flush=True)


def say(line: str) -> None:
    print(f"   {line}", flush=True)


def expect(condition: bool, failure: str) -> None:
    if not condition:
        raise Failed(failure)


def send(path: str, key: str, body: Any, note: str = "", drop: bool = False) -> Answer:
    """POST ``path`` through idemproxy with ``key``, shown as one line (the body, or ``note``
    for a call already shown) and its answer as another."""
    extra = "  X-Demo-Drop-Answer: 1" if drop else ""
    say(f"POST {path}  Idempotency-Key: {key}{extra}  {note or json.dumps(body)}")
    answer = call("POST", PROXY + path, body, {"Idempotency-Key": key, **(DROP if drop else {})})
    say(f"<- {describe(answer)}")
    return answer


def on_the_tool(path: str, key: str) -> list[Any]:
    """What the tool itself holds for ``key`` (asked directly, not through idemproxy)."""
    answer = call("GET", f"{TOOL}{path}?external_id={key}")
    expect(answer.status == 200 and isinstance(answer.body, dict), f"GET {path} on the tool: {describe(answer)}")
    items = next(value for name, value in answer.body.items() if name != "count")
    say(f"GET :{TOOL_PORT}{path}?external_id={key}  (the tool itself)  <- {len(items)} filed")
    return list(items)


def idemproxy_cli(*args: str) -> str:
    """``python -m idemproxy ARGS`` against this demo's admin listener, shown with its output."""
    if ADMIN_PORT != 8081:
        args = (*args, "--admin", ADMIN)
    python = shown(Path(sys.executable))
    say(f"$ {python} -m idemproxy {shlex.join(args)}")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "idemproxy", *args], capture_output=True, text=True, timeout=30, check=False
        )
    except subprocess.TimeoutExpired:
        raise Failed(f"idemproxy {args[0]} {args[1]} did not finish in 30s") from None
    for line in done.stdout.splitlines():
        say(f"  {line}")
    if done.returncode != 0:
        raise Failed(f"idemproxy {args[0]} {args[1]} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


# --- the scenario -------------------------------------------------------------------------


def scenario() -> None:
    run = uuid.uuid4().hex[:6]  # fresh keys each run: the ledger outlives the demo, the tool does not

    step("1. A retry is answered from the ledger, not sent to the tool again")
    key, ticket = f"ticket-{run}", {"title": "printer on fire"}
    first = send("/tickets", key, ticket)
    expect(first.status == 201, f"the first call got {describe(first)}, not 201")
    again = send("/tickets", key, ticket, "(the same call again)")
    expect(again.flag("Idempotent-Replayed"), f"the repeat got {describe(again)}, not a replay")
    expect(again.body == first.body, "the replay is not the first answer")
    expect(len(on_the_tool("/tickets", key)) == 1, "the tool did not file exactly one ticket")
    say("=> replayed: two calls, one ticket; the second got the first's answer")

    step("2. A lost acknowledgment is reconciled from what the tool did")
    key, ticket = f"lost-{run}", {"title": "disk full on build-3"}
    lost = send("/tickets", key, ticket, drop=True)
    expect(lost.problem == "upstream-connection-lost", f"{describe(lost)}, not 502 upstream-connection-lost")
    say("   the tool filed it, but its answer was lost: the caller cannot know; the operation is UNKNOWN")
    retry = poll(
        "the retry of the lost call",
        lambda: send("/tickets", key, ticket, "(the retry)"),
        lambda answer: answer.problem not in ("outcome-unknown", "operation-in-flight"),
    )
    expect(
        retry.status == 201 and retry.flag("Idempotent-Reconciled"),
        f"the retry got {describe(retry)}, not 201 with Idempotent-Reconciled: true",
    )
    filed = on_the_tool("/tickets", key)
    expect(len(filed) == 1 and filed[0] == retry.body, "the tool does not hold exactly the ticket the retry got")
    say(f"=> reconciled: idemproxy asked the tool (GET /tickets?external_id={key}), filed nothing twice")

    step("3. An operator resolves what nobody can look up")
    key, page = f"page-{run}", {"to": "on-call", "text": "printer on fire"}
    lost = send("/notify", key, page, drop=True)
    expect(lost.problem == "upstream-connection-lost", f"{describe(lost)}, not 502 upstream-connection-lost")
    say("   sent, answer lost; /notify has no reconcile probe, so the operation goes to NEEDS_ATTENTION")
    stuck = poll(
        "the retry of the lost notification",
        lambda: send("/notify", key, page, "(the retry)"),
        lambda answer: answer.problem not in ("outcome-unknown", "operation-in-flight"),
    )
    expect(stuck.problem == "needs-attention", f"the retry got {describe(stuck)}, not 409 needs-attention")
    say("   not sent again (the on-call would be paged twice): it waits for an operator")
    op_id = str(stuck.body.get("operation", ""))  # the problem names the operation
    listing = idemproxy_cli("ops", "list", "--state", "NEEDS_ATTENTION")
    expect(bool(op_id) and op_id in listing, f"operation {op_id!r} is not listed as NEEDS_ATTENTION")
    say("   the operator checks the tool, finds the page was sent, and records that answer:")
    sent = on_the_tool("/notify", key)
    expect(len(sent) == 1, "the tool did not send exactly one notification")
    body = json.dumps(sent[0], separators=(",", ":"))
    resolve = ("ops", "resolve", op_id, "--done", "--status", "201", "--body", body)
    idemproxy_cli(*resolve, "--by", "demo", "--reason", "checked the tool")
    resolved = send("/notify", key, page, "(the retry, again)")
    expect(
        resolved.status == 201 and resolved.body == sent[0],
        f"after the resolution the retry got {describe(resolved)}, not 201 and the notification",
    )
    expect(len(on_the_tool("/notify", key)) == 1, "the tool sent the notification again")
    say("=> resolved: the retry gets the operator's answer; the on-call was paged once")


def main() -> int:
    for name, port in (
        ("DEMO_TOOL_PORT", TOOL_PORT),
        ("DEMO_PROXY_PORT", PROXY_PORT),
        ("DEMO_ADMIN_PORT", ADMIN_PORT),
    ):
        if not port_free(port):
            print(f"demo: port {port} is in use; set {name} to a free port", file=sys.stderr)
            return 1
    STATE.mkdir(exist_ok=True)
    config = config_file()
    with open(STATE / "tool.log", "wb") as tool_log, open(STATE / "proxy.log", "wb") as proxy_log:
        tool = subprocess.Popen(
            [sys.executable, str(HERE / "ticket_tool.py"), "--port", str(TOOL_PORT)],
            stdout=tool_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        proxy = subprocess.Popen(
            [
                sys.executable, "-m", "idemproxy", "run",
                "--config", str(config),
                "--listen", f"127.0.0.1:{PROXY_PORT}",
                "--admin-listen", f"127.0.0.1:{ADMIN_PORT}",
            ],
            stdout=proxy_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return supervise(tool, proxy, config)


def supervise(tool: subprocess.Popen[bytes], proxy: subprocess.Popen[bytes], config: Path) -> int:
    children = (proxy, tool)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        wait_until_up(f"{TOOL}/tickets", tool, "tool")
        wait_until_up(f"{ADMIN}/healthz", proxy, "proxy")
        print(
            f"idemproxy is on {PROXY} in front of the ticket tool on :{TOOL_PORT}\n"
            f"(config {shown(config)}, ledger {STATE}/ledger.db, logs {STATE}/proxy.log and tool.log)",
            flush=True,
        )
        if SCRIPT:
            scenario()
            print("\nThe scenario passed.", flush=True)
        if EXIT_AFTER:
            return 0
        key = f"demo-{int(time.time())}"
        print(
            f"""
Try it yourself. Send this twice; the second answer is a replay:

  curl -i -X POST {PROXY}/tickets -H 'Idempotency-Key: {key}' \\
       -H 'Content-Type: application/json' -d '{{"title": "printer on fire"}}'

With -H 'X-Demo-Drop-Answer: 1' the tool files the ticket and drops its answer
(use a new key); the retry is then reconciled. What the tool filed, and the ledger:

  curl {TOOL}/tickets
  {shown(Path(sys.executable))} -m idemproxy ops list{"" if ADMIN_PORT == 8081 else f" --admin {ADMIN}"}

Health: curl {ADMIN}/readyz    Ctrl-C stops both.
""",
            flush=True,
        )
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        print(f"demo: a child process exited; stopping (see {STATE}/proxy.log, {STATE}/tool.log)", file=sys.stderr)
        return 1
    except Failed as failure:
        print(f"\ndemo: FAILED at {STEP[0]}: {failure}", file=sys.stderr, flush=True)
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
