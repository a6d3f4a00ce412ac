"""Prometheus metrics for every decision the proxy makes.

Labels stay low-cardinality: route names come from the configuration,
methods are folded to a fixed set, decisions and results are enums. Keys,
operation ids and task ids are never labels.

With several worker processes, set ``PROMETHEUS_MULTIPROC_DIR`` (an empty
directory) before starting: ``render`` then aggregates every worker's values.
Gauges declare how they combine across processes. The metrics updated on every
request are ``metric_families``' (prometheus-client's own classes cost a lock and
several interpreted calls per update).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterable
from functools import cache
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from idemproxy import __version__, metric_families
from idemproxy.protocol import BudgetKind, Decision

# A ``_created`` series per counter and histogram doubles what Prometheus stores and nothing here
# reads it (rate() and increase() cope with restarts).
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus-client 0.26

#: Every decision a request can end in (the ``decision`` label).
DECISIONS = tuple(Decision)
#: Decisions that answered a duplicate without sending it to the tool again.
PREVENTED = frozenset(
    {
        Decision.REPLAYED,
        Decision.WAITED_REPLAYED,
        Decision.RECONCILED_FOUND,
        Decision.CONFLICT,
        Decision.UNKNOWN,
        Decision.NEEDS_ATTENTION,
        Decision.NOT_STORED,
    }
)
_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"})
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = metric_families.counter(
    "idemproxy_requests",
    "Requests handled, by the decision the proxy made.",
    ["route", "method", "decision"],
)
DUPLICATES_PREVENTED = metric_families.counter(
    "idemproxy_duplicate_side_effects_prevented",
    "Duplicate requests answered without sending them to the tool again.",
    ["route"],
)
UPSTREAM_SECONDS = metric_families.histogram(
    "idemproxy_upstream_duration_seconds",
    "Time from sending a request to the tool until its whole response was read.",
    ["route", "method"],
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_FAILURES = Counter(
    "idemproxy_upstream_failures",
    "Forwarded requests that got no complete response, by what the failure proves.",
    ["route", "kind"],
)
LEDGER_SECONDS = metric_families.histogram(
    "idemproxy_ledger_duration_seconds",
    "Time of one ledger (store) call.",
    ["operation"],
    buckets=_LATENCY_BUCKETS,
)
OVERHEAD_SECONDS = metric_families.histogram(
    "idemproxy_overhead_seconds",
    "Time a side-effecting request spent in the proxy itself (total minus upstream).",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
LEDGER_COMMIT_WRITES = Histogram(
    "idemproxy_ledger_commit_writes",
    "Writes per SQLite commit: writes that arrive while a commit is being synced share the next one "
    "(group commit); mostly 1 means the disk keeps up with the load.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
LEDGER_LOST = Gauge(
    "idemproxy_ledger_lost",
    "1 while this instance found the ledger lost or replaced (its epoch marker gone or another's) and "
    "refuses new reservations until an operator confirms (idemproxy ops confirm-ledger).",
    multiprocess_mode="livemax",
)
RECORDS_VANISHED = Counter(
    "idemproxy_ledger_records_vanished",
    "Operation records the store lost while their attempt was in flight (a failover to a replica "
    "that never had them): found when renewing the lease, or when recording the outcome (then recreated).",
    ["where"],
)
LEDGER_FAILOVERS = Counter(
    "idemproxy_ledger_failovers",
    "Times the store started following another master (the sentinels named a new one, or the Redis "
    "Cluster's masters changed): the promoted replica may lack writes the old master acknowledged, so the "
    "answers this instance kept in memory were forgotten and the epoch checked.",
)
STORE_ERRORS = Counter(
    "idemproxy_store_errors",
    "Ledger calls that failed because the store was unreachable.",
    ["operation"],
)
IN_FLIGHT = metric_families.gauge(
    "idemproxy_in_flight_operations",
    "Operations this proxy has forwarded and not yet recorded an outcome for.",
    multiprocess_mode="livesum",
)
UNRESOLVED = Gauge(
    "idemproxy_unresolved_operations",
    "Operations in the ledger whose outcome is not final, by state (the whole deployment's count).",
    ["state"],
    # Every worker refreshes the same deployment-wide count; the most recent
    # live one is right (a replaced worker's last value must not linger).
    multiprocess_mode="livemostrecent",
)
PROBES = Counter(
    "idemproxy_reconciler_probes",
    "Reconciliation probes, by result (found, absent, unknown).",
    ["route", "result"],
)
BUDGET_REFUSALS = Counter(
    "idemproxy_budget_refusals",
    "Attempts refused because a budget was spent, by budget (identity-calls, task-calls, attempts).",
    ["route", "kind"],
)
RECONCILED = Counter(
    "idemproxy_reconciled_operations",
    "Operations whose unknown outcome was settled, by how (found, absent, escalated, resolved).",
    ["route", "outcome"],
)
STORE_UNSAFE = Gauge(
    "idemproxy_store_unsafe",
    "1 while the ledger store is configured so that it can lose records, by reason "
    "(eviction: a Redis maxmemory-policy other than noeviction), as last checked.",
    ["reason"],
    multiprocess_mode="livemax",
)
OPEN_CONNECTIONS = metric_families.gauge(
    "idemproxy_open_connections",
    "Connections open on the proxy listener.",
    multiprocess_mode="livesum",
)
REFUSED_CONNECTIONS = Counter(
    "idemproxy_refused_connections",
    "Connections to the proxy listener closed at once because max_connections were open.",
)
BUILD_INFO = Gauge(
    "idemproxy_build_info",
    "Version information; always 1.",
    ["version", "python"],
    multiprocess_mode="livemax",
)
BUILD_INFO.labels(__version__, platform.python_version()).set(1)


_STORE_OPERATIONS = ("reserve", "record", "count", "charge")
_FAILURE_KINDS = ("connect", "timeout", "connection-lost")
_PROBE_RESULTS = ("found", "absent", "unknown")
_RECONCILE_OUTCOMES = ("found", "absent", "escalated", "resolved")
_ALERTED_DECISIONS = (Decision.FAIL_CLOSED, Decision.FAIL_OPEN, Decision.NEEDS_ATTENTION, Decision.ERROR)
#: The ``where`` labels of ``RECORDS_VANISHED``.
VANISHED_WHERE = ("lease", "record")
#: The ``reason`` labels of ``STORE_UNSAFE``.
UNSAFE_REASONS = ("eviction",)


def initialize(routes: Iterable[tuple[str, Iterable[str]]]) -> None:
    """Create the label sets alerts watch at 0, so their first event is a visible increase.

    ``routes``: (route name, side-effecting methods) pairs."""
    for operation in _STORE_OPERATIONS:
        STORE_ERRORS.labels(operation)
    for reason in UNSAFE_REASONS:
        STORE_UNSAFE.labels(reason)
    for where in VANISHED_WHERE:
        RECORDS_VANISHED.labels(where)
    for route, methods in routes:
        DUPLICATES_PREVENTED.labels(route)
        for kind in _FAILURE_KINDS:
            UPSTREAM_FAILURES.labels(route, kind)
        for result in _PROBE_RESULTS:
            PROBES.labels(route, result)
        for outcome in _RECONCILE_OUTCOMES:
            RECONCILED.labels(route, outcome)
        for budget in BudgetKind:
            BUDGET_REFUSALS.labels(route, budget.value)
        for method in methods:
            for decision in _ALERTED_DECISIONS:
                REQUESTS.labels(route, method_label(method), decision)


def method_label(method: str) -> str:
    return method if method in _METHODS else "other"


# Labelled children, looked up once per label set: ``labels()`` costs as much as
# the update itself, and these run on every request.


@cache
def _requests(route: str, method: str, decision: str) -> Any:
    return REQUESTS.labels(route, method, decision)


@cache
def _prevented(route: str) -> Any:
    return DUPLICATES_PREVENTED.labels(route)


@cache
def overhead_seconds(route: str) -> Any:
    return OVERHEAD_SECONDS.labels(route)


def upstream_seconds(route: str, method: str) -> Any:
    return _upstream_seconds(route, method_label(method))  # the cache stays bounded: known methods only


@cache
def _upstream_seconds(route: str, method: str) -> Any:
    return UPSTREAM_SECONDS.labels(route, method)


@cache
def _ledger_seconds(operation: str) -> Any:
    return LEDGER_SECONDS.labels(operation)


def count_request(route: str, method: str, decision: str) -> None:
    _requests(route, method_label(method), decision).inc()
    if decision in PREVENTED:
        _prevented(route).inc()


class Timer:
    """Observes the seconds its ``with`` block took in ``histogram`` (a class: a
    generator-based context manager costs several times as much per request)."""

    __slots__ = ("_histogram", "_started", "elapsed_s")

    def __init__(self, histogram: Any) -> None:
        self._histogram = histogram
        self._started = 0.0
        self.elapsed_s = 0.0

    def __enter__(self) -> Timer:
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.elapsed_s = time.perf_counter() - self._started
        self._histogram.observe(self.elapsed_s)


def ledger_timer(operation: str) -> Timer:
    return Timer(_ledger_seconds(operation))


def render() -> tuple[bytes, str]:
    """The exposition for /metrics, aggregated across workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
