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
import shutil
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
from idemproxy.config import ProxyConfig, load_config
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


@pytest.mark.parametrize("scenario", WITH_POD, ids=POD_IDS)
def test_container_runs_the_configuration_the_chart_meant(
    scenario: Scenario, agent_chart: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifests = rendered(scenario, agent_chart)
    config = loaded_config(manifests, tmp_path, monkeypatch)

    expected_listen = "127.0.0.1:8080" if scenario.mode == "sidecar" else "0.0.0.0:8080"
    assert str(config.listen) == expected_listen
    # The operations API stays inside the pod (kubectl port-forward); the kubelet and
    # Prometheus get a listener of their own.
    assert str(config.admin_listen) == "127.0.0.1:8081"
    assert config.admin_listen.is_loopback
    assert str(config.metrics_listen) == "0.0.0.0:8082"
    assert config.store.url == scenario.store_url
    assert config.shutdown_grace_s == 10.0
    # The pod declares exactly the ports that listen beyond loopback.
    _, container = idemproxy_container(manifests)
    assert {port["containerPort"] for port in container["ports"]} == reachable_ports(config)


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
    # The metrics listener: the admin one is on loopback, out of the kubelet's reach.
    metrics = next(port for port in container["ports"] if port["containerPort"] == 8082)
    assert metrics["name"] == ("idem-metrics" if scenario.mode == "sidecar" else "metrics")
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": metrics["name"]}
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
            "NetworkPolicy",  # ci/standalone-values.yaml enables it
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
    assert {port["name"]: port["port"] for port in service["spec"]["ports"]} == {"proxy": 8080, "metrics": 8082}
    _, container = idemproxy_container(manifests)
    declared = {port["name"] for port in container["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= declared
    monitor = one(manifests, "ServiceMonitor").body
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
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
    # The proxy and admin ports stay in the pod (loopback): only metrics is declared.
    assert [(port["name"], port["containerPort"]) for port in container["ports"]] == [("idem-metrics", 8082)]

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    monitor = one(manifests, "PodMonitor").body
    for key, value in monitor["spec"]["selector"]["matchLabels"].items():
        assert labels[key] == value
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "idem-metrics"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert len(annotations["checksum/idemproxy-config"]) == 64


def test_sidecar_templates_need_sidecar_mode(agent_chart: Path) -> None:
    with pytest.raises(helm_python.HelmError, match="need the dependency's values to say mode: sidecar"):
        render(agent_chart, {"idemproxy": {"mode": "standalone"}})


# -- network exposure: every other pod in the cluster is hostile ---------------------------------

#: An identity that may use the operations API: what an admin listener off loopback needs.
OPERATOR_AUTH = {"identities": [{"name": "operator", "tokens": ["sha256:" + "0" * 64], "ops": "admin"}]}
LOOPBACK = ["127.0.0.1", "127.10.0.1", "::1", "localhost"]
OFF_LOOPBACK = ["0.0.0.0", "::", "10.1.2.3", "idemproxy-admin", "127.0.0.256"]
AGENTS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "agents"}}}
PROMETHEUS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}
OPERATORS = {"ipBlock": {"cidr": "10.20.0.0/16"}}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector matches these labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


def pod_labels(manifests: list[Manifest], kind: str, name: str | None = None) -> dict[str, str]:
    labels: dict[str, str] = one(manifests, kind, name).body["spec"]["template"]["metadata"]["labels"]
    return labels


