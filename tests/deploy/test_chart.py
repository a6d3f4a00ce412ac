"""The Helm chart (helm/idemproxy) in every mode, rendered and linted by Helm itself.

Each scenario is a values file under ``helm/idemproxy/ci/`` or the sidecar
example chart ``helm/examples/agent``. Every rendered object must pass
``kubernetes-validate --strict`` for the oldest and newest Kubernetes the chart
is checked against, and the proxy configuration it renders must pass
``idemproxy check-config``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

from idemproxy import __version__
from idemproxy import config as proxy_config
from idemproxy.config import load_config
from tests.deploy import sync_chart
from tests.deploy.charts import (
    AGENT_EXAMPLE,
    CHART,
    KUBERNETES_VERSIONS,
    MONITORING_API,
    REPO,
    Manifest,
    lint,
    load_values,
    notes,
    problems,
    render,
    with_dependencies,
)
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


@pytest.fixture(scope="session")
def agent_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_dependencies(AGENT_EXAMPLE, tmp_path_factory.mktemp("charts"))


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


# -- Helm and Kubernetes accept it ----------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=IDS)
def test_every_rendered_object_is_valid_kubernetes(scenario: Scenario, version: str, agent_chart: Path) -> None:
    manifests = rendered(scenario, agent_chart)
    assert manifests
    found = [problem for manifest in manifests for problem in problems(manifest, version)]
    assert not found, "\n".join(found)


LINTED = [
    pytest.param(None, id="defaults"),
    *(pytest.param(s.values_file, id=s.id) for s in SCENARIOS if s.values_file),
]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("values_file", LINTED)
def test_helm_lint_strict(values_file: Path | None, version: str) -> None:
    values = load_values(values_file) if values_file else None
    assert lint(CHART, values, version) == []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_helm_lint_strict_agent_example(version: str, agent_chart: Path) -> None:
    assert lint(agent_chart, None, version) == []


def test_strict_validation_rejects_unknown_fields(agent_chart: Path) -> None:
    """The validators are not lenient: a misspelt field is reported, for both kinds of schema."""
    manifests = rendered(SCENARIOS[1], agent_chart)
    deployment = one(manifests, "Deployment")
    deployment.body["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    monitor = one(manifests, "ServiceMonitor")
    monitor.body["spec"]["endpoints"][0]["intervall"] = "30s"
    try:
        assert any("livenesProbe" in problem for problem in problems(deployment, KUBERNETES_VERSIONS[-1]))
        assert problems(monitor, KUBERNETES_VERSIONS[-1]) == [f"{monitor}: unknown field spec.endpoints[0].intervall"]
    finally:
        _rendered.clear()


# -- the proxy inside runs what the chart meant --------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS, ids=IDS)
def test_rendered_config_passes_check_config(scenario: Scenario, agent_chart: Path, tmp_path: Path) -> None:
    manifests = rendered(scenario, agent_chart)
    pods = [spec for _, spec in pod_specs(manifests)]
    container = idemproxy_container(manifests)[1] if pods else {}
    path = tmp_path / "config.yaml"
    path.write_text(config_text(manifests), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "idemproxy", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **secret_environment(container)},  # `env:NAME` references resolve at load
    )
    assert result.returncode == 0, result.stderr
    assert ": OK: " in result.stdout


@pytest.mark.parametrize("scenario", WITH_POD, ids=POD_IDS)
def test_container_runs_the_configuration_the_chart_meant(
    scenario: Scenario, agent_chart: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's environment, then the container's (as Kubernetes applies them), then the file."""
    manifests = rendered(scenario, agent_chart)
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
    config = load_config(path, environ=environ)

    expected_listen = "127.0.0.1:8080" if scenario.mode == "sidecar" else "0.0.0.0:8080"
    assert str(config.listen) == expected_listen
    assert str(config.admin_listen) == "0.0.0.0:8081"
    assert config.store.url == scenario.store_url
    assert config.shutdown_grace_s == 10.0


