"""A real nginx (Debian's ``nginx`` package) as a reverse proxy in front of a recording raw
upstream, for differential tests: the same bytes through nginx and through idemproxy.

nginx runs as a non-daemon child (``bench.procs.Children``: its own session, killed with the
test process) with its own prefix, configuration, pid and logs, on a free loopback port, as a
single process (``master_process off``): no worker drops privileges to ``nobody``, which could
not write into pytest's temporary directories when the tests run as root.

The upstream is a raw threaded server, not aiohttp: whatever nginx forwards is recorded byte
for byte (head and de-chunked body), even what an HTTP library would refuse to read. It
answers every request with ``201`` and closes (nginx speaks HTTP/1.0 to it, one request per
connection). nginx's readiness check (``GET /``) is forgotten once nginx is ready.

When nginx is not installed, ``nginx_proxy`` raises ``NginxUnavailable`` saying how to install
it: ``make test`` installs it (``scripts/bootstrap.sh test-tools``), so a test should fail, not
skip, without it.
"""

from __future__ import annotations

import contextlib
import io
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import LOOPBACK, BenchError, Children, find_binary, free_port, http_ok, wait_until

INSTALL_HINT = (
    "nginx is not installed: `make test` installs it (`sh scripts/bootstrap.sh test-tools`, "
    "which runs `apt-get install nginx`); install it and retry"
)
#: The listen backlog of nginx and of the upstream: every case of a corpus connects at once.
_BACKLOG = 1024
#: How long the upstream waits for the rest of a request nginx is sending it.
_UPSTREAM_READ_S = 10.0

_CONFIG = """\
daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen {host}:{port} backlog={backlog};
        keepalive_timeout {idle_s}s;
        client_header_timeout {idle_s}s;
        client_body_timeout {idle_s}s;
        client_max_body_size {max_body};
        location / {{
            proxy_pass http://{upstream};
        }}
    }}
}}
"""


class NginxUnavailable(RuntimeError):
    """nginx is not installed; the message says how to install it."""


def nginx_binary() -> str:
    try:
        return find_binary("nginx", "/usr/sbin", "/usr/local/sbin")
    except BenchError:
        raise NginxUnavailable(INSTALL_HINT) from None


def nginx_version(binary: str) -> str:
    """``nginx/1.22.1``, as ``nginx -v`` reports it."""
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    return (done.stderr or done.stdout).strip().rpartition(" ")[2]


# -- the upstream --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Received:
    """One request as it reached the upstream: its head as sent, its body de-chunked."""

    head: bytes
    body: bytes

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def method(self) -> str:
        return self.request_line.split(b" ", 1)[0].decode("latin-1")

    @property
    def target(self) -> str:
        parts = self.request_line.split(b" ")
        return parts[1].decode("latin-1") if len(parts) > 1 else ""

    @property
    def fields(self) -> list[tuple[bytes, bytes]]:
        lines = self.head.rstrip(b"\r\n").split(b"\r\n")[1:]
        return [(name.strip(), value.strip()) for name, _, value in (line.partition(b":") for line in lines)]


@dataclass
class RecordingUpstream:
    """A threaded loopback server that records every request and answers ``201``."""

    received: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: socketserver.ThreadingTCPServer | None = None

    @property
    def authority(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def forget(self) -> None:
        with self._lock:
            self.received.clear()

    def _record(self, request: Received) -> int:
        with self._lock:
            self.received.append(request)
            return len(self.received)

    def start(self) -> None:
        upstream = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(_UPSTREAM_READ_S)
                with contextlib.suppress(OSError):
                    request = _read_request(self.rfile)
                    if request is None:
                        return
                    body = b'{"upstream": %d}' % upstream._record(request)
                    self.wfile.write(
                        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(body), body)
                    )

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            request_queue_size = _BACKLOG  # the default, 5, drops nginx's connections under a burst

        server = Server((LOOPBACK, 0), Handler)
        self._server = server
        threading.Thread(target=server.serve_forever, name="nginx-upstream", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _read_request(stream: io.BufferedIOBase) -> Received | None:
    """One request from ``stream`` (the socket's reading file): ``Content-Length`` or chunked."""
    readline, read = stream.readline, stream.read
    lines: list[bytes] = []
    while True:
        line = readline(65537)
        if not line:
            return None if not lines else Received(b"".join(lines), b"")
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            break
    head = b"".join(lines)
    fields = Received(head, b"").fields
    coding = next((value for name, value in fields if name.lower() == b"transfer-encoding"), b"")
    if coding.lower() == b"chunked":
        parts: list[bytes] = []
        while size := int(readline(65537).split(b";", 1)[0].strip() or b"0", 16):
            parts.append(read(size))
            readline(65537)
        while readline(65537) not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return Received(head, b"".join(parts))
    length = next((value for name, value in fields if name.lower() == b"content-length"), b"0")
    return Received(head, read(int(length)) if int(length) else b"")


# -- nginx ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NginxProxy:
    port: int
    upstream: RecordingUpstream
    version: str
    prefix: Path

    @property
    def error_log(self) -> Path:
        """Where nginx says why it refused a request (``client sent invalid header line``)."""
        return self.prefix / "error.log"


@contextlib.contextmanager
def nginx_proxy(workdir: Path, *, max_body: int, idle_s: int = 1) -> Iterator[NginxProxy]:
    """nginx on a free loopback port, ``proxy_pass`` to a ``RecordingUpstream``, with bodies
    over ``max_body`` refused (``client_max_body_size``) and idle keep-alive connections,
    heads and bodies that stall closed after ``idle_s`` seconds. Raises ``NginxUnavailable``
    when nginx is not installed."""
    binary = nginx_binary()
    upstream = RecordingUpstream()
    upstream.start()
    children = Children(workdir)
    try:
        prefix = workdir / "nginx"
        prefix.mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = prefix / "nginx.conf"
        config.write_text(
            _CONFIG.format(
                prefix=prefix,
                host=LOOPBACK,
                port=port,
                idle_s=idle_s,
                max_body=max_body,
                upstream=upstream.authority,
                backlog=_BACKLOG,
            )
        )
        argv = [binary, "-p", str(prefix), "-c", str(config), "-e", str(prefix / "error.log")]
        child = children.spawn("nginx", argv)
        try:
            wait_until(child, lambda: http_ok(f"http://{LOOPBACK}:{port}/"), "nginx")
        except BenchError as exc:
            raise RuntimeError(f"nginx did not start: {exc}") from None
        upstream.forget()  # the readiness check
        yield NginxProxy(port, upstream, nginx_version(binary), prefix)
    finally:
        children.close()
        upstream.stop()
