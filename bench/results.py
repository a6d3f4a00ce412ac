"""What one run measured, and what the ledger preload measured."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.loadgen import LoadResult
from bench.scenarios import Run


@dataclass
class Measurement:
    run: Run
    load: LoadResult | None = None
    #: CPU time of the process under test (and its children) per request, in µs.
    cpu_us: float | None = None
    #: CPU time of redis-server per request, in µs (Redis-backed runs only).
    store_cpu_us: float | None = None
    #: Largest peak RSS (VmHWM) of any one process under test, in MB.
    peak_rss_mb: float | None = None
    #: Busy share of the whole machine while measuring (100% = all cores).
    host_busy_pct: float | None = None
    #: Cores' worth of CPU that processes outside the benchmark used meanwhile (noise).
    foreign_cores: float | None = None
    #: Cores' worth of CPU the benchmark's own processes used meanwhile (subject, store, upstream, wrk).
    bench_cores: float | None = None
    #: Warnings and errors the process under test logged while measuring: summary -> count.
    log_problems: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Why there is no measurement ("not available yet: ...", or a failure).
    missing: str | None = None

    @property
    def ok(self) -> bool:
        return self.load is not None and self.missing is None

    @property
    def log_problem_count(self) -> int:
        return sum(self.log_problems.values())


@dataclass(frozen=True, slots=True)
class LedgerMemory:
    records: int
    seconds: float
    bytes_per_record: float
    body_bytes: int
    memory_usage_of_real_record: int

    @property
    def without_body(self) -> float:
        return self.bytes_per_record - self.body_bytes