@pytest.mark.parametrize("scenario", SCENARIOS, ids=IDS)
def test_pods_are_locked_down(scenario: Scenario, agent_chart: Path) -> None:
    for manifest, spec in pod_specs(rendered(scenario, agent_chart)):
        assert spec["automountServiceAccountToken"] is False, manifest
        pod_context = spec.get("securityContext", {})
        assert pod_context.get("runAsNonRoot") is True, manifest
        assert pod_context.get("seccompProfile") == {"type": "RuntimeDefault"}, manifest
        for container in [*(spec.get("initContainers") or []), *spec["containers"]]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, (manifest, container["name"])
            assert context["readOnlyRootFilesystem"] is True, (manifest, container["name"])
            assert context["capabilities"]["drop"] == ["ALL"], (manifest, container["name"])


@pytest.mark.parametrize("scenario", WITH_POD, ids=POD_IDS)
def test_probes_and_shutdown(scenario: Scenario, agent_chart: Path) -> None:
    spec, container = idemproxy_container(rendered(scenario, agent_chart))
    admin = next(port for port in container["ports"] if port["containerPort"] == 8081)
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": admin["name"]}
    assert "resources" in container
    if scenario.mode == "standalone":
        pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        assert spec["terminationGracePeriodSeconds"] > pre_stop + 10  # + shutdown_grace


# -- standalone and sidecar specifics ------------------------------------------------------------


