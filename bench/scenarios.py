"""What is measured: the baselines, the idemproxy scenarios, and the request they all send.

A ``Scenario`` is a name plus the concurrencies it runs at; each (scenario,
concurrency) pair is one ``Run``. Adding a scenario is adding one line to
``SCENARIOS``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

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


class Subject(StrEnum):
    """What wrk talks to."""

    DIRECT = "direct"  # the upstream nginx itself
    NGINX = "nginx"  # nginx proxy_pass with keep-alive: the practical ceiling of a proxy hop
    NAIVE = "naive"  # bench/naive_proxy.py: aiohttp passthrough, no ledger
    IDEMPROXY = "idemproxy"


class Mode(StrEnum):
    """The wrk workload (``bench/wrk/workload.lua``)."""

    FRESH = "fresh"  # POST, a new key per request
    REPLAY = "replay"  # POST, only keys the proxy already completed
    MIXED = "mixed"  # POST, 10% duplicates arriving as 10 concurrent copies
    GET = "get"  # GET, no key: passthrough

    @property
    def shape(self) -> str:
        """Which baselines a run of this mode is compared with."""
        return "GET" if self is Mode.GET else "POST"


class StoreKind(StrEnum):
    NONE = "-"
    REDIS = "redis"
    SQLITE = "sqlite"


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

    @property
    def is_baseline(self) -> bool:
        return self.subject is not Subject.IDEMPROXY


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

    @property
    def label(self) -> str:
        if self.subject is Subject.IDEMPROXY:
            return self.scenario
        return f"{self.scenario} {self.mode.shape}" + (" awake" if self.awake else "")

    @property
    def is_baseline(self) -> bool:
        return self.subject is not Subject.IDEMPROXY


def settled(run: Run) -> Run:
    """The second window of a preloaded run, once Redis's key table stopped growing."""
    return replace(run, scenario=f"{run.scenario}-settled")


def plan(scenarios: list[Scenario], baselines: list[Subject]) -> list[Run]:
    """The runs, grouped by concurrency and request shape, each group's baselines first,
    so every scenario is measured right next to the baselines it is compared with.

    Without scenarios, the baselines run at every concurrency the full suite uses.
    """
    points = {(c, s.mode.shape, s.awake) for s in scenarios for c in s.concurrencies} or {
        (c, "POST", s.awake) for s in SCENARIOS for c in s.concurrencies
    }
    runs: list[Run] = []
    for concurrency, shape, awake in sorted(points, key=lambda point: (point[0], point[1] != "POST", point[2])):
        mode = Mode.GET if shape == "GET" else Mode.FRESH
        runs += [Run(subject.value, subject, mode, concurrency, awake=awake) for subject in baselines]
        runs += [
            Run(s.name, s.subject, s.mode, concurrency, s.store, s.workers, s.preloaded, s.pure, s.awake)
            for s in scenarios
            if concurrency in s.concurrencies and s.mode.shape == shape and s.awake == awake
        ]
    return runs
