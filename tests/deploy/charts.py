"""Rendering, linting and validating the chart with the real tools.

Rendering and linting are Helm itself: ``helm-python-sdk`` embeds Helm v4's Go
SDK (``helm template`` and ``helm lint`` without a binary). Rendered objects of
Kubernetes' own kinds are validated by ``kubernetes-validate --strict`` (the
OpenAPI schemas of each Kubernetes release, unknown fields rejected); the
prometheus-operator kinds, which it has no schema for, by the
``cloudcoil-models-prometheus-operator`` models generated from the CRDs, with
unknown fields rejected too.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate  # type: ignore[import-untyped]
import yaml
from helm_python import _native

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "idemproxy"
AGENT_EXAMPLE = REPO / "helm" / "examples" / "agent"
MONITORING_API = "monitoring.coreos.com/v1"
#: The chart's kubeVersion floor and the newest release kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
RELEASE = "demo"
NAMESPACE = "agents"


@dataclass(frozen=True)
class Manifest:
    template: str  # e.g. idemproxy/templates/deployment.yaml
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    def __str__(self) -> str:
        return f"{self.kind}/{self.name} ({self.template})"


def load_values(path: Path) -> dict[str, Any]:
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    assert isinstance(values, dict), f"{path}: values must be a mapping"
    return values


def render(
    chart: Path,
    values: Mapping[str, Any] | None = None,
    *,
    api_versions: Sequence[str] = (),
    kube_version: str | None = None,
) -> list[Manifest]:
    """``helm template`` (with ``--api-versions`` and ``--kube-version``): every object rendered.

    helm-python-sdk's ``Chart.render`` does not expose the capabilities its native
    ``helm_render`` accepts (``api_versions``, ``kube_version``, strictly decoded:
    an unknown option is an error), hence the call one level down.
    """
    options: dict[str, Any] = {"name": RELEASE, "namespace": NAMESPACE, "is_install": True}
    if api_versions:
        options["api_versions"] = list(api_versions)
    if kube_version:
        options["kube_version"] = kube_version
    with helm_python.Chart.load(chart) as loaded:
        rendered: dict[str, str] = json.loads(
            _native.call_string(
                "helm_render",
                loaded._raw(),
                json.dumps(dict(values or {})),
                json.dumps(options),
            )
        )
    manifests: list[Manifest] = []
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            continue
        manifests.extend(Manifest(template, body) for body in yaml.safe_load_all(text) if body)
    return manifests


def notes(chart: Path, values: Mapping[str, Any] | None = None) -> str:
    with helm_python.Chart.load(chart) as loaded:
        rendered = loaded.render(dict(values or {}), name=RELEASE, namespace=NAMESPACE)
    return "".join(text for template, text in rendered.items() if template.endswith("NOTES.txt"))


def lint(chart: Path, values: Mapping[str, Any] | None, kube_version: str) -> list[str]:
    """``helm lint --strict``: every finding of warning level or worse, and every error."""
    report = helm_python.lint(chart, dict(values or {}), strict=True, kube_version=f"v{kube_version}")
    findings = [f"{m['path']}: {m['error']}" for m in report.get("messages", []) if m["severity"] >= 2]
    return findings + [str(error) for error in report.get("errors") or []]


def with_dependencies(chart: Path, workdir: Path) -> Path:
    """A copy of ``chart`` (and of the idemproxy chart it depends on) with ``charts/`` built."""
    root = workdir / "helm"
    shutil.copytree(CHART, root / "idemproxy")
    copy = root / chart.relative_to(REPO / "helm")
    shutil.copytree(chart, copy, ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    helm_python.dependency_build(copy)
    return copy


# -- validation -----------------------------------------------------------------------------------


def problems(manifest: Manifest, kubernetes_version: str) -> list[str]:
    """Why ``manifest`` would be rejected (or silently pruned) by that Kubernetes release."""
    if manifest.body.get("apiVersion") == MONITORING_API:
        return _monitoring_problems(manifest)
    try:
        kubernetes_validate.validate(manifest.body, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path)
        return [f"{manifest} at {where or '(top)'}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{manifest}: {exc.message}"]
    return []


@cache
def _monitoring_models() -> dict[str, Any]:
    from cloudcoil.models.prometheus_operator import v1  # imports in seconds: only when needed

    return {"ServiceMonitor": v1.ServiceMonitor, "PodMonitor": v1.PodMonitor, "PrometheusRule": v1.PrometheusRule}


def _monitoring_problems(manifest: Manifest) -> list[str]:
    import pydantic

    model = _monitoring_models().get(manifest.kind)
    if model is None:
        return [f"{manifest}: no model for {MONITORING_API} {manifest.kind}"]
    try:
        parsed = model.model_validate(manifest.body)
    except pydantic.ValidationError as exc:
        return [f"{manifest}: {error['loc']}: {error['msg']}" for error in exc.errors()]
    # The models ignore unknown fields (as the API server prunes them): find them by round trip.
    kept = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return [f"{manifest}: unknown field {path}" for path in _unknown(manifest.body, kept)]


def _unknown(given: Any, kept: Any, path: str = "") -> Iterator[str]:
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            if key not in kept:
                yield f"{path}.{key}".lstrip(".")
            else:
                yield from _unknown(value, kept[key], f"{path}.{key}")
    elif isinstance(given, list) and isinstance(kept, list):
        for index, (item, kept_item) in enumerate(zip(given, kept, strict=False)):
            yield from _unknown(item, kept_item, f"{path}[{index}]")
