"""What is measured: the baselines, the idemproxy scenarios, and the requests they send.

A ``Scenario`` is a name plus the concurrencies it runs at; each (scenario,
concurrency) pair is one ``Run``. Adding a scenario is adding one line to
``SCENARIOS``. A run speaks one of two protocols (``Protocol``): a plain HTTP
tool call, or an MCP ``tools/call`` over Streamable HTTP; each has its
``Workload``, the request sent and the upstream's fixed answer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from idemproxy.protocol import DEFAULT_KEY_META

#: The request every POST workload sends (fixed, so replays match the fingerprint).
REQUEST_PATH = "/v1/tickets"
REQUEST_BODY = b'{"title":"printer on fire","queue":"ops","priority":"high","requester":"agent-7"}'
#: The upstream's fixed answer: a small JSON body, like a typical tool response.
UPSTREAM_BODY = (
    b'{"id":"tkt_01HZX3K9QJ7","status":"created","title":"printer on fire","queue":"ops",'
    b'"priority":"high","created_at":"2025-01-01T00:00:00Z"}'
)
#: idemproxy's defaults for a request with only ``--upstream`` and no caller header.
CALLER = "anonymous"
ROUTE = "default"

#: Where a request body carries its operation key (``bench/wrk/workload.lua`` fills it in).
KEY_SLOT = "@KEY@"
#: The MCP endpoint: the upstream answers ``tools/call`` there, idemproxy's MCP route sits on it.
MCP_PATH = "/mcp"
MCP_TOOL = "create_ticket"
#: A ``tools/call`` as an MCP client sends it over Streamable HTTP: the same arguments as
#: ``REQUEST_BODY``, the operation key in ``params._meta`` (as ``McpOperationKeys`` puts it).
#: Its JSON-RPC id is always 1: every POST gets its answer on its own HTTP response
#: (sessionless), so the upstream's fixed answer can carry the same id.
MCP_REQUEST_BODY = (
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"' + MCP_TOOL.encode() + b'",'
    b'"arguments":' + REQUEST_BODY + b","
    b'"_meta":{"' + DEFAULT_KEY_META.encode() + b'":"' + KEY_SLOT.encode() + b'"}}}'
)
#: The MCP server's fixed answer to it: a JSON-RPC result, ``application/json``.
MCP_UPSTREAM_BODY = (
    b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"created tkt_01HZX3K9QJ7"}],'
    b'"structuredContent":' + UPSTREAM_BODY + b',"isError":false}}'
)
#: What Streamable HTTP asks a client to accept on every POST.
MCP_ACCEPT = "application/json, text/event-stream"


@dataclass(frozen=True, slots=True)
class Workload:
    """The POST a protocol's runs send, and the upstream's fixed answer to it."""

    path: str
    #: The body; where it holds ``KEY_SLOT`` the key goes there instead of the key header.
    body: bytes
    #: What the upstream answers (and a replay must give back, byte for byte).
    answer: bytes
    #: Sent with every request, besides ``Content-Type: application/json`` and the key.
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def key_in_body(self) -> bool:
        return KEY_SLOT.encode() in self.body

    def body_for(self, key: str) -> bytes:
        return self.body.replace(KEY_SLOT.encode(), key.encode())

    def headers_for(self, key: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json", **dict(self.headers)}
        if not self.key_in_body:
            headers["Idempotency-Key"] = key
        return headers


HTTP_WORKLOAD = Workload(REQUEST_PATH, REQUEST_BODY, UPSTREAM_BODY)
MCP_WORKLOAD = Workload(MCP_PATH, MCP_REQUEST_BODY, MCP_UPSTREAM_BODY, (("Accept", MCP_ACCEPT),))


class Protocol(StrEnum):
    """What the requests of a run are."""

    HTTP = "http"  # POST /v1/tickets, the key in Idempotency-Key (GET for the passthrough)
    MCP = "mcp"  # POST /mcp, a JSON-RPC tools/call, the key in params._meta

    @property
    def workload(self) -> Workload:
        return MCP_WORKLOAD if self is Protocol.MCP else HTTP_WORKLOAD


#: The upstream's answers by path: nginx serves each with ``return 200``.
UPSTREAM_ANSWERS = {"/": UPSTREAM_BODY, MCP_PATH: MCP_UPSTREAM_BODY}


class Subject(StrEnum):
    """What wrk talks to."""

    DIRECT = "direct"  # the upstream nginx itself
    NGINX = "nginx"  # nginx proxy_pass with keep-alive: the practical ceiling of a proxy hop
    NAIVE = "naive"  # bench/naive_proxy.py: aiohttp passthrough, no ledger
    IDEMPROXY = "idemproxy"


class Shape(StrEnum):
    """The request a run sends, as far as the baselines go: a run is compared with the
    baselines of its shape (and concurrency and idle regime)."""

    POST = "POST"  # POST /v1/tickets
    MCP = "MCP"  # POST /mcp, a tools/call
    GET = "GET"  # GET /v1/tickets

    def baseline_mode(self) -> Mode:
        return Mode.GET if self is Shape.GET else Mode.FRESH

    def protocol(self) -> Protocol:
        return Protocol.MCP if self is Shape.MCP else Protocol.HTTP


class Mode(StrEnum):
    """The wrk workload (``bench/wrk/workload.lua``)."""

    FRESH = "fresh"  # POST, a new key per request
    REPLAY = "replay"  # POST, only keys the proxy already completed
    MIXED = "mixed"  # POST, 10% duplicates arriving as 10 concurrent copies
    GET = "get"  # GET, no key: passthrough

    @property
    def shape(self) -> Shape:
        """Which baselines a plain HTTP run of this mode is compared with."""
        return Shape.GET if self is Mode.GET else Shape.POST


def shape_of(mode: Mode, protocol: Protocol) -> Shape:
    return Shape.MCP if protocol is Protocol.MCP else mode.shape


class StoreKind(StrEnum):
    NONE = "-"
    REDIS = "redis"
    SQLITE = "sqlite"
    #: SQLite with ``store.sqlite_synchronous: normal`` (synced at checkpoints only).
    SQLITE_NORMAL = "sqlite-normal"


BASELINES = (Subject.DIRECT, Subject.NGINX, Subject.NAIVE)


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    subject: Subject
    mode: Mode
    concurrencies: tuple[int, ...]
    about: str
    store: StoreKind = StoreKind.NONE
    workers: int = 1
    #: Completed records written to the ledger before measuring (0: empty ledger).
    preloaded: int = 0
    #: Run the pure-Python build (the bench's own interpreter) instead of the one under test.
    pure: bool = False
    #: Keep the CPUs out of idle while measuring (``bench.idle``); its baselines run the same way.
    awake: bool = False
    protocol: Protocol = Protocol.HTTP

    @property
    def is_baseline(self) -> bool:
        return self.subject is not Subject.IDEMPROXY

    @property
    def shape(self) -> Shape:
        return shape_of(self.mode, self.protocol)


SCENARIOS = (
    Scenario(
        "forward-redis",
        Subject.IDEMPROXY,
        Mode.FRESH,
        (1, 8, 64),
        "forward path: a fresh key per request, Redis ledger (AOF everysec), 1 worker",
        StoreKind.REDIS,
    ),
    Scenario(
        "forward-redis-pure",
        Subject.IDEMPROXY,
        Mode.FRESH,
        (1, 64),
        "forward path as above, run by the pure-Python build (no mypyc-compiled modules)",
        StoreKind.REDIS,
        pure=True,
    ),
    Scenario(
        "forward-redis-awake",
        Subject.IDEMPROXY,
        Mode.FRESH,
        (1,),
        "forward path as forward-redis, with the CPUs kept out of idle (cpu_dma_latency 0) for it and its "
        "baselines: the latency without the machine's cost of waking an idle CPU",
        StoreKind.REDIS,
        awake=True,
    ),
    Scenario(
        "forward-sqlite-awake",
        Subject.IDEMPROXY,
        Mode.FRESH,
        (1,),
        "forward path on the embedded SQLite store, with the CPUs kept out of idle as forward-redis-awake",
        StoreKind.SQLITE,
        awake=True,
    ),
    Scenario(
        "forward-redis-1m",
        Subject.IDEMPROXY,
        Mode.FRESH,
        (64,),
        "forward path with 1,000,000 completed records already in the Redis ledger",
        StoreKind.REDIS,
        preloaded=1_000_000,
    ),
    Scenario(
        "forward-redis-2w",
        Subject.IDEMPROXY,
        Mode.FRESH,
        (64,),
        "forward path, Redis ledger, 2 worker processes",
        StoreKind.REDIS,
        workers=2,
    ),
    Scenario(
        "forward-sqlite",
        Subject.IDEMPROXY,
        Mode.FRESH,
        (1, 64),
        "forward path on the embedded SQLite store (WAL, synchronous=FULL)",
        StoreKind.SQLITE,
    ),
    Scenario(
        "forward-sqlite-normal",
        Subject.IDEMPROXY,
        Mode.FRESH,
        (1, 64),
        "forward-sqlite with store.sqlite_synchronous: normal (no sync per commit; what it gives up: docs/stores.md)",
        StoreKind.SQLITE_NORMAL,
    ),
    Scenario(
        "replay-redis",
        Subject.IDEMPROXY,
        Mode.REPLAY,
        (64,),
        "replay path: every request duplicates an operation the proxy completed before measuring",
        StoreKind.REDIS,
    ),
    Scenario(
        "mixed-redis",
        Subject.IDEMPROXY,
        Mode.MIXED,
        (64,),
        "90% fresh keys, 10% duplicates arriving as 10 concurrent copies of one key",
        StoreKind.REDIS,
    ),
    Scenario(
        "passthrough-get",
        Subject.IDEMPROXY,
        Mode.GET,
        (64,),
        "safe-method passthrough: GET, no key, the ledger is not touched",
        StoreKind.REDIS,
    ),
    Scenario(
        "forward-mcp",
        Subject.IDEMPROXY,
        Mode.FRESH,
        (64,),
        "MCP forward path: a tools/call with a fresh key in params._meta per request, through an MCP route "
        "(mode: mcp), Redis ledger",
        StoreKind.REDIS,
        protocol=Protocol.MCP,
    ),
    Scenario(
        "replay-mcp",
        Subject.IDEMPROXY,
        Mode.REPLAY,
        (64,),
        "MCP replay path: every tools/call duplicates one the proxy completed before measuring",
        StoreKind.REDIS,
        protocol=Protocol.MCP,
    ),
)

BASELINE_ABOUT = {
    Subject.DIRECT: "wrk straight to the upstream nginx (no proxy hop)",
    Subject.NGINX: "nginx proxy_pass with upstream keep-alive, 1 worker",
    Subject.NAIVE: "aiohttp passthrough proxy without a ledger (bench/naive_proxy.py), 1 worker",
}


@dataclass(frozen=True, slots=True)
class Run:
    """One measurement: a scenario (or a baseline) at one concurrency."""

    scenario: str
    subject: Subject
    mode: Mode
    concurrency: int
    store: StoreKind = StoreKind.NONE
    workers: int = 1
    preloaded: int = 0
    pure: bool = False
    awake: bool = False
    protocol: Protocol = Protocol.HTTP

    @property
    def label(self) -> str:
        if self.subject is Subject.IDEMPROXY:
            return self.scenario
        return f"{self.scenario} {self.shape}" + (" awake" if self.awake else "")

    @property
    def is_baseline(self) -> bool:
        return self.subject is not Subject.IDEMPROXY

    @property
    def shape(self) -> Shape:
        return shape_of(self.mode, self.protocol)

    @property
    def workload(self) -> Workload:
        return self.protocol.workload


def settled(run: Run) -> Run:
    """The second window of a preloaded run, once Redis's key table stopped growing."""
    return replace(run, scenario=f"{run.scenario}-settled")


def plan(scenarios: list[Scenario], baselines: list[Subject]) -> list[Run]:
    """The runs, grouped by concurrency and request shape, each group's baselines first,
    so every scenario is measured right next to the baselines it is compared with.

    Without scenarios, the baselines run at every concurrency the full suite uses.
    """
    points = {(c, s.shape, s.awake) for s in scenarios for c in s.concurrencies} or {
        (c, Shape.POST, s.awake) for s in SCENARIOS for c in s.concurrencies
    }
    order = list(Shape)
    runs: list[Run] = []
    for concurrency, shape, awake in sorted(points, key=lambda point: (point[0], order.index(point[1]), point[2])):
        mode, protocol = shape.baseline_mode(), shape.protocol()
        runs += [
            Run(subject.value, subject, mode, concurrency, awake=awake, protocol=protocol) for subject in baselines
        ]
        runs += [
            _run(s, concurrency)
            for s in scenarios
            if concurrency in s.concurrencies and (s.shape, s.awake) == (shape, awake)
        ]
    return runs


def _run(s: Scenario, concurrency: int) -> Run:
    return Run(s.name, s.subject, s.mode, concurrency, s.store, s.workers, s.preloaded, s.pure, s.awake, s.protocol)
