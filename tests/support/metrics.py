"""Metrics as Prometheus reads them (``Scrape``, compared as a ``Delta``: the registry is
process-global, so counters are compared after minus before), and ``Env``: a proxy and its
admin app over one store, for the metrics tests (``tests/ops/test_metrics_*.py``; the
``make_env`` fixture is in ``tests/ops/conftest.py``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from idemproxy.config.settings import ProxyConfig, parse_config
from idemproxy.protocol import ANONYMOUS
from idemproxy.protocol.keys import Scope, operation_id
from idemproxy.store import Store
from tests.support.upstream import Upstream

Client = TestClient[Any, Any]


class Scrape:
    """One parsed ``/metrics`` answer."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[Sample] = [
            sample for family in text_string_to_metric_families(text) for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels`` (0 when there are none)."""
        return sum(
            sample.value
            for sample in self.samples
            if sample.name == name and all(sample.labels.get(key) == wanted for key, wanted in labels.items())
        )

    def label_values(self) -> Iterator[tuple[str, str, str]]:
        for sample in self.samples:
            for label, value in sample.labels.items():
                yield sample.name, label, value


async def scrape(admin: Client) -> Scrape:
    response = await admin.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return Scrape(await response.text())


@dataclass
class Delta:
    before: Scrape
    after: Scrape

    def __call__(self, name: str, **labels: str) -> float:
        return self.after.value(name, **labels) - self.before.value(name, **labels)


@dataclass
class Env:
    proxy: Client
    admin: Client
    upstream: Upstream
    store: Store
    route: str

    def op_id(self, key: str, caller: str = ANONYMOUS) -> str:
        return operation_id(Scope(caller=caller, route=self.route, key=key))

    async def measure(self, drive: Callable[[Env], Awaitable[None]]) -> Delta:
        before = await scrape(self.admin)
        await drive(self)
        return Delta(before, await scrape(self.admin))


EnvFactory = Callable[..., Awaitable[Env]]


def config_for(upstream: Upstream, route: str, log_keys: bool = False, **policy: Any) -> ProxyConfig:
    return parse_config(
        {
            "store": "sqlite:///unused.db",
            "log_keys": log_keys,
            "routes": [{"prefix": "/", "name": route, "upstream": upstream.url, **policy}],
        }
    )
