"""Counters, gauges and histograms for the metrics updated on every request.

prometheus-client's own classes take a lock and make several interpreted calls
per update (0.3 µs for ``inc``, 0.7 µs for ``observe``; four histograms, a
counter and a gauge per forwarded request: about 6% of its CPU at c=64). These
keep their values in plain compiled attributes instead and hand prometheus-client
the finished families when the registry collects them, so the exposition is the
same, byte for byte, as prometheus-client's classes give (``tests/ops/test_metric_families.py``).

They are only for one process: with several workers (``PROMETHEUS_MULTIPROC_DIR``
set) values must go through prometheus-client's files to be aggregated, and
``counter``, ``gauge`` and ``histogram`` return its classes instead.

Updates and collection both run on the event loop's thread, so nothing here
locks (compiled code is not interrupted between two updates of one value).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, Final, Literal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

#: Whether values are shared with other workers through prometheus-client's files; read at
#: import, as prometheus-client decides its own value class.
SHARED: Final = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

#: How a gauge's values from several workers combine (prometheus-client's ``multiprocess_mode``).
CombinedAs = Literal[
    "all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent", "livemostrecent"
]


class Value:
    """A counter's or gauge's value for one label set."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class Observations:
    """A histogram's observations for one label set: a count per bucket (not cumulative) and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.sum += amount
        at = 0
        for bound in self.bounds:
            if amount <= bound:
                break
            at += 1
        self.counts[at] += 1


class _Family:
    """One metric's label sets; each kind registers itself with its registry, as a collector,
    once it is whole."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)

    def _check(self, values: tuple[str, ...]) -> None:
        """Refused as prometheus-client refuses it: labels on an unlabelled metric, or the wrong count."""
        if not self.labelnames:
            raise ValueError(f"{self.name} has no labels")
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected, got {len(values)}")

    def _unlabelled(self) -> None:
        if self.labelnames:
            raise ValueError(f"{self.name} is labelled: update labels(...)")

    def describe(self) -> list[Metric]:
        return [self._family()]

    def _family(self) -> Metric:
        raise NotImplementedError


class ValueFamily(_Family):
    """A counter or a gauge; ``labels(...)`` gives the value to update (and, unlabelled, the family itself)."""

    def __init__(
        self, kind: str, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self.kind = kind
        self._values: dict[tuple[str, ...], Value] = {}
        self._value = Value()  # of an unlabelled family
        registry.register(self)

    def labels(self, *values: str) -> Value:
        found = self._values.get(values)
        if found is None:
            self._check(values)
            found = self._values[values] = Value()
        return found

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled()
        self._value.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self._unlabelled()
        self._value.value -= amount

    def set(self, value: float) -> None:
        self._unlabelled()
        self._value.value = value

    def _family(self) -> Metric:
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family: Any = self._family()
        if not self.labelnames:
            family.add_metric((), self._value.value)
        for values, value in list(self._values.items()):
            family.add_metric([str(label) for label in values], value.value)  # a StrEnum: its value
        yield family


class HistogramFamily(_Family):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self.bounds = tuple(float(bound) for bound in buckets if bound != float("inf"))
        # The ``le`` values as prometheus-client writes them (untyped in 0.26).
        self._les = [floatToGoString(bound) for bound in self.bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self._observations: dict[tuple[str, ...], Observations] = {}
        registry.register(self)

    def labels(self, *values: str) -> Observations:
        found = self._observations.get(values)
        if found is None:
            self._check(values)
            found = self._observations[values] = Observations(self.bounds)
        return found

    def _family(self) -> Metric:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family: Any = self._family()
        for values, observed in list(self._observations.items()):
            cumulative, buckets = 0, []
            for le, count in zip(self._les, observed.counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric([str(label) for label in values], buckets, observed.sum)
        yield family


def counter(
    name: str, documentation: str, labelnames: Sequence[str] = (), registry: CollectorRegistry = REGISTRY
) -> Any:
    if SHARED:
        return Counter(name, documentation, labelnames, registry=registry)
    return ValueFamily("counter", name, documentation, labelnames, registry)


def gauge(
    name: str,
    documentation: str,
    labelnames: Sequence[str] = (),
    *,
    multiprocess_mode: CombinedAs,
    registry: CollectorRegistry = REGISTRY,
) -> Any:
    if SHARED:
        return Gauge(name, documentation, labelnames, registry=registry, multiprocess_mode=multiprocess_mode)
    return ValueFamily("gauge", name, documentation, labelnames, registry)


def histogram(
    name: str,
    documentation: str,
    labelnames: Sequence[str],
    buckets: Sequence[float],
    registry: CollectorRegistry = REGISTRY,
) -> Any:
    if SHARED:
        return Histogram(name, documentation, labelnames, buckets=buckets, registry=registry)
    return HistogramFamily(name, documentation, labelnames, buckets, registry)
