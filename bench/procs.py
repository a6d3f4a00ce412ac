"""Child processes of a benchmark run: nginx, redis-server, the proxies, wrk.

Every child runs in its own session (so a terminal's Ctrl-C reaches only the
harness, which then stops them in order) and is told by the kernel to exit if
the harness dies without cleaning up (``PR_SET_PDEATHSIG``). ``Children``
stops whatever is still running, newest first, on any exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
LOOPBACK = "127.0.0.1"

#: The flag ``idemproxy run`` will take for its worker count. Until it
#: exists, multi-worker scenarios are reported as not available.
WORKERS_FLAG = "--workers"

_PR_SET_PDEATHSIG = 1


class BenchError(Exception):
    """A run could not be set up or measured; the message says why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def find_binary(name: str, *extra_dirs: str) -> str:
    found = shutil.which(name) or next((str(Path(d) / name) for d in extra_dirs if (Path(d) / name).is_file()), None)
    if found is None:
        raise BenchError(f"{name} is not installed; `sh scripts/bootstrap.sh bench-tools` installs it")
    return found


def die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Children:
    """Starts children and guarantees they are stopped."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._running: list[Child] = []

    def spawn(
        self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> Child:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd or self.workdir,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent,  # noqa: PLW1509  (the harness is single-threaded)
            )
        child = Child(name, process, log)
        self._running.append(child)
        return child

    def stop(self, child: Child, timeout_s: float = 10.0) -> None:
        """SIGTERM the child's process group, SIGKILL it after ``timeout_s``."""
        if child in self._running:
            self._running.remove(child)
        if child.process.poll() is not None:
            return
        self._signal_group(child, signal.SIGTERM)
        try:
            child.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._signal_group(child, signal.SIGKILL)
            child.process.wait(timeout=5)
        self._signal_group(child, signal.SIGKILL)

    def close(self) -> None:
        for child in reversed(list(self._running)):
            self.stop(child, timeout_s=5.0)

    @staticmethod
    def _signal_group(child: Child, sig: signal.Signals) -> None:
        # Each child leads its own session, so its process group id is its pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, sig)


