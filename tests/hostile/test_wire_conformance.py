"""HTTP conformance on the wire (issue 22): exact bytes against a running proxy and its admin listener.

The stack: the proxy as ``idemproxy run`` serves it (``serving_proxy``) with authentication
on, its admin listener, and a raw tool that answers with the reason phrase a request asks
for, on the session's redis-server. Each test writes bytes to a socket and reads bytes back:

- credentials beyond ASCII are bad credentials (401) on both listeners, never a 500 (bytes
  that are not UTF-8 stay ``invalid-header``, as in any header);
- ``Transfer-Encoding`` in an HTTP/1.0 request is refused and the connection closed;
- versions other than HTTP/1.x get 505, HTTP/0.9 and a missing, repeated or malformed
  ``Host`` 400, and the connection closes;
- a caller that holds its body back (``Expect: 100-continue``) is refused from its head
  before it is invited to send the body;
- a tool's reason phrase reaches the caller only when it is visible ASCII.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from idemproxy.app import build_admin_app, build_proxy_app, serving_proxy
from idemproxy.config.settings import parse_config
from idemproxy.edge.auth import KEY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER
from idemproxy.store import Store, open_store
from idemproxy.store.base import OpsQuery
from idemproxy.wire.http_messages import Request, Response, StreamResponse
from idemproxy.wire.http_server import HttpServer
from idemproxy.wire.inbound import server_options
from tests.hostile.stack import internal_errors
from tests.support.auth import EXECUTOR_TOKEN, PLANNER_TOKEN, auth_setup, signed
from tests.support.redis_server import RedisServer
from tests.support.wire import BOUND_S, Connection, Reply, connected

pytestmark = pytest.mark.asyncio(loop_scope="module")

_keys = (f"conformance-{n}" for n in itertools.count())
#: Every request carries it unless a test says otherwise.
HOST = (b"Host", b"idemproxy.test")
EXECUTOR = (b"Authorization", b"Bearer " + EXECUTOR_TOKEN.encode())
#: The raw tool answers with the reason phrase whose bytes this header carries in hex.
REASON_HEADER = "X-Reason-Hex"
CREATED_HEX = b"Created".hex().encode()
#: Answers of the raw tool larger than this are streamed to the caller, not stored.
MAX_STORED = 16 * 1024


# -- requests, byte for byte ----------------------------------------------------------------------


def head(
    method: str,
    target: str,
    fields: Sequence[tuple[bytes, bytes]] = (),
    *,
    version: bytes = b"HTTP/1.1",
    host: bool = True,
) -> bytes:
    """A request head exactly as given (plus ``Host`` when ``host``)."""
    lines = [method.encode() + b" " + target.encode() + (b" " + version if version else b"")]
    lines += [name + b": " + value for name, value in ((HOST,) if host else ()) + tuple(fields)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def fields_of(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in headers.items()]


# -- the tool's side ------------------------------------------------------------------------


@dataclass
class RawTool:
    """A tool that writes its status line by hand: ``201`` with the reason phrase the request
    names in ``X-Reason-Hex`` (``Created`` without one), and a body of ``X-Body-Size`` bytes."""

    url: str = ""
    heads: list[bytes] = field(default_factory=list)  # of every request that reached it

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                fields = {}
                for line in request[:-4].split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    fields[name.strip().lower()] = value.strip()
                assert b"transfer-encoding" not in fields, "the proxy forwards whole bodies to this route"
                await reader.readexactly(int(fields.get(b"content-length", b"0")))
                self.heads.append(request)
                reason = bytes.fromhex(fields.get(REASON_HEADER.lower().encode(), CREATED_HEX).decode())
                body = orjson.dumps({"effect": len(self.heads)}).ljust(int(fields.get(b"x-body-size", b"0")))
                writer.write(
                    b"HTTP/1.1 201 %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                    % (reason, len(body), body)
                )
                await writer.drain()
        writer.close()


# -- the stack ------------------------------------------------------------------------------


@dataclass
class Conformance:
    proxy_port: int
    admin_port: int
    tool: RawTool
    store: Store

    def caller(self, port: int | None = None) -> contextlib.AbstractAsyncContextManager[Connection]:
        """A connection to the proxy listener (or to ``port``)."""
        return connected(port or self.proxy_port)

    async def exchange(self, data: bytes, port: int | None = None) -> Reply:
        async with self.caller(port) as caller:
            await caller.send(data)
            return await caller.reply()

    async def records(self) -> int:
        return len(await self.store.query(OpsQuery(limit=1000)))


@dataclass(frozen=True, slots=True)
class Mark:
    reached: int
    records: int
    errors: float


async def mark(stack: Conformance) -> Mark:
    return Mark(len(stack.tool.heads), await stack.records(), internal_errors())


async def assert_untouched_since(stack: Conformance, before: Mark) -> None:
    """Nothing reached the tool, nothing was recorded, and no request was an internal error."""
    assert stack.tool.heads[before.reached :] == [], "a refused request reached the tool"
    assert await stack.records() == before.records, "a refused request was recorded"
    assert internal_errors() == before.errors, "the proxy answered with internal-error (a bug; see the log)"


async def assert_closed_after(caller: Connection, answer: Reply) -> None:
    """The answer said the connection closes, and nothing after it was answered."""
    assert answer.closes, answer
    assert await caller.rest() == b""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Conformance]:
    redis_server.flush()
    tool = RawTool()
    tool_server = await asyncio.start_server(tool.serve, "127.0.0.1", 0)
    tool.url = f"http://127.0.0.1:{tool_server.sockets[0].getsockname()[1]}"
    identities: Path = auth_setup(tmp_path_factory.mktemp("conformance"))
    config = parse_config(
        {
            "store": redis_server.url,
            "client_header_timeout": "5s",
            "client_body_timeout": "5s",
            "auth": {"identities_file": str(identities)},
            "routes": [{"name": "items", "prefix": "/items", "upstream": tool.url, "max_stored_response": MAX_STORED}],
        }
    )
    store = open_store(config.store)
    await store.start()
    admin = web.AppRunner(build_admin_app(store, config), access_log=None, **server_options(5.0))
    await admin.setup()
    try:
        site = web.TCPSite(admin, "127.0.0.1", 0)
        await site.start()
        admin_port = admin.addresses[0][1]
        app = build_proxy_app(config, store, run_reconciler=False)
        async with serving_proxy(app, "127.0.0.1", 0, grace_s=5.0) as listening:
            yield Conformance(listening.sockets[0].getsockname()[1], admin_port, tool, store)
    finally:
        await admin.cleanup()
        await store.close()
        tool_server.close()
        await tool_server.wait_closed()


# -- 9: credentials that are not ASCII ---------------------------------------------------------------


def hmac_fields(method: str, target: str, body: bytes, key: str, **replaced: bytes) -> list[tuple[bytes, bytes]]:
    """Valid HMAC headers for the request (and its ``Idempotency-Key``), with ``replaced`` (by
    header name) swapped in."""
    given = {name.encode(): value.encode() for name, value in signed(method, target, body, key).items()}
    given.update({name.encode(): value for name, value in replaced.items()})
    return list(given.items())


#: Credentials with characters beyond ASCII, sent as UTF-8 (what a client sends for a str "\xe9").
NON_ASCII_CREDENTIALS = {
    "signature-e-acute": {SIGNATURE_HEADER: "\xe9".encode() * 64},
    "signature-fullwidth-hex": {SIGNATURE_HEADER: "\uff41".encode() * 64},
    "signature-hex-then-e-acute": {SIGNATURE_HEADER: b"ab" * 31 + "\xe9".encode()},
    "signature-kelvin-sign": {SIGNATURE_HEADER: b"ab" * 31 + "\u212a".encode() + b"a"},  # lower() is ASCII "k"
    "key-id-e-acute": {KEY_ID_HEADER: "cl\xe9".encode()},
    "timestamp-fullwidth-digits": {TIMESTAMP_HEADER: "\uff11\uff17".encode() * 5},
    "bearer-e-acute": {"Authorization": "Bearer j\xe9ton".encode()},
}
#: The same as raw bytes that are not UTF-8: refused, like in any header, before authentication.
NOT_UTF8_CREDENTIALS = {
    "signature-byte-e9": {SIGNATURE_HEADER: b"\xe9" * 64},
    "key-id-byte-e9": {KEY_ID_HEADER: b"cl\xe9"},
    "bearer-byte-e9": {"Authorization": b"Bearer j\xe9ton"},
}
CREDENTIAL_CASES = [
    *(pytest.param(replaced, 401, "unauthenticated", id=case) for case, replaced in NON_ASCII_CREDENTIALS.items()),
    *(pytest.param(replaced, 400, "invalid-header", id=case) for case, replaced in NOT_UTF8_CREDENTIALS.items()),
]


@pytest.mark.parametrize("listener", ["proxy", "admin"])
@pytest.mark.parametrize(("replaced", "status", "problem"), CREDENTIAL_CASES)
async def test_non_ascii_credentials_are_refused_as_such_on_both_listeners(
    stack: Conformance, listener: str, replaced: dict[str, bytes], status: int, problem: str
) -> None:
    """Once a 500 with a traceback: ``hmac.compare_digest`` raises ``TypeError`` for a str that is not ASCII."""
    if listener == "proxy":
        target, method, body = "/items", "POST", b"{}"
        key = next(_keys)
        port = stack.proxy_port
    else:
        target, method, body, key, port = "/_idem/ops", "GET", b"", "", stack.admin_port
    if "Authorization" in replaced:
        fields = [(name.encode(), value) for name, value in replaced.items()]
        if key:
            fields.append((b"Idempotency-Key", key.encode()))
    else:
        fields = hmac_fields(method, target, body, key, **replaced)  # with the key, signed
    fields.append((b"Content-Length", b"%d" % len(body)))
    before = await mark(stack)

    answer = await stack.exchange(head(method, target, fields) + body, port)

    assert (answer.status, answer.slug()) == (status, problem), answer
    assert ("www-authenticate" in answer.headers) is (status == 401)
    await assert_untouched_since(stack, before)


async def test_a_well_formed_signature_still_authenticates_on_both_listeners(stack: Conformance) -> None:
    body, key = b"{}", next(_keys)
    fields = [*hmac_fields("POST", "/items", body, key), (b"Content-Length", b"2")]
    proxied = await stack.exchange(head("POST", "/items", fields) + body)
    admin = await stack.exchange(head("GET", "/_idem/ops", hmac_fields("GET", "/_idem/ops", b"", "")), stack.admin_port)

    assert proxied.status == 201, proxied
    assert (admin.status, admin.slug()) == (403, "forbidden"), admin  # authenticated: the signer has no ops access


# -- 10: Transfer-Encoding in HTTP/1.0 --------------------------------------------------------------


@pytest.mark.parametrize("connection", [b"keep-alive", None], ids=["keep-alive", "no-connection-field"])
async def test_transfer_encoding_in_http_1_0_is_refused_and_the_connection_closed(
    stack: Conformance, connection: bytes | None
) -> None:
    fields = [EXECUTOR, (b"Idempotency-Key", next(_keys).encode()), (b"Transfer-Encoding", b"chunked")]
    if connection is not None:
        fields.append((b"Connection", connection))
    smuggled = head("GET", "/items/smuggled", [EXECUTOR])
    before = await mark(stack)
    async with stack.caller() as caller:
        await caller.send(head("POST", "/items", fields, version=b"HTTP/1.0") + b"2\r\n{}\r\n0\r\n\r\n" + smuggled)
        answer = await caller.reply()

        assert (answer.status, answer.slug()) == (400, "malformed-request"), answer
        await assert_closed_after(caller, answer)
    await assert_untouched_since(stack, before)


async def test_http_1_0_with_a_length_is_still_served(stack: Conformance) -> None:
    fields = [EXECUTOR, (b"Idempotency-Key", next(_keys).encode()), (b"Content-Length", b"2")]
    answer = await stack.exchange(head("POST", "/items", fields, version=b"HTTP/1.0") + b"{}")

    assert answer.status == 201, answer
    assert answer.status_line == b"HTTP/1.0 201 Created"


# -- 11: versions and Host ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(head("GET", "/items", [EXECUTOR], version=b"HTTP/2.0"), id="http-2.0"),
        pytest.param(head("GET", "/items", [EXECUTOR], version=b"HTTP/3.0"), id="http-3.0"),
        pytest.param(head("GET", "/items", [EXECUTOR], version=b"HTTP/9.9"), id="http-9.9"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="http-2-prior-knowledge-preface"),
        pytest.param(
            b"GET /items HTTP/2.0\r\nHost: idemproxy.test\r\nBad Name: x\r\n\r\n", id="http-2.0-with-a-broken-head"
        ),
    ],
)
async def test_a_version_other_than_http_1_gets_505_and_the_connection_closes(stack: Conformance, data: bytes) -> None:
    before = await mark(stack)
    async with stack.caller() as caller:
        await caller.send(data + head("GET", "/items/after", [EXECUTOR]))
        answer = await caller.reply()

        assert (answer.status, answer.slug()) == (505, "http-version-not-supported"), answer
        assert answer.status_line == b"HTTP/1.1 505 HTTP Version Not Supported"
        await assert_closed_after(caller, answer)
    await assert_untouched_since(stack, before)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(head("GET", "/items", [EXECUTOR], version=b"", host=False), id="http-0.9-no-version"),
        pytest.param(head("GET", "/items", [EXECUTOR], version=b"", host=True), id="http-0.9-no-version-with-fields"),
        pytest.param(head("GET", "/items", [EXECUTOR], host=False), id="http-1.1-without-host"),
        pytest.param(head("GET", "/items", [EXECUTOR, HOST]), id="http-1.1-two-hosts"),
        pytest.param(head("GET", "/items", [EXECUTOR, HOST], version=b"HTTP/1.0"), id="http-1.0-two-hosts"),
        pytest.param(
            head("GET", "/items", [EXECUTOR, (b"Host", b"idemproxy.test/items")], host=False), id="host-with-a-path"
        ),
        pytest.param(
            head("GET", "/items", [EXECUTOR, (b"Host", b"user@idemproxy.test")], host=False), id="host-with-userinfo"
        ),
        pytest.param(head("GET", "/items", [EXECUTOR, (b"Host", b"a b")], host=False), id="host-with-a-space"),
        pytest.param(
            head("GET", "/items", [EXECUTOR, (b"Host", b"idemproxy.test:80x")], host=False), id="host-with-a-bad-port"
        ),
    ],
)
async def test_http_0_9_and_a_missing_or_bad_host_get_400_and_the_connection_closes(
    stack: Conformance, data: bytes
) -> None:
    before = await mark(stack)
    async with stack.caller() as caller:
        await caller.send(data + head("GET", "/items/after", [EXECUTOR]))
        answer = await caller.reply()

        assert (answer.status, answer.slug()) == (400, "malformed-request"), answer
        await assert_closed_after(caller, answer)
    await assert_untouched_since(stack, before)


@pytest.mark.parametrize(
    ("data", "line"),
    [
        pytest.param(
            head("GET", "/items", [EXECUTOR], version=b"HTTP/1.0", host=False),
            b"HTTP/1.0 201 Created",
            id="1.0-no-host",
        ),
        pytest.param(
            head("GET", "/items", [EXECUTOR, (b"Host", b"")], host=False), b"HTTP/1.1 201 Created", id="empty-host"
        ),
        pytest.param(
            head("GET", "/items", [EXECUTOR, (b"Host", b"[::1]:8080")], host=False), b"HTTP/1.1 201 Created", id="ipv6"
        ),
    ],
)
async def test_a_request_with_an_acceptable_host_is_served(stack: Conformance, data: bytes, line: bytes) -> None:
    answer = await stack.exchange(data)

    assert answer.status_line == line, answer


# -- 12: refused before being invited to send the body ------------------------------------------------


def expecting(fields: Sequence[tuple[bytes, bytes]], key: str, length: int) -> bytes:
    """A head that holds its body back; signed ``fields`` carry the key already."""
    keyed = any(name.lower() == b"idempotency-key" for name, _ in fields)
    given = [*fields, *([] if keyed else [(b"Idempotency-Key", key.encode())]), (b"Content-Length", b"%d" % length)]
    return head("POST", "/items", [*given, (b"Expect", b"100-continue")])


@pytest.mark.parametrize(
    "case",
    [
        "no-credentials",
        "unknown-token",
        "scope-forbids",
        "hmac-unknown-key-id",
        "hmac-malformed-signature",
        "hmac-stale",
        "hmac-incomplete",
    ],
)
async def test_a_caller_refused_by_its_head_is_not_invited_to_send_its_body(stack: Conformance, case: str) -> None:
    body, key = b"{}", next(_keys)
    stale = int(time.time()) - 3600
    fields: list[tuple[bytes, bytes]] = {
        "no-credentials": [],
        "unknown-token": [(b"Authorization", b"Bearer not-a-token")],
        "scope-forbids": [(b"Authorization", b"Bearer " + PLANNER_TOKEN.encode())],  # GET and HEAD only
        "hmac-unknown-key-id": fields_of(signed("POST", "/items", body, key, key_id="nobody")),
        "hmac-malformed-signature": hmac_fields("POST", "/items", body, key, **{SIGNATURE_HEADER: b"z" * 64}),
        "hmac-stale": fields_of(signed("POST", "/items", body, key, timestamp=stale)),
        "hmac-incomplete": [(KEY_ID_HEADER.encode(), b"signer-1")],
    }[case]
    before = await mark(stack)
    async with stack.caller() as caller:
        await caller.send(expecting(fields, key, len(body)))
        answer = await caller.reply()  # the final answer, not "100 Continue"

        assert answer.status in (401, 403), answer.status_line
        assert answer.slug() == ("forbidden" if case == "scope-forbids" else "unauthenticated")
        await caller.send(body)  # sent anyway, as a caller that waited long enough does: dropped
        await assert_closed_after(caller, answer)
    await assert_untouched_since(stack, before)


@pytest.mark.parametrize("credentials", ["bearer", "hmac"])
async def test_an_authenticated_caller_is_invited_to_send_its_body(stack: Conformance, credentials: str) -> None:
    body, key = b'{"n": 1}', next(_keys)
    fields = [EXECUTOR] if credentials == "bearer" else fields_of(signed("POST", "/items", body, key))
    async with stack.caller() as caller:
        await caller.send(expecting(fields, key, len(body)))
        interim = await caller.reply()
        await caller.send(body)
        final = await caller.reply()

    assert interim.status_line == b"HTTP/1.1 100 Continue"
    assert final.status == 201, final


async def test_a_caller_that_sends_its_body_unasked_is_not_invited_again() -> None:
    """Part of the body came with the head: the caller is not waiting for ``100 Continue``, and a
    late one would arrive in the middle of its upload. (Directly on the listener: the handler
    tells when it starts reading, after the head and the first part were parsed.)"""
    reading = asyncio.Event()

    async def echo(request: Request) -> StreamResponse:
        reading.set()
        return Response(body=await request.read())

    http = HttpServer(echo, header_timeout_s=BOUND_S, max_body=1024)
    server = await asyncio.get_running_loop().create_server(http, "127.0.0.1", 0)
    try:
        async with connected(server.sockets[0].getsockname()[1]) as caller:
            fields = [(b"Content-Length", b"8"), (b"Expect", b"100-continue")]
            await caller.send(head("PUT", "/", fields) + b"firs")
            async with asyncio.timeout(BOUND_S):
                await reading.wait()
            await caller.send(b"tail")
            answer = await caller.reply()
    finally:
        server.close()
        await http.shutdown(0)
        await server.wait_closed()

    assert (answer.status_line, answer.body) == (b"HTTP/1.1 200 OK", b"firstail")


# -- 13: the tool's reason phrase ----------------------------------------------------------------------


HOSTILE_REASONS = [
    pytest.param(b"Cre\x01ated", id="control"),
    pytest.param(b"\x1b[2J\x1b[31mpwned\x1b[0m", id="escape-sequence"),
    pytest.param(b"Created\x7f", id="del"),
    pytest.param(b"Caf\xe9", id="obs-text-latin1"),
    pytest.param("Créé".encode(), id="utf8"),
    pytest.param(b"A\x00B", id="nul"),
    pytest.param(b"A\x0bB", id="vertical-tab"),
]


@pytest.mark.parametrize("reason", HOSTILE_REASONS)
@pytest.mark.parametrize(
    ("method", "size"),
    [("GET", 0), ("GET", 200_000), ("POST", 0), ("POST", 2 * MAX_STORED)],
    ids=["passthrough", "passthrough-streamed", "recorded", "recorded-streamed"],
)
async def test_a_reason_phrase_with_anything_but_visible_ascii_is_replaced(
    stack: Conformance, reason: bytes, method: str, size: int
) -> None:
    fields = [EXECUTOR, (REASON_HEADER.encode(), reason.hex().encode()), (b"X-Body-Size", b"%d" % size)]
    if method == "POST":
        fields += [(b"Idempotency-Key", next(_keys).encode()), (b"Content-Length", b"2")]
    answer = await stack.exchange(head(method, "/items", fields) + (b"{}" if method == "POST" else b""))

    assert answer.status_line == b"HTTP/1.1 201 Created", answer.status_line
    assert len(answer.body) >= size


async def test_a_replayed_answer_carries_the_standard_reason_phrase(stack: Conformance) -> None:
    fields = [EXECUTOR, (REASON_HEADER.encode(), b"\x1b]0;owned\x07".hex().encode())]
    request = head("POST", "/items", [*fields, (b"Idempotency-Key", next(_keys).encode()), (b"Content-Length", b"2")])
    first = await stack.exchange(request + b"{}")
    replayed = await stack.exchange(request + b"{}")

    assert first.status_line == replayed.status_line == b"HTTP/1.1 201 Created"
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.body == first.body


@pytest.mark.parametrize(
    "reason", [b"Created", b"Made It\tNow", b"Fine: ~all {good} [stuff]!", b""], ids=["plain", "tab", "vchars", "empty"]
)
async def test_a_visible_ascii_reason_phrase_is_relayed_as_sent(stack: Conformance, reason: bytes) -> None:
    answer = await stack.exchange(head("GET", "/items", [EXECUTOR, (REASON_HEADER.encode(), reason.hex().encode())]))

    assert answer.status_line == b"HTTP/1.1 201 " + reason
