"""A route's ``reconcile`` block: how to learn whether an operation took effect.

Exactly one method per route:

- ``probe``: a request to the tool whose response shows the effect (a
  JMESPath expression over the JSON body selects the resource, or nothing);
- ``hook``: ``module:function``, an async Python function;
- ``resend_safe: true``: the tool honours ``Idempotency-Key`` itself, so the
  original request is simply sent again.
"""

from __future__ import annotations

import importlib
import inspect
import re
import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jmespath
import jmespath.exceptions
from jmespath.parser import ParsedResult

from idemproxy.config.convert import boolean, positive_duration, positive_int, statuses
from idemproxy.config.key_paths import NestedProblems, unknown_key
from idemproxy.config.units import parse_duration

#: Placeholders a probe URL may use, besides ``{body.<path>}``.
URL_PLACEHOLDERS = frozenset({"key", "op_id", "upstream", "caller", "task"})
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_KEYS = frozenset(
    {"probe", "hook", "resend_safe", "found", "max_probes", "backoff", "max_backoff", "on_demand_timeout", "settle"}
)
_PROBE_KEYS = frozenset({"method", "url", "headers", "timeout", "match_statuses", "absent_statuses", "match"})
_FOUND_KEYS = frozenset({"status", "body"})

Hook = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    url: str  # a template: {upstream}, {key}, {op_id}, {caller}, {task}, {body.a.b}
    match: ParsedResult
    match_source: str
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 5.0
    match_statuses: frozenset[int] = frozenset({200})  # the body is examined
    absent_statuses: frozenset[int] = frozenset({404})  # the status alone proves absence

    @property
    def quotes_body(self) -> bool:
        return any(field.startswith("body.") for field in url_fields(self.url))


@dataclass(frozen=True, slots=True)
class FoundResponse:
    """What callers get when a probe finds the effect: ``resource`` (the match,
    as JSON), ``probe`` (the probe's whole body), or a JSON template whose
    strings ``"${expr}"`` are JMESPath over ``{resource, key, probe}``."""

    status: int = 200
    body: Any = "resource"


@dataclass(frozen=True, slots=True)
class ReconcileConfig:
    probe: ProbeConfig | None = None
    hook: Hook | None = None
    hook_name: str | None = None
    resend_safe: bool = False
    found: FoundResponse = FoundResponse()
    max_probes: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    on_demand_timeout_s: float = 5.0
    #: "Absent" proves nothing until this long after the attempt started (the
    #: tool may still be committing); None: the route's connect + read timeout.
    settle_s: float | None = None

    @property
    def stores_request(self) -> bool:
        """Whether the original request must be kept with the record."""
        return self.resend_safe or self.hook is not None or (self.probe is not None and self.probe.quotes_body)

    @property
    def method(self) -> str:
        if self.probe is not None:
            return "probe"
        return "hook" if self.hook is not None else "resend"

    def backoff_after(self, probes: int) -> float:
        exponent = min(max(0, probes - 1), 60)  # beyond 2**60 every backoff is capped anyway
        return float(min(self.max_backoff_s, self.backoff_s * 2**exponent))


def url_fields(template: str) -> list[str]:
    """The placeholders of a probe URL template; conversions and format specs are refused,
    because every substituted value is percent-encoded as it is."""
    fields = []
    for _, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if spec or conversion:
            raise ValueError(f"placeholder {{{field}}} may not carry a conversion or format spec")
        fields.append(field)
    return fields


def _authority_problem(url: str) -> str | None:
    """Where a caller's value could choose the host the probe goes to: a placeholder in
    the scheme or host, or one right after ``{upstream}`` (``{upstream}{key}`` would
    extend the upstream's host name)."""
    if url.startswith("{upstream}"):
        if url[len("{upstream}") :][:1] not in ("", "/", "?", "#"):
            return "{upstream} must be followed by '/', '?' or the end of the template"
        return None
    host = re.split(r"[/?#]", url.partition("://")[2], maxsplit=1)[0]
    if "{" in host:
        return "placeholders belong in the path or the query, not in the host"
    return None


