"""The result table, its ratios to the baselines of the same run, and the targets.

Ratios are always taken against baselines measured in the same run, at the
same concurrency, with the same request shape (POST or GET) and with the CPUs
in the same idle regime (``Run.awake``), so a slower or busier machine moves
both sides of each ratio.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.results import LedgerMemory, Measurement
from bench.scenarios import SCENARIOS, Run, Shape, Subject, settled


@dataclass(frozen=True, slots=True)
class Target:
    """One target, judged on this run: ``measured`` against ``bound``."""

    text: str
    bound: float
    #: True: met when measured ≥ bound; False: met when measured ≤ bound.
    at_least: bool
    measured: float | None = None  # None: could not be evaluated in this run
    unit: str = "x"
    #: How it was measured, or why it was not.
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured >= self.bound if self.at_least else self.measured <= self.bound

    @property
    def quotient(self) -> float | None:
        """measured ÷ target: met at ≥ 1 for a lower bound, at ≤ 1 for an upper one."""
        return None if self.measured is None or self.bound == 0 else self.measured / self.bound

    @property
    def goal(self) -> str:
        bound = _amount(self.bound, self.unit) if self.unit == "x" else f"{self.bound:,g}{self.unit}"
        return f"{'≥' if self.at_least else '≤'} {bound}"

    @property
    def value(self) -> str:
        if self.measured is None:
            return self.note or "not measured in this run"
        return f"{_amount(self.measured, self.unit)} (target {self.goal})"


_DIGITS = {"x": 2, " MB": 1, " B": 0}


def _amount(value: float, unit: str) -> str:
    return f"{value:,.{_DIGITS.get(unit, 2)}f}{unit}"


def baseline(results: Sequence[Measurement], of: Run, subject: Subject) -> Measurement | None:
    for candidate in results:
        run = candidate.run
        if (
            candidate.ok
            and run.subject is subject
            and run.concurrency == of.concurrency
            and run.shape == of.shape
            and run.awake == of.awake
        ):
            return candidate
    return None


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


_Metric = Callable[[Measurement], float | None]


def _rps(m: Measurement) -> float | None:
    return m.load.rps if m.load else None


def _p50(m: Measurement) -> float | None:
    return m.load.p50_ms if m.load else None


def _p99(m: Measurement) -> float | None:
    return m.load.p99_ms if m.load else None


def _cpu(m: Measurement) -> float | None:
    return m.cpu_us


def _rss(m: Measurement) -> float | None:
    return m.peak_rss_mb


def _against(results: Sequence[Measurement], m: Measurement, subject: Subject, metric: _Metric) -> str:
    reference = baseline(results, m.run, subject)
    if not m.ok or reference is None:
        return ""
    return fmt_ratio(ratio(metric(m), metric(reference)))


def fmt_ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def fmt_number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return ""
    return f"{value:,.{digits}f}"


_COLUMNS = (
    "run", "c", "req/s", "x naive", "x nginx", "x direct", "p50 ms", "x naive", "p99 ms", "x naive",
    "CPU µs/req", "x naive", "Redis µs/req", "peak RSS MB", "x naive", "non-2xx", "errors", "notes",
)  # fmt: skip
_LEFT_ALIGNED = {"run", "notes"}


def table(results: Sequence[Measurement]) -> str:
    """The markdown table: one row per run, ratios against that run's baselines."""
    return markdown(_COLUMNS, [_row(results, m) for m in results], _LEFT_ALIGNED)


def markdown(columns: Sequence[str], rows: Sequence[Sequence[str]], left_aligned: set[int] | set[str]) -> str:
    """A padded markdown table; columns named (or numbered) in ``left_aligned`` align left, others right."""
    widths = [max(len(columns[i]), *(len(row[i]) for row in rows)) for i in range(len(columns))]
    left = [i in left_aligned or name in left_aligned for i, name in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.ljust(width) if is_left else cell.rjust(width)
            for cell, width, is_left in zip(cells, widths, left, strict=True)
        )
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        (":" + "-" * (w + 1) if is_left else "-" * (w + 1) + ":") for w, is_left in zip(widths, left, strict=True)
    )
    return "\n".join([line(columns), rule + "|", *(line(row) for row in rows)])


