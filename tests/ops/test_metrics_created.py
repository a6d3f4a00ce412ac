"""No ``_created`` series: one per counter and histogram would double what Prometheus stores."""

from __future__ import annotations

from idemproxy import metrics


def test_no_created_series_are_exported() -> None:
    metrics.initialize([("route-a", ["POST"])])
    metrics.REQUESTS.labels("route-a", "POST", "forwarded").inc()

    body, _ = metrics.render()

    assert b"idemproxy_requests_total{" in body
    assert b"_created" not in body