def admitted(policy: Manifest) -> dict[int, list[dict[str, Any]] | None]:
    """port -> the peers the policy admits to it (None: any source)."""
    spec = policy.body["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert "egress" not in spec
    found: dict[int, list[dict[str, Any]] | None] = {}
    for rule in spec["ingress"]:
        for port in rule["ports"]:
            assert port["protocol"] == "TCP"
            assert port["port"] not in found, f"port {port['port']} in two rules"
            found[port["port"]] = rule.get("from")
    return found


def valid(manifests: list[Manifest]) -> None:
    found = [problem for version in KUBERNETES_VERSIONS for m in manifests for problem in problems(m, version)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("address", LOOPBACK + OFF_LOOPBACK)
def test_schema_keeps_the_operations_api_on_loopback_unless_auth_guards_it(address: str) -> None:
    with helm_python.Chart.load(CHART) as chart:
        values = {**chart.values, "upstream": "http://tool:9000", "adminBindAddress": address}
        if address in LOOPBACK:
            chart.validate_schema(values)
        else:
            with pytest.raises(helm_python.HelmValuesError, match="at '/config': missing property 'auth'"):
                chart.validate_schema(values)
        chart.validate_schema({**values, "config": {**chart.values["config"], "auth": OPERATOR_AUTH}})
    if address not in LOOPBACK:
        with pytest.raises(helm_python.HelmError, match="don't meet the specifications of the schema"):
            render(CHART, {"upstream": "http://tool:9000", "adminBindAddress": address})


@pytest.mark.parametrize("address", LOOPBACK + OFF_LOOPBACK)
def test_chart_and_proxy_agree_on_what_loopback_is(
    address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admin port is declared (and published) exactly when the proxy's own rule says the
    listener is reachable from outside the pod."""
    manifests = render(
        CHART, {"upstream": "http://tool:9000", "adminBindAddress": address, "config": {"auth": OPERATOR_AUTH}}
    )
    config = loaded_config(manifests, tmp_path, monkeypatch)
    assert config.admin_listen.host == address
    _, container = idemproxy_container(manifests)
    declared = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert set(declared.values()) == reachable_ports(config)
    assert ("admin" in declared) is (address not in LOOPBACK)


def test_chart_listeners_win_over_the_image_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Other ports and IPv6 addresses: the container's IDEMPROXY_*_LISTEN carry them past the
    image's own defaults (which would win over the file), IPv6 hosts bracketed."""
    values = {
        "upstream": "http://tool:9000",
        "ports": {"proxy": 9100, "admin": 9101, "metrics": 9102},
        "bindAddress": "::",
        "adminBindAddress": "::1",
    }
    manifests = render(CHART, values)
    config = loaded_config(manifests, tmp_path, monkeypatch)
    assert (str(config.listen), str(config.admin_listen), str(config.metrics_listen)) == (
        "[::]:9100",
        "[::1]:9101",
        "[::]:9102",
    )
    _, container = idemproxy_container(manifests)
    assert {port["name"]: port["containerPort"] for port in container["ports"]} == {"proxy": 9100, "metrics": 9102}


def test_exposed_operations_api_is_declared_and_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"upstream": "http://tool:9000", "adminBindAddress": "0.0.0.0", "config": {"auth": OPERATOR_AUTH}}
    manifests = render(CHART, values)
    valid(manifests)
    config = loaded_config(manifests, tmp_path, monkeypatch)
    assert str(config.admin_listen) == "0.0.0.0:8081"
    assert config.auth is not None
    _, container = idemproxy_container(manifests)
    assert {port["name"]: port["containerPort"] for port in container["ports"]} == {
        "proxy": 8080,
        "metrics": 8082,
        "admin": 8081,
    }
    assert container["readinessProbe"]["httpGet"]["port"] == "metrics"
    service = one(manifests, "Service").body
    assert {port["name"]: (port["port"], port["targetPort"]) for port in service["spec"]["ports"]} == {
        "proxy": (8080, "proxy"),
        "metrics": (8082, "metrics"),
        "admin": (8081, "admin"),
    }
    assert f"also http://{FULLNAME}.agents.svc:8081" in notes(CHART, values)


def test_templates_refuse_an_unguarded_operations_api_when_the_schema_is_skipped(tmp_path: Path) -> None:
    """helm install --skip-schema-validation: the chart still refuses (as the proxy would at start)."""
    chart = tmp_path / "idemproxy"
    shutil.copytree(CHART, chart)
    (chart / "values.schema.json").unlink()
    with pytest.raises(helm_python.HelmRenderError, match=r"adminBindAddress 0\.0\.0\.0 is not loopback"):
        render(chart, {"upstream": "http://tool:9000", "adminBindAddress": "0.0.0.0"})
    assert render(
        chart, {"upstream": "http://tool:9000", "adminBindAddress": "0.0.0.0", "config": {"auth": OPERATOR_AUTH}}
    )


def test_notes_say_where_metrics_and_the_operations_api_are() -> None:
    standalone = notes(CHART, {"upstream": "http://tool:9000"})
    assert f"http://{FULLNAME}.agents.svc:8082/metrics" in standalone
    assert f"kubectl -n agents port-forward deployment/{FULLNAME} 8081" in standalone
    assert "idemproxy ops --admin http://127.0.0.1:8081 list" in standalone
    assert ".svc:8081" not in standalone  # not published
    sidecar = notes(CHART, {"upstream": "http://tool:9000", "mode": "sidecar"})
    assert "kubectl -n agents port-forward pod/AGENT_POD 8081" in sidecar
    assert "port 8082 (idem-metrics)" in sidecar


@pytest.mark.parametrize("scenario", SCENARIOS, ids=IDS)
def test_no_network_policy_unless_enabled(scenario: Scenario, agent_chart: Path) -> None:
    policies = [m for m in rendered(scenario, agent_chart) if m.kind == "NetworkPolicy"]
    enabled = scenario.values.get("networkPolicy", {}).get("enabled", False)
    assert len(policies) == (1 if enabled else 0)
    assert scenario.id != "sqlite" or not policies  # the defaults


def test_network_policy_admits_the_configured_peers_on_the_proxy_and_metrics_ports(agent_chart: Path) -> None:
    scenario = SCENARIOS[1]
    manifests = rendered(scenario, agent_chart)
    policy = one(manifests, "NetworkPolicy")
    assert policy.body["apiVersion"] == "networking.k8s.io/v1"
    assert policy.name == FULLNAME
    assert selects(policy.body["spec"]["podSelector"], pod_labels(manifests, "Deployment"))
    configured = scenario.values["networkPolicy"]
    assert admitted(policy) == {8080: configured["proxyFrom"], 8082: configured["metricsFrom"]}
    assert configured["proxyFrom"] == [AGENTS]
    assert configured["metricsFrom"] == [PROMETHEUS]
    # Every port the pod declares has a rule, and nothing else does.
    _, container = idemproxy_container(manifests)
    assert set(admitted(policy)) == {port["containerPort"] for port in container["ports"]}


@pytest.mark.parametrize("exposed", [False, True], ids=["admin-on-loopback", "admin-exposed"])
def test_network_policy_admits_the_admin_port_only_when_it_is_exposed(exposed: bool) -> None:
    values: dict[str, Any] = {
        "upstream": "http://tool:9000",
        "networkPolicy": {
            "enabled": True,
            "proxyFrom": [AGENTS],
            "metricsFrom": [PROMETHEUS],
            "adminFrom": [OPERATORS],
        },
    }
    if exposed:
        values |= {"adminBindAddress": "0.0.0.0", "config": {"auth": OPERATOR_AUTH}}
    manifests = render(CHART, values)
    valid(manifests)
    expected = {8080: [AGENTS], 8082: [PROMETHEUS]} | ({8081: [OPERATORS]} if exposed else {})
    assert admitted(one(manifests, "NetworkPolicy")) == expected
    _, container = idemproxy_container(manifests)
    assert set(expected) == {port["containerPort"] for port in container["ports"]}


def test_network_policy_empty_lists() -> None:
    """No proxyFrom: the proxy from any source. No metricsFrom or adminFrom: no pod at all."""
    values = {
        "upstream": "http://tool:9000",
        "adminBindAddress": "0.0.0.0",
        "config": {"auth": OPERATOR_AUTH},
        "networkPolicy": {"enabled": True},
    }
    manifests = render(CHART, values)
    valid(manifests)
    assert admitted(one(manifests, "NetworkPolicy")) == {8080: None}
    assert "Prometheus cannot scrape idemproxy" in notes(CHART, values)
    assert "Prometheus cannot scrape" not in notes(CHART, {**values, "networkPolicy": {"metricsFrom": [PROMETHEUS]}})


def test_network_policy_keeps_the_bundled_redis_to_the_proxy() -> None:
    values = {"upstream": "http://tool:9000", "redis": {"enabled": True}, "networkPolicy": {"enabled": True}}
    manifests = render(CHART, values)
    valid(manifests)
    proxy_pods = pod_labels(manifests, "Deployment")
    redis_pods = pod_labels(manifests, "StatefulSet", f"{FULLNAME}-redis")
    proxy_policy = one(manifests, "NetworkPolicy", FULLNAME).body["spec"]
    # The Redis pods share the proxy's selector labels: its policy must not catch them.
    assert selects(proxy_policy["podSelector"], proxy_pods)
    assert not selects(proxy_policy["podSelector"], redis_pods)
    redis_policy = one(manifests, "NetworkPolicy", f"{FULLNAME}-redis")
    assert selects(redis_policy.body["spec"]["podSelector"], redis_pods)
    assert not selects(redis_policy.body["spec"]["podSelector"], proxy_pods)
    assert list(admitted(redis_policy)) == [6379]
    [peer] = admitted(redis_policy)[6379] or []
    assert set(peer) == {"podSelector"}  # this namespace only
    assert selects(peer["podSelector"], proxy_pods)
    assert not selects(peer["podSelector"], redis_pods)
    off = render(CHART, {**values, "networkPolicy": {"enabled": True, "redis": False}})
    assert [m.name for m in off if m.kind == "NetworkPolicy"] == [FULLNAME]


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
                "https://git.example.com/idemproxy/blob/main/docs/metrics.md#"
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
    ({"ports": {"proxy": 8080, "admin": 8081, "metrics": 0}}, "at '/ports/metrics': minimum: got 0, want 1"),
    (
        {
            "networkPolicy": {
                "enabled": True,
                "proxyFrom": [{"podSelecter": {}}],
                "metricsFrom": [],
                "adminFrom": [],
                "redis": True,
            }
        },
        "at '/networkPolicy/proxyFrom/0': additional properties 'podSelecter' not allowed",
    ),
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
    ({"upstream": "http://a", "ports": {"metrics": 8080}}, "must differ"),
    ({"upstream": "http://a", "ports": {"metrics": 8081}}, "must differ"),
    (
        {"upstream": "http://a", "mode": "sidecar", "networkPolicy": {"enabled": True}},
        "networkPolicy is for standalone mode",
    ),
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
    chart_owned = {"listen", "admin_listen", "metrics_listen", "shutdown_grace", "store"}
    for key in chart_owned - {"store"}:
        assert key in schema["properties"]["config"]["description"]
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