def _row(results: Sequence[Measurement], m: Measurement) -> list[str]:
    load = m.load
    notes = list(m.notes)
    if m.missing:
        notes.insert(0, m.missing)
    if m.log_problems:
        notes.append(f"{m.log_problem_count} log warnings/errors")
    return [
        m.run.label,
        str(m.run.concurrency),
        fmt_number(_rps(m)) if m.ok else "n/a",
        _against(results, m, Subject.NAIVE, _rps),
        _against(results, m, Subject.NGINX, _rps),
        _against(results, m, Subject.DIRECT, _rps),
        fmt_number(_p50(m), 2) if m.ok else "",
        _against(results, m, Subject.NAIVE, _p50),
        fmt_number(_p99(m), 2) if m.ok else "",
        _against(results, m, Subject.NAIVE, _p99),
        fmt_number(m.cpu_us) if m.ok else "",
        _against(results, m, Subject.NAIVE, _cpu),
        fmt_number(m.store_cpu_us) if m.ok else "",
        fmt_number(m.peak_rss_mb, 1) if m.ok else "",
        _against(results, m, Subject.NAIVE, _rss),
        fmt_number(load.non_2xx) if load and m.ok else "",
        fmt_number(load.errors) if load and m.ok else "",
        "; ".join(notes),
    ]


def _find(results: Sequence[Measurement], scenario: str, concurrency: int) -> Measurement | None:
    return next((m for m in results if m.run.scenario == scenario and m.run.concurrency == concurrency), None)


def targets(results: Sequence[Measurement], ledger: LedgerMemory | None, cores: int | None = None) -> list[Target]:
    """The issue's targets, each judged on this run's ratios (baselines of the same run)."""
    cores = cores or os.cpu_count() or 1
    forward_64 = _find(results, "forward-redis", 64)
    return [
        _versus(
            "forward-sqlite c=64 req/s ÷ forward-redis c=64 (SQLite synchronous=FULL)",
            _find(results, "forward-sqlite", 64),
            forward_64,
            _rps,
            bound=1.0,
        ),
        _versus(
            "forward-sqlite c=1 p50 ÷ forward-redis c=1 p50, CPUs kept out of idle",
            _find(results, "forward-sqlite-awake", 1),
            _find(results, "forward-redis-awake", 1),
            _p50,
            bound=1.2,
            at_least=False,
        ),
        _against_baseline(results, "forward-redis-awake", 1, Subject.NAIVE, "p50", 1.2, at_least=False),
        _against_baseline(results, "forward-redis", 8, Subject.NAIVE, "req/s", 1.0),
        _against_baseline(results, "forward-redis", 64, Subject.NAIVE, "req/s", 1.3),
        _against_baseline(results, "forward-redis", 64, Subject.NGINX, "CPU µs/req", 4.5, at_least=False),
        _scaling(results, "forward-redis-2w", forward_64, cores),
        _against_baseline(results, "replay-redis", 64, Subject.NAIVE, "req/s", 1.5),
        _against_baseline(results, "forward-mcp", 64, Subject.NAIVE, "req/s", 1.0),
        _against_baseline(results, "replay-mcp", 64, Subject.NAIVE, "req/s", 1.5),
        *_preloaded(results, forward_64, ledger),
        _ledger_memory(ledger),
        _peak_rss(results),
    ]


def _versus(
    text: str,
    m: Measurement | None,
    reference: Measurement | None,
    metric: _Metric,
    *,
    bound: float,
    at_least: bool = True,
) -> Target:
    """``metric`` of ``m`` divided by that of ``reference``, against ``bound``."""
    if m is None or reference is None or not m.ok or not reference.ok:
        missing = next((x.missing for x in (m, reference) if x is not None and x.missing), None)
        return Target(text, bound, at_least, note=missing or "not measured in this run")
    return Target(text, bound, at_least, ratio(metric(m), metric(reference)))


_METRICS: dict[str, _Metric] = {"req/s": _rps, "p50": _p50, "CPU µs/req": _cpu}
_BASELINE_NAMES = {Subject.NAIVE: "naive proxy", Subject.NGINX: "nginx proxy_pass", Subject.DIRECT: "direct"}


def _against_baseline(
    results: Sequence[Measurement],
    scenario: str,
    concurrency: int,
    subject: Subject,
    metric: str,
    bound: float,
    *,
    at_least: bool = True,
) -> Target:
    """``scenario`` at ``concurrency`` divided by ``subject``'s baseline of the same shape and regime."""
    m = _find(results, scenario, concurrency)
    reference = baseline(results, m.run, subject) if m is not None else None
    defined = next(s for s in SCENARIOS if s.name == scenario)
    shape = "" if defined.shape is Shape.POST else f" {defined.shape}"
    regime = " (both with the CPUs kept out of idle)" if defined.awake else ""
    text = f"{scenario} c={concurrency} {metric} ÷ {_BASELINE_NAMES[subject]}{shape}{regime}"
    return _versus(text, m, reference, _METRICS[metric], bound=bound, at_least=at_least)


