"""The monitoring kit as the monitoring tests read it (``tests/ops/test_monitoring.py``): what
``idemproxy.metrics`` exposes, the dashboard and the alert rules, ``promtool`` and a real
Prometheus scraping real ``idemproxy run`` processes.

``promtool`` and ``prometheus`` come from Debian's ``prometheus`` package, which
``make test`` installs (``scripts/bootstrap.sh monitoring``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml
from aiohttp.test_utils import TestClient
from prometheus_client.metrics import MetricWrapperBase

from idemproxy import metrics
from idemproxy.metric_families import HistogramFamily, ValueFamily
from tests.support.redis_server import free_port
from tests.support.upstream import Upstream

T = TypeVar("T")
Client = TestClient[Any, Any]
REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "monitoring" / "grafana" / "idemproxy-dashboard.json"
ALERTS = REPO / "monitoring" / "prometheus" / "alerts.yml"
ALERT_TESTS = REPO / "monitoring" / "prometheus" / "alerts_test.yml"
#: Where the metrics table and the alerts' runbooks are documented.
METRICS_DOC = REPO / "docs" / "metrics.md"
DATASOURCE = "${datasource}"
ROUTE = "tools"
METRIC_NAME = re.compile(r"\bidemproxy_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(idemproxy_[a-z0-9_]+)\s*\{([^}]*)\}")
LIMIT_S = 60.0  # bound of every wait on Prometheus (it scrapes and evaluates every second)


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not on PATH; `sh scripts/bootstrap.sh monitoring` installs it"
    return path


def run_tool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool(args[0]), *args[1:]],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# -- what proxy/metrics.py exposes -----------------------------------------------------------------------


_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "gauge": ("",)}


@dataclass(frozen=True)
class Family:
    name: str
    kind: str
    labels: frozenset[str]

    @property
    def samples(self) -> set[str]:
        return {self.name + suffix for suffix in _SUFFIXES[self.kind]}


def exposed_families() -> dict[str, Family]:
    families: dict[str, Family] = {}
    for collector in vars(metrics).values():
        if isinstance(collector, MetricWrapperBase):
            names = collector._labelnames
        elif isinstance(collector, ValueFamily | HistogramFamily):  # the per-request ones
            names = collector.labelnames
        else:
            continue
        [described] = collector.describe()
        labels = frozenset(names) | ({"le"} if described.type == "histogram" else set())
        families[described.name] = Family(described.name, described.type, labels)
    return families


def exposed_samples() -> dict[str, Family]:
    """Sample name (``idemproxy_requests_total``) -> its family."""
    return {sample: family for family in exposed_families().values() for sample in family.samples}


# -- the dashboard ---------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def data_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel but rows, including those inside collapsed rows."""
    found: list[dict[str, Any]] = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def panel_exprs(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(``panel title/refId``, expr) for every target of every panel."""
    return [
        (f"{panel['title']}/{target['refId']}", target["expr"])
        for panel in data_panels(board)
        for target in panel.get("targets", [])
    ]


def concrete(expr: str, route: str = ".*") -> str:
    """A panel expression as Grafana sends it, with the dashboard's variables filled in."""
    filled = (
        expr.replace("$__rate_interval", "30s")
        .replace("$__range", "1h")
        .replace("$__interval", "5s")
        .replace("${route}", route)
        .replace("$route", route)
        .replace("$namespace", ".*")
        .replace("$job", ".*")
        .replace("$instance", ".*")
    )
    assert "$" not in filled, f"unreplaced variable in {expr!r}"
    return filled


# -- alert rules -----------------------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of ``markdown``."""
    anchors = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (heading := re.match(r"#{1,6} (.+)", line)):
            text = heading.group(1).strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


# -- real processes and a real Prometheus ----------------------------------------------------------------


@dataclass
class Running:
    """A child process whose stderr is read continuously (it never blocks on a full pipe)."""

    process: asyncio.subprocess.Process
    lines: list[bytes] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    ended: bool = False
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.lines.append(line)
            async with self.changed:
                self.changed.notify_all()
        async with self.changed:
            self.ended = True
            self.changed.notify_all()

    def count(self, marker: bytes) -> int:
        return sum(1 for line in self.lines if marker in line)

    async def wait_for(self, marker: bytes, times: int = 1) -> None:
        """Until ``marker`` has been logged ``times`` times."""
        async with asyncio.timeout(LIMIT_S), self.changed:
            await self.changed.wait_for(lambda: self.ended or self.count(marker) >= times)
        if self.count(marker) < times:
            raise AssertionError(f"stderr ended before {marker!r} x{times}: {b''.join(self.lines[-30:])!r}")


@contextlib.asynccontextmanager
async def running(*command: str, env: dict[str, str] | None = None) -> AsyncIterator[Running]:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env
    )
    child = Running(process)
    child.reader = asyncio.create_task(child.read())
    try:
        yield child
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()
        await child.reader


