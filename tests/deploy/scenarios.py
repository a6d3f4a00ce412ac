"""The chart's scenarios as the chart tests render them (``tests/deploy/test_chart_*.py``): each
values file under ``helm/idemproxy/ci/`` and the sidecar example chart ``helm/examples/agent``,
rendered once per cluster kind, where to find the idemproxy pod, container and
configuration in what they render, and the configuration its proxy runs (``loaded_config``).
(The example chart is built with its dependencies by the
``agent_chart`` fixture, ``tests/deploy/conftest.py``.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from idemproxy.config.settings import ProxyConfig, load_config
from tests.deploy.charts import AGENT_EXAMPLE, CHART, MONITORING_API, REPO, Manifest, load_values, render
from tests.deploy.dockerfile import parse

CI = CHART / "ci"
FULLNAME = "demo-idemproxy"
CONFIG_PATH = "/etc/idemproxy/config.yaml"
SECRET_STORE_URL = "redis+cluster://:s3cret@redis-cluster.redis.svc:6379"


@dataclass(frozen=True)
class Scenario:
    id: str
    chart: Path  # the chart to render (the agent example is built into a temporary copy)
    values: dict[str, Any]
    mode: str  # standalone or sidecar
    store_url: str  # the store the container ends up using
    values_file: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _ci(name: str, mode: str, store_url: str) -> Scenario:
    path = CI / f"{name}-values.yaml"
    return Scenario(name, CHART, load_values(path), mode, store_url, values_file=path)


SCENARIOS = [
    _ci("sqlite", "standalone", "sqlite:////var/lib/idemproxy/ledger.db"),
    _ci(
        "standalone",
        "standalone",
        "redis+sentinel://redis-sentinel.redis.svc:26379,redis-sentinel-1.redis.svc:26379/mymaster/0",
    ),
    _ci("redis", "standalone", f"redis://{FULLNAME}-redis:6379/0"),
    _ci("secret", "standalone", SECRET_STORE_URL),
    _ci("sidecar", "sidecar", "redis+cluster://redis-cluster-0.redis.svc:6379,redis-cluster-1.redis.svc:6379"),
    Scenario("agent-native", AGENT_EXAMPLE, {}, "sidecar", SECRET_STORE_URL),
    Scenario(
        "agent-classic", AGENT_EXAMPLE, {"idemproxy": {"sidecar": {"native": False}}}, "sidecar", SECRET_STORE_URL
    ),
]
IDS = [scenario.id for scenario in SCENARIOS]
#: The scenarios that render a pod running idemproxy (the sidecar chart alone renders none).
WITH_POD = [scenario for scenario in SCENARIOS if scenario.id != "sidecar"]
POD_IDS = [scenario.id for scenario in WITH_POD]


def chart_of(scenario: Scenario, agent_chart: Path) -> Path:
    return agent_chart if scenario.chart == AGENT_EXAMPLE else scenario.chart


_rendered: dict[tuple[str, bool], list[Manifest]] = {}


def rendered(scenario: Scenario, agent_chart: Path, *, crds: bool = True) -> list[Manifest]:
    """The scenario's objects, on a cluster that serves monitoring.coreos.com/v1 (``crds``) or not."""
    key = (scenario.id, crds)
    if key not in _rendered:
        api_versions = [MONITORING_API] if crds else []
        _rendered[key] = render(chart_of(scenario, agent_chart), scenario.values, api_versions=api_versions)
    return _rendered[key]


def one(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [m for m in manifests if m.kind == kind and (name is None or m.name == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[str(m) for m in found]}"
    return found[0]


def pod_specs(manifests: list[Manifest]) -> Iterator[tuple[Manifest, dict[str, Any]]]:
    for manifest in manifests:
        if manifest.kind in ("Deployment", "StatefulSet"):
            yield manifest, manifest.body["spec"]["template"]["spec"]


def idemproxy_container(manifests: list[Manifest]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the pod spec, the idemproxy container) of the one pod that runs idemproxy."""
    found = [
        (spec, container)
        for _, spec in pod_specs(manifests)
        for container in [*(spec.get("initContainers") or []), *spec["containers"]]
        if container["name"] == "idemproxy"
    ]
    assert len(found) == 1, f"expected one idemproxy container, got {len(found)}"
    return found[0]


def config_text(manifests: list[Manifest]) -> str:
    return str(one(manifests, "ConfigMap", FULLNAME).body["data"]["config.yaml"])


def secret_environment(container: dict[str, Any]) -> dict[str, str]:
    """What Kubernetes would put into the variables the container takes from Secrets."""
    secrets = {}
    for variable in container.get("env", []):
        if "secretKeyRef" in variable.get("valueFrom", {}):
            name = variable["name"]
            secrets[name] = SECRET_STORE_URL if name == "IDEMPROXY_STORE" else f"secret-of-{name}"
    return secrets


def loaded_config(manifests: list[Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ProxyConfig:
    """The configuration the container's proxy runs: the image's environment, then the
    container's (as Kubernetes applies them), then the file, read by the real parser."""
    spec, container = idemproxy_container(manifests)
    assert container["args"][:2] == ["--config", CONFIG_PATH]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(Path(CONFIG_PATH).parent))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == FULLNAME

    environ = parse(REPO / "Dockerfile").final.env({"PATH": "/usr/local/bin:/usr/bin"})
    environ.update({v["name"]: v["value"] for v in container.get("env", []) if "value" in v})
    environ.update(secret_environment(container))
    for name, value in secret_environment(container).items():
        monkeypatch.setenv(name, value)  # `env:NAME` references read the process environment
    path = tmp_path / "config.yaml"
    path.write_text(config_text(manifests), encoding="utf-8")
    return load_config(path, environ=environ)


def reachable_ports(config: ProxyConfig) -> set[int]:
    """The ports the proxy listens on beyond the pod's loopback."""
    listeners = (config.listen, config.admin_listen, config.metrics_listen)
    return {listener.port for listener in listeners if listener is not None and not listener.is_loopback}