def scaling_ceiling(one: Measurement, workers: int, cores: int) -> float | None:
    """The throughput ``workers`` workers could reach here, from the 1-worker run: ``workers``
    times its throughput, but no more than the machine's cores carry at its whole cost per
    request (the CPU that proxy, Redis, upstream and wrk took together: they share the cores)."""
    if not one.ok or one.load is None or not one.bench_cores:
        return None
    rps = one.load.rps
    return min(workers * rps, rps * cores / one.bench_cores)


def _scaling(results: Sequence[Measurement], scenario: str, one: Measurement | None, cores: int) -> Target:
    workers = next(s.workers for s in SCENARIOS if s.name == scenario)
    text = f"{scenario} c=64 req/s ÷ the {workers}-worker ceiling measured in this run (scaling efficiency)"
    many = _find(results, scenario, 64)
    target = dataclasses.replace(_versus(text, many, one, _rps, bound=0.9), unit="")
    if target.measured is None or many is None or many.load is None or one is None or one.load is None:
        return target
    ceiling = scaling_ceiling(one, many.run.workers, cores)
    if ceiling is None:
        return dataclasses.replace(target, measured=None, note="the 1-worker run's CPU was not measured")
    note = (
        f"ceiling {ceiling:,.0f} req/s: the lower of {many.run.workers} x 1 worker's {one.load.rps:,.0f} req/s "
        f"and {cores} cores at 1 worker's cost ({one.bench_cores or 0:.2f} cores for {one.load.rps:,.0f} req/s)"
    )
    return dataclasses.replace(target, measured=many.load.rps / ceiling, unit="", note=note)


def _preloaded(results: Sequence[Measurement], empty: Measurement | None, ledger: LedgerMemory | None) -> list[Target]:
    """Holding the preloaded records (judged once Redis's key table settled), and the first window."""
    first = _find(results, "forward-redis-1m", 64)
    settled_window = _find(results, settled(first.run).scenario, 64) if first is not None else None
    records = f"{ledger.records:,}" if ledger is not None else "1,000,000"
    return [
        _versus(
            f"forward-redis-1m-settled c=64 req/s ÷ forward-redis c=64 ({records} records vs an empty ledger)",
            settled_window,
            empty,
            _rps,
            bound=0.95,
        ),
        _versus(
            "forward-redis-1m c=64 req/s ÷ forward-redis c=64: the first window, while Redis doubles its key table",
            first,
            empty,
            _rps,
            bound=0.95,
        ),
    ]


def _ledger_memory(ledger: LedgerMemory | None) -> Target:
    text = "Redis memory per completed record, besides the stored body"
    if ledger is None:
        return Target(text, 400, at_least=False, unit=" B", note="not measured in this run")
    note = f"{ledger.bytes_per_record:,.0f} B per record, {ledger.body_bytes} B of it the body"
    return Target(text, 400, at_least=False, measured=ledger.without_body, unit=" B", note=note)


def _peak_rss(results: Sequence[Measurement]) -> Target:
    text = "peak RSS per idemproxy worker under load"
    proxies = [m for m in results if m.ok and m.run.subject is Subject.IDEMPROXY and m.peak_rss_mb]
    if not proxies:
        return Target(text, 150, at_least=False, unit=" MB", note="not measured in this run")
    worst = max(proxies, key=lambda m: m.peak_rss_mb or 0.0)
    note = f"in {worst.run.label} c={worst.run.concurrency}"
    return Target(text, 150, at_least=False, measured=worst.peak_rss_mb, unit=" MB", note=note)


_TARGET_COLUMNS = ("target", "measured", "target", "measured ÷ target", "", "notes")


def targets_table(found: Sequence[Target]) -> str:
    """One row per target: measured, the target, measured ÷ target, met or not."""
    rows = [
        [
            t.text,
            _amount(t.measured, t.unit) if t.measured is not None else "n/a",
            t.goal,
            f"{t.quotient:.2f}" if t.quotient is not None else "",
            {True: "met", False: "MISSED", None: "n/a"}[t.met],
            t.note,
        ]
        for t in found
    ]
    return markdown(_TARGET_COLUMNS, rows, {0, 4, 5})


def targets_summary(found: Sequence[Target]) -> str:
    met = sum(1 for t in found if t.met)
    missed = sum(1 for t in found if t.met is False)
    unmeasured = sum(1 for t in found if t.met is None)
    return (
        f"{met} of {len(found)} targets met, {missed} missed, {unmeasured} not measured in this run. "
        "measured ÷ target: a target of ≥ is met at 1.00 or more, one of ≤ at 1.00 or less."
    )