def test_standalone_objects(agent_chart: Path) -> None:
    manifests = rendered(SCENARIOS[1], agent_chart)
    kinds = sorted(m.kind for m in manifests)
    assert kinds == sorted(
        [
            "ConfigMap",  # the proxy's configuration
            "ConfigMap",  # the dashboard
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "PrometheusRule",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ]
    )
    deployment = one(manifests, "Deployment").body
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    assert one(manifests, "PodDisruptionBudget").body["spec"]["minAvailable"] == 1
    service = one(manifests, "Service").body
    assert {port["name"]: port["port"] for port in service["spec"]["ports"]} == {"proxy": 8080, "admin": 8081}
    monitor = one(manifests, "ServiceMonitor").body
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert monitor["spec"]["endpoints"][0]["port"] == "admin"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_bundled_redis_keeps_an_append_only_file_on_a_volume(agent_chart: Path) -> None:
    manifests = rendered(SCENARIOS[2], agent_chart)
    redis = one(manifests, "StatefulSet", f"{FULLNAME}-redis").body
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "always"
    claim = redis["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert one(manifests, "Service", f"{FULLNAME}-redis").body["spec"]["ports"][0]["port"] == 6379
    assert one(manifests, "Deployment").body["spec"]["replicas"] == 2


def test_secrets_are_referenced_never_copied(agent_chart: Path) -> None:
    manifests = rendered(SCENARIOS[3], agent_chart)
    assert not [m for m in manifests if m.kind == "Secret"]
    _, container = idemproxy_container(manifests)
    env = {variable["name"]: variable for variable in container["env"]}
    assert env["IDEMPROXY_STORE"]["valueFrom"]["secretKeyRef"] == {"name": "idemproxy-store", "key": "url"}
    assert env["TOOL_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "tool-credentials", "key": "token"}
    config = yaml.safe_load(config_text(manifests))
    assert "url" not in config["store"]
    assert config["routes"][0]["upstream_headers"] == {"Authorization": "env:TOOL_API_TOKEN"}
    spec, _ = idemproxy_container(manifests)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/idemproxy-secrets/identities")
    assert mount["readOnly"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"] == {"secretName": "idemproxy-identities"}


def test_sidecar_mode_renders_no_workload_of_its_own(agent_chart: Path) -> None:
    manifests = rendered(SCENARIOS[4], agent_chart)
    assert sorted(m.kind for m in manifests) == ["ConfigMap", "ConfigMap", "PodMonitor", "PrometheusRule"]


@pytest.mark.parametrize("native", [True, False], ids=["native", "classic"])
def test_agent_example_carries_the_sidecar(native: bool, agent_chart: Path) -> None:
    manifests = rendered(SCENARIOS[5] if native else SCENARIOS[6], agent_chart)
    deployment = one(manifests, "Deployment", "demo-agent").body
    spec = deployment["spec"]["template"]["spec"]
    init = [c["name"] for c in spec.get("initContainers") or []]
    main = [c["name"] for c in spec["containers"]]
    _, container = idemproxy_container(manifests)
    if native:
        assert (init, main) == (["idemproxy"], ["agent"])
        assert container["restartPolicy"] == "Always"
        assert "lifecycle" not in container  # stopped after the agent: nothing to wait for
    else:
        assert (init, main) == ([], ["agent", "idemproxy"])
        assert "restartPolicy" not in container
        assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    agent = spec["containers"][0]
    assert {"name": "TOOL_URL", "value": "http://127.0.0.1:8080"} in agent["env"]
    assert [port["name"] for port in container["ports"]] == ["idem-admin"]  # the proxy port stays in the pod

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    monitor = one(manifests, "PodMonitor").body
    for key, value in monitor["spec"]["selector"]["matchLabels"].items():
        assert labels[key] == value
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "idem-admin"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert len(annotations["checksum/idemproxy-config"]) == 64


def test_sidecar_templates_need_sidecar_mode(agent_chart: Path) -> None:
    with pytest.raises(helm_python.HelmError, match="need the dependency's values to say mode: sidecar"):
        render(agent_chart, {"idemproxy": {"mode": "standalone"}})


# -- monitoring ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", [SCENARIOS[0], SCENARIOS[4]], ids=["standalone", "sidecar"])
def test_monitoring_objects_only_where_the_crds_are(scenario: Scenario, agent_chart: Path) -> None:
    def monitoring_kinds(manifests: list[Manifest]) -> list[str]:
        return sorted(m.kind for m in manifests if m.body["apiVersion"] == MONITORING_API)

    monitor = "ServiceMonitor" if scenario.mode == "standalone" else "PodMonitor"
    assert monitoring_kinds(rendered(scenario, agent_chart, crds=False)) == []
    expected = sorted([monitor, "PrometheusRule"])
    assert monitoring_kinds(rendered(scenario, agent_chart, crds=True)) == expected
    offline = render(CHART, {**scenario.values, "monitoring": {"assumeCRDs": True}})
    assert monitoring_kinds(offline) == expected
    assert "does not serve monitoring.coreos.com/v1" in notes(CHART, scenario.values)


def test_chart_copies_of_the_monitoring_kit_are_current() -> None:
    stale = [str(path.relative_to(REPO)) for path in sync_chart.stale_copies()]
    assert not stale, f"{stale} differ from monitoring/: run `python -m tests.deploy.sync_chart`"


def test_dashboard_configmap_is_discovered_by_grafana(agent_chart: Path) -> None:
    for scenario, namespace in ((SCENARIOS[0], "agents"), (SCENARIOS[1], "monitoring")):
        dashboard = one(rendered(scenario, agent_chart), "ConfigMap", f"{FULLNAME}-dashboard").body
        assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert dashboard["metadata"]["namespace"] == namespace
        source = json.loads((REPO / "monitoring" / "grafana" / "idemproxy-dashboard.json").read_text())
        assert json.loads(dashboard["data"]["idemproxy-dashboard.json"]) == source


def test_prometheus_rule_carries_the_tested_alerts(agent_chart: Path) -> None:
    source = yaml.safe_load((REPO / "monitoring" / "prometheus" / "alerts.yml").read_text())
    plain = one(rendered(SCENARIOS[0], agent_chart), "PrometheusRule").body
    assert plain["spec"]["groups"] == source["groups"]
    prefixed = one(rendered(SCENARIOS[1], agent_chart), "PrometheusRule").body
    for group in prefixed["spec"]["groups"]:
        for rule in group["rules"]:
            assert rule["annotations"]["runbook_url"].startswith(
                "https://git.example.com/idemproxy/blob/main/README.md#"
            )


# -- bad values fail at install time, saying why -------------------------------------------------

SCHEMA_ERRORS = [
    ({"mode": "daemonset"}, "at '/mode': value must be one of 'standalone', 'sidecar'"),
    ({"upstream": "tool:9000"}, "at '/upstream': 'tool:9000' does not match pattern"),
    ({"store": {"url": "mysql://db/ledger"}}, "at '/store/url': 'mysql://db/ledger' does not match pattern"),
    ({"replicas": 3}, "additional properties 'replicas' not allowed"),
    ({"config": {"listen": "0.0.0.0:1"}}, "at '/config': additional properties 'listen' not allowed"),
    ({"config": {"routes": [{"prefix": "/a"}]}}, "at '/config/routes/0': missing property 'upstream'"),
    (
        {"config": {"routes": [{"prefix": "/a", "upstream": "http://a", "key_mode": "sometimes"}]}},
        "at '/config/routes/0/key_mode': value must be one of 'require', 'derive', 'optional'",
    ),
    ({"config": {"route_defaults": {"retention": "forever"}}}, "at '/config/route_defaults/retention'"),
    ({"workers": 0}, "at '/workers': minimum: got 0, want 1"),
    ({"redis": {"enabled": True, "appendfsync": "no"}}, "at '/redis/appendfsync'"),
    ({"image": {"digest": "latest"}}, "at '/image/digest'"),
]


@pytest.mark.parametrize(("values", "message"), SCHEMA_ERRORS, ids=[m.split("'")[1] for _, m in SCHEMA_ERRORS])
def test_schema_rejects_bad_values(values: dict[str, Any], message: str) -> None:
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema({"upstream": "http://tool:9000", **chart.values})
        with pytest.raises(helm_python.HelmValuesError) as raised:
            chart.validate_schema({**chart.values, "upstream": "http://tool:9000", **values})
    assert message in str(raised.value)
    # An install renders with the same check: it stops before any object is made.
    with pytest.raises(helm_python.HelmError, match="don't meet the specifications of the schema"):
        render(CHART, {"upstream": "http://tool:9000", **values})


TEMPLATE_ERRORS = [
    ({}, "no tool to proxy: set upstream"),
    ({"upstream": "http://a", "config": {"routes": [{"prefix": "/", "upstream": "http://b"}]}}, "not both"),
    ({"upstream": "http://a", "replicaCount": 2}, "every replica would keep its own ledger"),
    ({"upstream": "http://a", "autoscaling": {"enabled": True}}, "every replica would keep its own ledger"),
    ({"upstream": "http://a", "store": {"url": "redis://r:6379/0"}, "redis": {"enabled": True}}, "choose one store"),
    ({"upstream": "http://a", "terminationGracePeriodSeconds": 12}, "must exceed preStopSleepSeconds"),
    ({"upstream": "http://a", "podDisruptionBudget": {"enabled": True, "minAvailable": 1}}, "not both"),
    ({"upstream": "http://a", "ports": {"proxy": 8081, "admin": 8081}}, "must differ"),
    (
        {"upstream": "http://a", "store": {"existingSecret": {"name": "s"}, "options": {"min_replicas_ack": 1}}},
        "need the store URL in store.url",
    ),
]


@pytest.mark.parametrize(("values", "message"), TEMPLATE_ERRORS)
def test_inconsistent_values_fail_with_a_reason(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=message):
        render(CHART, values)


def test_schema_knows_every_configuration_key() -> None:
    """values.schema.json lists the config file's keys (config.py): a new key must be added there too."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    config = schema["properties"]["config"]["properties"]
    chart_owned = {"listen", "admin_listen", "shutdown_grace", "store"}
    assert set(config) | chart_owned == set(proxy_config._TOP_KEYS)
    assert set(config["route_defaults"]["properties"]) == set(proxy_config._ROUTE_POLICY_KEYS)
    assert set(config["routes"]["items"]["properties"]) == set(proxy_config._ROUTE_KEYS)
    assert set(config["headers"]["properties"]) == set(proxy_config._HEADER_KEYS)
    options = schema["properties"]["store"]["properties"]["options"]["properties"]
    assert set(options) | {"url"} == set(proxy_config._STORE_KEYS)


def test_image_tag_is_the_released_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = load_values(CHART / "values.yaml")
    assert values["image"]["tag"] == chart["appVersion"] == __version__