async def until(
    check: Callable[[], Awaitable[T | None]], what: str, limit_s: float = LIMIT_S, every_s: float = 0.2
) -> T:
    """Poll ``check`` until it returns something truthy (an external process's progress)."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {limit_s:g}s waiting for {what}")
        await asyncio.sleep(every_s)


@dataclass
class Prometheus:
    session: aiohttp.ClientSession
    url: str

    async def api(self, path: str, **params: str) -> Any:
        async with self.session.get(f"{self.url}/api/v1/{path}", params=params) as response:
            body = await response.json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    async def query(self, promql: str) -> list[dict[str, Any]]:
        data = await self.api("query", query=promql)
        assert data["resultType"] == "vector", promql
        result: list[dict[str, Any]] = data["result"]
        return result

    async def scalar(self, promql: str) -> float:
        result = await self.query(promql)
        return float(result[0]["value"][1]) if result else math.nan

    async def active_alerts(self) -> dict[str, list[dict[str, Any]]]:
        alerts: dict[str, list[dict[str, Any]]] = {}
        for alert in (await self.api("alerts"))["alerts"]:
            alerts.setdefault(alert["labels"]["alertname"], []).append(alert)
        return alerts


def has_finite_value(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


@contextlib.asynccontextmanager
async def prometheus_scraping(tmp_path: Path, admin_port: int) -> AsyncIterator[Prometheus]:
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "idemproxy", "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}]}],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    command = [
        tool("prometheus"),
        f"--config.file={config_file}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    async with running(*command) as child, aiohttp.ClientSession() as session:
        prometheus = Prometheus(session, f"http://127.0.0.1:{port}")

        async def ready() -> bool:
            if child.process.returncode is not None:
                raise AssertionError(f"prometheus exited: {b''.join(child.lines[-20:])!r}")
            try:
                async with session.get(f"{prometheus.url}/-/ready") as response:
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await until(ready, "prometheus to be ready", every_s=0.1)
        yield prometheus


def write_proxy_config(tmp_path: Path, upstream: Upstream, redis_url: str) -> tuple[Path, int, int]:
    listen, admin = free_port(), free_port()
    config = {
        "listen": f"127.0.0.1:{listen}",
        "admin_listen": f"127.0.0.1:{admin}",
        "store": {"url": redis_url, "socket_timeout": "500ms"},
        "routes": [
            {
                "name": ROUTE,
                "prefix": "/",
                "upstream": upstream.url,
                "reconcile": {
                    "probe": {"url": "{upstream}/lookup?key={key}", "match": "matches[0]"},
                    "found": {"status": 201},
                },
            }
        ],
    }
    path = tmp_path / "idemproxy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, listen, admin


async def drive_traffic(session: aiohttp.ClientSession, base: str, phase: str) -> list[int]:
    """Forwards, a replay, a mismatch, a lost acknowledgment and its reconciliation, a read, a rejection."""
    key = {"Idempotency-Key": f"{phase}-1"}
    lost = {"Idempotency-Key": f"{phase}-lost"}
    statuses = []
    for method, path, body, headers in [
        ("POST", "/items", {"n": 1}, key),
        ("POST", "/items", {"n": 1}, key),
        ("POST", "/items", {"n": 2}, key),
        ("POST", "/reset", {}, lost),
        ("POST", "/reset", {}, lost),
        ("GET", "/items", None, {}),
        ("POST", "/items", {}, {}),
    ]:
        async with session.request(method, f"{base}{path}", json=body, headers=headers) as response:
            await response.read()
            statuses.append(response.status)
    return statuses


async def post_status(session: aiohttp.ClientSession, url: str, key: str) -> int:
    async with session.post(url, json={}, headers={"Idempotency-Key": key}) as response:
        await response.read()
        return response.status
