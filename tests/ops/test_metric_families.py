"""The per-request metric families expose exactly what prometheus-client's classes would."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from idemproxy import metric_families
from idemproxy.metric_families import HistogramFamily, ValueFamily
from idemproxy.protocol import Decision

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: Every bound itself (an observation equal to a bound is in that bucket), just off it, zero,
#: negative, and beyond the last.
EDGES = [value for bound in BUCKETS for value in (bound, bound * 0.999999, bound * 1.000001)]
EDGES += [0.0, -1.0, 61.0, 1e9, float("inf")]


def two_registries() -> tuple[CollectorRegistry, CollectorRegistry]:
    return CollectorRegistry(auto_describe=True), CollectorRegistry(auto_describe=True)


def test_a_histogram_exposes_what_prometheus_clients_would() -> None:
    theirs, ours = two_registries()
    reference = Histogram("t_seconds", "Time.", ["route", "method"], buckets=BUCKETS, registry=theirs)
    family = HistogramFamily("t_seconds", "Time.", ["route", "method"], BUCKETS, ours)
    values = EDGES + [random.Random(7).expovariate(200) for _ in range(2_000)]
    for at, value in enumerate(values):
        labels = ("a", "POST") if at % 3 else ('b "quoted"\n', "other")
        reference.labels(*labels).observe(value)
        family.labels(*labels).observe(value)
    reference.labels("never", "GET")
    family.labels("never", "GET")

    assert generate_latest(ours) == generate_latest(theirs)
    assert b'le="+Inf",method="POST",route="a"}' in generate_latest(ours)


@pytest.mark.parametrize("kind", ["counter", "gauge"])
def test_counters_and_gauges_expose_what_prometheus_clients_would(kind: str) -> None:
    theirs, ours = two_registries()
    reference_class = Counter if kind == "counter" else Gauge
    labelled, reference_labelled = (
        ValueFamily(kind, "c", "Count.", ["route"], ours),
        reference_class("c", "Count.", ["route"], registry=theirs),
    )
    plain, reference_plain = ValueFamily(kind, "p", "Plain.", [], ours), reference_class("p", "Plain.", registry=theirs)
    for amount in (1.0, 2.5, 1e-9, 1e17):
        for family in (labelled, reference_labelled):
            family.labels("a").inc(amount)
            family.labels("b").inc()
        for family in (plain, reference_plain):
            family.inc(amount)
    if kind == "gauge":
        for family in (plain, reference_plain):
            family.dec(3)
            family.set(7)
        for family in (labelled, reference_labelled):
            family.labels("a").dec(0.5)
    labelled.labels("empty")
    reference_labelled.labels("empty")

    assert generate_latest(ours) == generate_latest(theirs)


def test_a_family_refuses_the_wrong_number_of_label_values() -> None:
    family = HistogramFamily("h", "H.", ["route", "method"], BUCKETS, CollectorRegistry())
    with pytest.raises(ValueError, match="2 label values expected, got 1"):
        family.labels("only-route")


def test_misuse_is_refused_as_prometheus_client_refuses_it() -> None:
    registry = CollectorRegistry()
    labelled = ValueFamily("counter", "l", "L.", ["route"], registry)
    plain = ValueFamily("gauge", "p", "P.", [], registry)
    with pytest.raises(ValueError, match="is labelled"):
        labelled.inc()
    with pytest.raises(ValueError, match="has no labels"):
        plain.labels()
    with pytest.raises(ValueError, match="has no labels"):
        HistogramFamily("h", "H.", [], BUCKETS, registry).labels()


def test_label_values_are_exposed_as_text() -> None:
    theirs, ours = two_registries()
    reference = Counter("d", "D.", ["decision"], registry=theirs)
    family = ValueFamily("counter", "d", "D.", ["decision"], ours)
    for target in (reference, family):
        target.labels(Decision.FORWARDED).inc()
    assert generate_latest(ours) == generate_latest(theirs)
    assert b'decision="forwarded"' in generate_latest(ours)


def test_a_name_taken_in_the_registry_is_refused_as_prometheus_client_refuses_it() -> None:
    registry = CollectorRegistry()
    Counter("taken", "Taken.", registry=registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        ValueFamily("counter", "taken", "Again.", [], registry)


def test_with_several_workers_the_families_are_prometheus_clients_own(tmp_path: Path) -> None:
    """Workers aggregate through prometheus-client's files (tests/e2e/test_workers.py scrapes them)."""
    code = (
        "from idemproxy import metrics, metric_families; "
        "print(metric_families.SHARED, type(metrics.REQUESTS).__name__, type(metrics.LEDGER_SECONDS).__name__, "
        "type(metrics.IN_FLIGHT).__name__)"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    shared = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert shared.stdout.split() == ["True", "Counter", "Histogram", "Gauge"]
    assert not metric_families.SHARED  # this process: one worker