def render(
    results: Sequence[Measurement],
    machine: dict[str, str],
    settings: dict[str, Any],
    ledger: LedgerMemory | None,
    *,
    elapsed_s: float,
    interrupted: str | None,
) -> str:
    lines = ["# idemproxy benchmark", ""]
    if interrupted:
        lines += [f"**Incomplete: {interrupted}.** Only the runs below were measured.", ""]
    lines += [
        "Machine: " + "; ".join(f"{key} {value}" for key, value in machine.items()) + ".",
        "",
        "Settings: "
        + ", ".join(f"{key} {value}" for key, value in settings.items())
        + f"; whole run {elapsed_s / 60:.1f} min.",
        "",
        table(results),
        "",
        "x naive / x nginx / x direct: the value divided by the same metric of that baseline at the same "
        "concurrency and request shape in this run (req/s: higher is better; latency, CPU, RSS: lower is "
        "better). CPU µs/req: CPU time of the process under test (all its processes) per request; "
        "Redis µs/req: redis-server's. Peak RSS: VmHWM of the largest single process.",
        "",
        "## Targets",
        "",
    ]
    found = targets(results, ledger)
    lines += [targets_summary(found), "", targets_table(found)]
    if ledger is not None:
        lines += [
            "",
            "## Ledger",
            "",
            f"- {ledger.records:,} completed records preloaded in {ledger.seconds:.1f} s "
            f"({ledger.records / max(ledger.seconds, 1e-9):,.0f}/s).",
            f"- Redis used_memory growth per completed record: {ledger.bytes_per_record:,.0f} B, of "
            f"which the stored body is {ledger.body_bytes} B: {ledger.without_body:,.0f} B without it.",
            f"- MEMORY USAGE of one record the proxy wrote itself: {ledger.memory_usage_of_real_record:,} B.",
        ]
    problems = [m for m in results if m.log_problems or (m.load and (m.load.non_2xx or m.load.errors))]
    lines += ["", "## Errors and non-2xx responses", ""]
    if not problems:
        lines.append("None: every response in every run was 2xx, and nothing was logged above info.")
    for m in problems:
        load = m.load
        statuses = (
            ", ".join(f"{status}: {count}" for status, count in sorted(load.statuses.items()) if status >= 300)
            if load
            else ""
        )
        sockets = ", ".join(f"{k} {v}" for k, v in (load.socket_errors.items() if load else ()) if v)
        lines.append(
            f"- {m.run.label} c={m.run.concurrency}: statuses {statuses or 'all 2xx'}; "
            f"socket errors {sockets or 'none'}; {m.log_problem_count} log warnings/errors"
            + "".join(f"\n  - {count}x {summary}" for summary, count in m.log_problems.items())
        )
    return "\n".join(lines) + "\n"


def to_json(
    results: Sequence[Measurement],
    machine: dict[str, str],
    settings: dict[str, Any],
    ledger: LedgerMemory | None,
    elapsed_s: float,
) -> bytes:
    def encode(m: Measurement) -> dict[str, Any]:
        data = dataclasses.asdict(m)
        data["ratios"] = {
            subject.value: {
                name: ratio(metric(m), metric(ref)) if (ref := baseline(results, m.run, subject)) else None
                for name, metric in (("rps", _rps), ("p50", _p50), ("p99", _p99), ("cpu", _cpu), ("rss", _rss))
            }
            for subject in (Subject.NAIVE, Subject.NGINX, Subject.DIRECT)
        }
        return data

    return orjson.dumps(
        {
            "machine": machine,
            "settings": settings,
            "elapsed_s": elapsed_s,
            "results": [encode(m) for m in results],
            "ledger": dataclasses.asdict(ledger) if ledger else None,
            "targets": [
                {**dataclasses.asdict(t), "met": t.met, "measured_per_target": t.quotient}
                for t in targets(results, ledger)
            ],
        },
        option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS,
    )


def plot(results: Sequence[Measurement], path: Path) -> str:
    """A PNG of throughput and latency per run; says why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    measured = [m for m in results if m.ok and m.load]
    labels = [f"{m.run.label} c{m.run.concurrency}" for m in measured]
    colours = ["tab:grey" if m.run.is_baseline else "tab:blue" for m in measured]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, len(labels) * 0.6), 9), sharex=True)
    top.bar(labels, [m.load.rps for m in measured if m.load], color=colours)
    top.set_ylabel("requests/s")
    top.set_yscale("log")
    positions = range(len(labels))
    bottom.bar([p - 0.2 for p in positions], [m.load.p50_ms for m in measured if m.load], 0.4, label="p50")
    bottom.bar([p + 0.2 for p in positions], [m.load.p99_ms for m in measured if m.load], 0.4, label="p99")
    bottom.set_ylabel("latency ms")
    bottom.set_yscale("log")
    bottom.legend()
    bottom.set_xticks(list(positions), labels, rotation=60, ha="right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return f"plot written to {path}"