def parse_reconcile(raw: Any) -> ReconcileConfig:
    """Validate a ``reconcile`` block; a ``NestedProblems`` (a ValueError) names every problem found."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ValueError(f"expected a mapping with probe, hook or resend_safe, got {type(raw).__name__}")
    for key in raw:
        if key not in _KEYS:
            problems.append(f"{key}: {unknown_key(key, _KEYS)}")
    methods = [name for name in ("probe", "hook") if name in raw] + (["resend_safe"] if raw.get("resend_safe") else [])
    if len(methods) != 1:
        problems.append(f"exactly one of probe, hook or resend_safe: true is required, got {methods or 'none'}")

    def take(key: str, default: Any, convert: Callable[[Any], Any]) -> Any:
        if key not in raw:
            return default
        try:
            return convert(raw[key])
        except (ValueError, TypeError) as exc:
            problems.append(f"{key}: {exc}")
            return default

    defaults = ReconcileConfig()
    probe = _probe(raw["probe"], problems) if "probe" in raw else None
    hook = take("hook", None, _hook)
    config = ReconcileConfig(
        probe=probe,
        hook=hook,
        hook_name=raw.get("hook") if hook is not None else None,
        resend_safe=take("resend_safe", False, boolean),
        found=_found(raw["found"], problems) if "found" in raw else defaults.found,
        max_probes=take("max_probes", defaults.max_probes, positive_int),
        backoff_s=take("backoff", defaults.backoff_s, positive_duration),
        max_backoff_s=take("max_backoff", defaults.max_backoff_s, positive_duration),
        on_demand_timeout_s=take("on_demand_timeout", defaults.on_demand_timeout_s, positive_duration),
        settle_s=take("settle", None, parse_duration),
    )
    if problems:
        raise NestedProblems.from_texts(problems)
    return config


def _probe(raw: Any, problems: list[str]) -> ProbeConfig | None:
    if not isinstance(raw, dict):
        problems.append(f"probe: expected a mapping with url and match, got {type(raw).__name__}")
        return None
    for key in raw:
        if key not in _PROBE_KEYS:
            problems.append(f"probe.{key}: {unknown_key(key, _PROBE_KEYS)}")
    before = len(problems)
    url = raw.get("url")
    if not isinstance(url, str) or not url:
        problems.append("probe.url: a URL template is required, e.g. '{upstream}/tickets?external_id={key}'")
    else:
        try:
            fields = url_fields(url)
        except ValueError as exc:
            problems.append(f"probe.url: not a valid template ({exc})")
            fields = []
        for field in fields:
            if field not in URL_PLACEHOLDERS and not (field.startswith("body.") and len(field) > 5):
                problems.append(
                    f"probe.url: unknown placeholder {{{field}}}; expected {{upstream}}, {{key}}, "
                    "{op_id}, {caller}, {task} or {body.<field>}"
                )
        if not (url.startswith("{upstream}") or url.startswith(("http://", "https://"))):
            problems.append(f"probe.url: must start with {{upstream}} or http(s)://, got {url!r}")
        elif not (url.isascii() and url.isprintable()) or " " in url:
            # The rendered URL is sent as it stands: its own text must already be encoded.
            problems.append(f"probe.url: must be printable ASCII without spaces (percent-encode the rest), got {url!r}")
        elif problem := _authority_problem(url):
            problems.append(f"probe.url: {problem}")
    match_source = raw.get("match")
    match: ParsedResult | None = None
    if not isinstance(match_source, str) or not match_source:
        problems.append("probe.match: a JMESPath expression is required, e.g. 'tickets[0]'")
    else:
        try:
            match = jmespath.compile(match_source)
        except jmespath.exceptions.JMESPathError as exc:
            problems.append(f"probe.match: not a valid JMESPath expression: {exc}")
    method = raw.get("method", "GET")
    if not isinstance(method, str) or method.upper() not in _METHODS:
        problems.append(f"probe.method: expected one of {', '.join(sorted(_METHODS))}, got {method!r}")
    headers = raw.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        problems.append("probe.headers: expected a mapping of header names to strings")
        headers = {}
    timeout_s = _collect(problems, "probe.timeout", raw.get("timeout", 5.0), positive_duration)
    match_statuses = _collect(problems, "probe.match_statuses", raw.get("match_statuses", [200]), statuses)
    absent_statuses = _collect(problems, "probe.absent_statuses", raw.get("absent_statuses", [404]), statuses)
    if match_statuses is not None and absent_statuses is not None and (overlap := match_statuses & absent_statuses):
        problems.append(f"probe.absent_statuses: {sorted(overlap)} also listed in match_statuses")
    if len(problems) > before or match is None or not isinstance(url, str):
        return None
    return ProbeConfig(
        url=url,
        match=match,
        match_source=str(match_source),
        method=method.upper(),
        headers=tuple((str(name), value) for name, value in headers.items()),
        timeout_s=timeout_s,
        match_statuses=match_statuses,
        absent_statuses=absent_statuses,
    )


def _found(raw: Any, problems: list[str]) -> FoundResponse:
    if not isinstance(raw, dict):
        problems.append(f"found: expected a mapping with status and body, got {type(raw).__name__}")
        return FoundResponse()
    for key in raw:
        if key not in _FOUND_KEYS:
            problems.append(f"found.{key}: {unknown_key(key, _FOUND_KEYS)}")
    status = raw.get("status", 200)
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 299:
        problems.append(f"found.status: expected a 2xx status, got {status!r}")
        status = 200
    body = raw.get("body", "resource")
    if isinstance(body, str) and body not in ("resource", "probe") and not body.startswith("${"):
        problems.append(f"found.body: expected 'resource', 'probe' or a JSON template, got {body!r}")
    for expression in _template_expressions(body):
        try:
            jmespath.compile(expression)
        except jmespath.exceptions.JMESPathError as exc:
            problems.append(f"found.body: template expression {expression!r} is not valid JMESPath: {exc}")
    return FoundResponse(status=status, body=body)


def _template_expressions(template: Any) -> list[str]:
    if isinstance(template, str):
        return [template[2:-1]] if template.startswith("${") and template.endswith("}") else []
    if isinstance(template, dict):
        return [expr for value in template.values() for expr in _template_expressions(value)]
    if isinstance(template, list):
        return [expr for value in template for expr in _template_expressions(value)]
    return []


def _hook(value: Any) -> Hook:
    if not isinstance(value, str) or value.count(":") != 1:
        raise ValueError(f"expected 'module:function', got {value!r}")
    module_name, function_name = value.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r}: {exc}") from exc
    function = getattr(module, function_name, None)
    if function is None or not inspect.iscoroutinefunction(function):
        raise ValueError(f"{value!r} must name an async function")
    hook: Hook = function
    return hook


def _collect(problems: list[str], key: str, value: Any, convert: Callable[[Any], Any]) -> Any:
    try:
        return convert(value)
    except (ValueError, TypeError) as exc:
        problems.append(f"{key}: {exc}")
        return None
