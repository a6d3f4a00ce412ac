"""The result table, its ratios to the baselines of the same run, and the targets.

Ratios are always taken against baselines measured in the same run, at the
same concurrency, with the same request shape (POST or GET) and with the CPUs
in the same idle regime (``Run.awake``), so a slower or busier machine moves
both sides of each ratio.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.results import LedgerMemory, Measurement
from bench.scenarios import Run, Subject, settled

KB = 1024


@dataclass(frozen=True, slots=True)
class Target:
    text: str
    value: str
    met: bool | None  # None: could not be evaluated in this run


def baseline(results: Sequence[Measurement], of: Run, subject: Subject) -> Measurement | None:
    for candidate in results:
        run = candidate.run
        if (
            candidate.ok
            and run.subject is subject
            and run.concurrency == of.concurrency
            and run.mode.shape == of.mode.shape
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
    rows = [_row(results, m) for m in results]
    widths = [max(len(_COLUMNS[i]), *(len(row[i]) for row in rows)) for i in range(len(_COLUMNS))]

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.ljust(width) if name in _LEFT_ALIGNED else cell.rjust(width)
            for name, cell, width in zip(_COLUMNS, cells, widths, strict=True)
        )
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        ("-" * (w + 1) + ":" if name not in _LEFT_ALIGNED else ":" + "-" * (w + 1))
        for name, w in zip(_COLUMNS, widths, strict=True)
    )
    return "\n".join([line(_COLUMNS), rule + "|", *(line(row) for row in rows)])


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


def targets(results: Sequence[Measurement], ledger: LedgerMemory | None) -> list[Target]:
    """The issue's targets, evaluated on this run's ratios."""
    found: list[Target] = []

    def compare(text: str, m: Measurement | None, ref: Measurement | None, metric: _Metric, goal: str) -> None:
        value = ratio(metric(m), metric(ref)) if m and ref and m.ok and ref.ok else None
        if value is None:
            reason = m.missing if m and m.missing else "not measured in this run"
            found.append(Target(text, reason, None))
            return
        bound = float(goal[2:])
        met = value >= bound if goal.startswith(">=") else value <= bound
        found.append(Target(text, f"{value:.2f}x (target {goal.replace('>=', '≥ ').replace('<=', '≤ ')}x)", met))

    for m in results:
        if m.run.scenario == "forward-redis":
            compare(
                f"forward path, Redis, 1 worker, c={m.run.concurrency}: throughput vs naive",
                m,
                baseline(results, m.run, Subject.NAIVE),
                _rps,
                ">=1.0",
            )
    replay = _find(results, "replay-redis", 64)
    compare(
        "replay path, c=64: throughput vs naive",
        replay,
        baseline(results, replay.run, Subject.NAIVE) if replay else None,
        _rps,
        ">=1.5",
    )
    compare(
        "2 workers vs 1 worker (forward path, Redis, c=64): throughput",
        _find(results, "forward-redis-2w", 64),
        _find(results, "forward-redis", 64),
        _rps,
        ">=1.8",
    )
    for scenario, text in (
        ("forward-redis", "concurrency 1: p50 latency through idemproxy vs naive"),
        (
            "forward-redis-awake",
            "concurrency 1 with the CPUs kept out of idle (both proxies): p50 latency through idemproxy vs naive",
        ),
    ):
        single = _find(results, scenario, 1)
        compare(text, single, baseline(results, single.run, Subject.NAIVE) if single else None, _p50, "<=1.5")
    empty = _find(results, "forward-redis", 64)
    first_window = _find(results, "forward-redis-1m", 64)
    compare(
        "forward path with the ledger preloaded vs empty ledger (c=64): throughput",
        _find(results, settled(first_window.run).scenario, 64) if first_window else None,
        empty,
        _rps,
        ">=0.95",
    )
    compare(
        "the same, in the first window after the preload, while Redis doubles its key table: throughput",
        first_window,
        empty,
        _rps,
        ">=0.95",
    )
    if ledger is not None:
        found.append(
            Target(
                "Redis memory per completed record, excluding the stored body",
                f"{ledger.without_body:,.0f} B (target < 1,024 B)",
                ledger.without_body < KB,
            )
        )
    else:
        found.append(Target("Redis memory per completed record", "not measured in this run", None))
    proxies = [m for m in results if m.ok and m.run.subject is Subject.IDEMPROXY and m.peak_rss_mb]
    if proxies:
        worst = max(proxies, key=lambda m: m.peak_rss_mb or 0.0)
        found.append(
            Target(
                "peak RSS per idemproxy worker under load",
                f"{worst.peak_rss_mb:.1f} MB in {worst.run.label} c={worst.run.concurrency} (target < 150 MB)",
                (worst.peak_rss_mb or 0.0) < 150,
            )
        )
    return found


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
    for target in targets(results, ledger):
        mark = {True: "met", False: "MISSED", None: "n/a"}[target.met]
        lines.append(f"- [{mark}] {target.text}: {target.value}")
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
            "targets": [dataclasses.asdict(t) for t in targets(results, ledger)],
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
