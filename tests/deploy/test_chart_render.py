"""The Helm chart (helm/idemproxy) in every mode, rendered and linted by Helm itself.

Each scenario is a values file under ``helm/idemproxy/ci/`` or the sidecar example chart
``helm/examples/agent`` (``tests/deploy/scenarios.py``). Every rendered object must pass
``kubernetes-validate --strict`` for the oldest and newest Kubernetes the chart is checked
against, and the proxy configuration it renders must pass ``idemproxy check-config``;
then the standalone and sidecar specifics, the monitoring objects, and values that fail
at install time, saying why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

from idemproxy import __version__
from idemproxy.config import settings as proxy_config
from tests.deploy import sync_chart
from tests.deploy.charts import (
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
)
from tests.deploy.scenarios import (
    FULLNAME,
    IDS,
    POD_IDS,
    SCENARIOS,
    WITH_POD,
    Scenario,
    _rendered,
    config_text,
    idemproxy_container,
    loaded_config,
    one,
    pod_specs,
    reachable_ports,
    rendered,
    secret_environment,
)

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
    default_base = "https://github.com/idemproxy/idemproxy/blob/main/"
    for group in source["groups"]:  # absolute by default, pointing at the runbooks in docs/metrics.md
        for rule in group["rules"]:
            rule["annotations"]["runbook_url"] = default_base + rule["annotations"]["runbook_url"]
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