def wait_until(
    child: Child, ready: Callable[[], bool], what: str, timeout_s: float = 20.0, interval_s: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if not child.alive():
            raise BenchError(f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}")
        if ready():
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{what} was not ready after {timeout_s:g}s:\n{child.log_tail()}")
        time.sleep(interval_s)


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 200 <= int(response.status) < 300
    except (OSError, urllib.error.URLError):
        return False


# -- nginx --------------------------------------------------------------------------------

_NGINX_MAIN = """\
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
{server}
}}
"""

_UPSTREAM_SERVER = """\
    server {{
        listen {host}:{port} backlog=4096;
        default_type application/json;
{locations}
    }}"""

_UPSTREAM_LOCATION = """\
        location {match} {{
            return 200 '{body}';
        }}"""

_PROXY_SERVER = """\
    upstream tool {{
        server {upstream};
        keepalive 128;
    }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://tool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


def start_nginx(children: Children, name: str, server_block: str, **values: str) -> tuple[Child, int]:
    """nginx as a non-daemon child with its own prefix, config, pid and logs."""
    binary = find_binary("nginx", "/usr/sbin", "/usr/local/sbin")
    prefix = children.workdir / name
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = prefix / "nginx.conf"
    server = server_block.format(host=LOOPBACK, port=port, **values)
    config.write_text(_NGINX_MAIN.format(prefix=prefix, server=server))
    argv = [binary, "-p", str(prefix), "-c", str(config), "-e", str(prefix / "error.log")]
    child = children.spawn(name, argv)
    wait_until(child, lambda: http_ok(f"http://{LOOPBACK}:{port}/"), name)
    return child, port


def start_upstream(children: Children, answers: Mapping[str, bytes]) -> tuple[Child, int]:
    """nginx answering every request with 200 and a fixed JSON body: ``answers[path]`` for
    that exact path, ``answers["/"]`` for any other."""
    return start_nginx(children, "upstream-nginx", _UPSTREAM_SERVER, locations=upstream_locations(answers))


def upstream_locations(answers: Mapping[str, bytes]) -> str:
    """nginx ``location`` blocks returning each fixed body."""
    blocks = []
    for path, body in answers.items():
        if any(char in body for char in b"'\\$"):
            raise BenchError(f"the upstream body for {path} must not contain quotes, backslashes or $ (nginx string)")
        match = "/" if path == "/" else f"= {path}"
        blocks.append(_UPSTREAM_LOCATION.format(match=match, body=body.decode()))
    return "\n".join(blocks)


def start_nginx_proxy(children: Children, upstream_port: int) -> tuple[Child, int]:
    return start_nginx(children, "nginx-proxy", _PROXY_SERVER, upstream=f"{LOOPBACK}:{upstream_port}")


# -- redis ----------------------------------------------------------------------------------


def start_redis(children: Children, name: str) -> tuple[Child, int]:
    """redis-server with AOF (fsync every second), in its own directory.

    AOF rewrites are off so a background fork never lands inside a
    measurement; RDB snapshots are off as in the test suite.
    """
    binary = find_binary("redis-server")
    directory = children.workdir / name
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [
        binary,
        "--port", str(port),
        "--bind", LOOPBACK,
        "--dir", str(directory),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--auto-aof-rewrite-percentage", "0",
        "--save", "",
        "--protected-mode", "no",
        "--daemonize", "no",
        "--logfile", "",
    ]  # fmt: skip
    child = children.spawn(name, argv)

    def ready() -> bool:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    wait_until(child, ready, name)
    return child, port


# -- the proxies -------------------------------------------------------------------------------


def start_naive(children: Children, upstream_port: int) -> tuple[Child, int]:
    port = free_port()
    argv = [
        sys.executable,
        str(BENCH_DIR / "naive_proxy.py"),
        "--upstream", f"http://{LOOPBACK}:{upstream_port}",
        "--listen", f"{LOOPBACK}:{port}",
    ]  # fmt: skip
    child = children.spawn("naive-proxy", argv)
    wait_until(child, lambda: http_ok(f"http://{LOOPBACK}:{port}/"), "the naive proxy")
    return child, port


def idemproxy_supports_workers(python: str) -> bool:
    help_text = subprocess.run(
        [python, "-m", "idemproxy", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=_idemproxy_env(),
    ).stdout
    return WORKERS_FLAG in help_text


def idemproxy_build(python: str) -> str:
    """``python``'s idemproxy build: pure Python or compiled (``idemproxy.build_info``)."""
    done = subprocess.run(
        [python, "-m", "idemproxy.build_info"], capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"{python} cannot run idemproxy: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().partition(": ")[2]


def start_idemproxy(
    children: Children,
    name: str,
    python: str,
    upstream_port: int,
    store_url: str,
    workers: int = 1,
    mcp_path: str | None = None,
    store_options: Mapping[str, str] | None = None,
) -> tuple[Child, int]:
    """idemproxy in front of the upstream: one plain route for ``/`` (``--upstream``), or,
    with ``mcp_path``, one MCP route (``mode: mcp``) on that prefix from a config file.
    ``store_options``: store keys besides the URL (a config file's ``store`` section)."""
    port, admin_port = free_port(), free_port()
    upstream = f"http://{LOOPBACK}:{upstream_port}"
    config_text = "" if mcp_path is None else mcp_config(upstream, mcp_path)
    if store_options:
        config_text += f"store:\n  url: {store_url}\n" + "".join(f"  {k}: {v}\n" for k, v in store_options.items())
    routes = ["--upstream", upstream] if mcp_path is None else []
    if config_text:
        config = children.workdir / f"{name}.yaml"
        config.write_text(config_text)
        routes += ["--config", str(config)]
    argv = [
        python, "-m", "idemproxy", "run",
        *routes,
        "--listen", f"{LOOPBACK}:{port}",
        "--admin-listen", f"{LOOPBACK}:{admin_port}",
        *([] if store_options else ["--store", store_url]),
    ]  # fmt: skip
    if workers != 1:
        argv += [WORKERS_FLAG, str(workers)]
    child = children.spawn(name, argv, env=_idemproxy_env())
    wait_until(child, lambda: http_ok(f"http://{LOOPBACK}:{admin_port}/readyz"), name)
    return child, port


def mcp_config(upstream: str, path: str) -> str:
    """A configuration with one MCP route on ``path``; listeners and store come as flags."""
    return (
        f"routes:\n  - name: mcp\n    prefix: {path}\n    upstream: {upstream}\n    mode: mcp\n    key_mode: require\n"
    )


def _idemproxy_env() -> dict[str, str]:
    # Flags decide; a stray IDEMPROXY_* in the caller's shell must not.
    return {name: value for name, value in os.environ.items() if not name.startswith("IDEMPROXY_")}
