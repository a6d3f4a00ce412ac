"""``python -m bench``: run the benchmark scenarios and print one table.

One upstream (nginx returning a fixed JSON body) serves every run; wrk drives
each run for a fixed time after a short warm-up; every process under test is
started fresh for its run and stopped after it. The whole run has a time
budget, and every child is stopped on any exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from bench import ledger_fill, procs, report
from bench.idle import CannotKeepAwake, cpus_kept_awake, describe_idle
from bench.loadgen import LoadResult, run_wrk
from bench.procs import LOOPBACK, BenchError, Child, Children
from bench.profile import Profiler, find_py_spy
from bench.results import LedgerMemory, Measurement
from bench.scenarios import (
    BASELINES,
    SCENARIOS,
    UPSTREAM_ANSWERS,
    Mode,
    Protocol,
    Run,
    Scenario,
    StoreKind,
    Subject,
    plan,
    settled,
)
from bench.sysinfo import CpuSnapshot, CpuSpent, machine_info, peak_rss_mb

DEFAULT_OUT = procs.BENCH_DIR / "results" / "latest.md"
#: Seconds measured per run by default: the whole of ``make bench`` stays under 10 minutes.
DEFAULT_DURATION_S = 10
#: Seconds measured per run with ``--quick`` (and no warm-up): the whole run stays under 90 seconds.
QUICK_DURATION_S = 1
#: The last line of a plain-text traceback (the naive proxy logs through aiohttp's defaults).
_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception)(:|$)")


class TimeBudgetExceeded(Exception):
    """The whole run took longer than its budget."""


@dataclass(frozen=True, slots=True)
class Settings:
    duration_s: int
    #: wrk's run before each measured window (0: none, ``--quick``).
    warmup_s: int
    replay_keys: int
    #: Overrides a scenario's preloaded record count (``--quick``), or None.
    preload: int | None
    wrk_threads: int
    #: Where py-spy profiles of idemproxy runs go (``--profile``), or None.
    profile_dir: Path | None = None
    #: The interpreter whose idemproxy is measured; ``pure`` scenarios use this one's.
    idemproxy_python: str = sys.executable

    def describe(self) -> dict[str, Any]:
        warmup = f"after a {self.warmup_s}s warm-up" if self.warmup_s else "without a warm-up"
        described: dict[str, Any] = {
            "duration": f"{self.duration_s}s per run {warmup}",
            "wrk threads": self.wrk_threads,
            "replay pool": f"{self.replay_keys:,} keys",
        }
        if self.preload is not None:
            described["preloaded ledger"] = f"{self.preload:,} records (scaled down)"
        return described


class Bench:
    """Measures runs against one shared upstream."""

    def __init__(self, settings: Settings, children: Children, wrk: str, profiler: Profiler | None) -> None:
        self.settings = settings
        self.children = children
        self.wrk = wrk
        self.profiler = profiler
        self.upstream: Child | None = None
        self.upstream_port = 0
        self.ledger: LedgerMemory | None = None
        self._workers_supported: bool | None = None

    def start(self) -> None:
        self.upstream, self.upstream_port = procs.start_upstream(self.children, UPSTREAM_ANSWERS)

    def measure(self, run: Run) -> list[Measurement]:
        """The run's measurement; a preloaded run gives two (see ``_measure_preloaded``)."""
        try:
            with cpus_kept_awake() if run.awake else contextlib.nullcontext():
                return self._measure(run)
        except CannotKeepAwake as exc:
            return [Measurement(run, missing=f"not available: {exc}")]

    def _measure(self, run: Run) -> list[Measurement]:
        if run.subject is Subject.DIRECT:
            assert self.upstream is not None
            return [self._load(run, self.upstream, self.upstream_port)]
        if run.subject is Subject.NGINX:
            with self._child(*procs.start_nginx_proxy(self.children, self.upstream_port)) as (child, port):
                return [self._load(run, child, port)]
        if run.subject is Subject.NAIVE:
            with self._child(*procs.start_naive(self.children, self.upstream_port)) as (child, port):
                return [self._load(run, child, port)]
        return self._measure_idemproxy(run)

    def _measure_idemproxy(self, run: Run) -> list[Measurement]:
        python = sys.executable if run.pure else self.settings.idemproxy_python
        if run.workers != 1 and not self._supports_workers():
            return [Measurement(run, missing=f"not available yet: `idemproxy run` has no {procs.WORKERS_FLAG} flag")]
        name = f"idemproxy-{run.scenario}-c{run.concurrency}"
        redis: Child | None = None
        if run.store is StoreKind.REDIS:
            redis_name = f"redis-{run.scenario}-c{run.concurrency}"
            redis, redis_port = procs.start_redis(self.children, redis_name)
            store_url = f"redis://{LOOPBACK}:{redis_port}/0"
        else:
            store_dir = self.children.workdir / name
            store_dir.mkdir(parents=True, exist_ok=True)
            store_url = f"sqlite:///{store_dir / 'ledger.db'}"
        store_options = {"sqlite_synchronous": "normal"} if run.store is StoreKind.SQLITE_NORMAL else {}
        mcp_path = run.workload.path if run.protocol is Protocol.MCP else None
        try:
            with self._child(
                *procs.start_idemproxy(
                    self.children, name, python, self.upstream_port, store_url, run.workers, mcp_path, store_options
                )
            ) as (proxy, port):
                url = f"http://{LOOPBACK}:{port}"
                notes: list[str] = []
                pool_prefix, pool = "", 0
                if run.mode is Mode.REPLAY:
                    pool_prefix, pool = f"replay-{secrets.token_hex(3)}", self.settings.replay_keys
                    self._complete(url, run, [f"{pool_prefix}-{i}" for i in range(pool)])
                    notes.append(f"{pool:,} keys completed through the proxy first")
                if run.preloaded:
                    if redis is None:
                        raise BenchError("preloading the ledger is implemented for Redis only")
                    notes.append(self._preload(run, url, redis_port, self.children.workdir / redis_name))
                    return self._measure_preloaded(run, proxy, port, redis, redis_port, notes)
                measurement = self._load(run, proxy, port, store=redis, pool=pool, pool_prefix=pool_prefix)
                measurement.notes[:0] = notes
                return [measurement]
        finally:
            if redis is not None:
                self.children.stop(redis)

    @staticmethod
    def _complete(url: str, run: Run, keys: list[str]) -> None:
        """Complete ``keys`` through the proxy, and check the first one replays."""
        ledger_fill.complete_through_proxy(url, keys, workload=run.workload)
        ledger_fill.check_replays(url, keys[0], run.workload)

    def _preload(self, run: Run, url: str, redis_port: int, redis_dir: Path) -> str:
        count = self.settings.preload if self.settings.preload is not None else run.preloaded
        prefix = f"preload-{secrets.token_hex(3)}"
        template = f"{prefix}-template"
        ledger_fill.complete_through_proxy(url, [template], concurrency=1)
        memory = ledger_fill.preload_redis(redis_port, template, prefix, count)
        ledger_fill.check_replays(url, f"{prefix}-{count // 2}")
        # The load leaves the AOF's last gigabyte in the page cache; writing it back
        # during the measurement would be charged to the scenario.
        flushed_s = ledger_fill.flush_to_disk(redis_dir)
        self.ledger = memory
        return f"{count:,} completed records preloaded, one verified to replay, AOF on disk in {flushed_s:.1f}s"

    def _measure_preloaded(
        self, run: Run, proxy: Child, port: int, redis: Child, redis_port: int, notes: list[str]
    ) -> list[Measurement]:
        """Two windows on the preloaded ledger: the first, and a second once Redis's key table settled.

        A bulk preload leaves the key table just below a power of two, and the first
        window's new keys make Redis double it: an incremental rehash of every key,
        paid once per doubling, that a ledger holding its size does not pay. The
        second window measures holding the records; the key table notes show which
        window grew the table.
        """
        measurements = []
        for window, about in ((run, "the first window after the preload"), (settled(run), "the window after it")):
            before = ledger_fill.KeyTable.of(redis_port)
            measurement = self._load(window, proxy, port, store=redis)
            measurement.notes[:0] = [*notes, about, before.change_to(ledger_fill.KeyTable.of(redis_port))]
            measurements.append(measurement)
        return measurements

    def _load(
        self,
        run: Run,
        subject: Child,
        port: int,
        *,
        store: Child | None = None,
        pool: int = 0,
        pool_prefix: str = "",
    ) -> Measurement:
        url = f"http://{LOOPBACK}:{port}"
        tag = f"{run.scenario}-c{run.concurrency}-{secrets.token_hex(3)}"

        def wrk(phase: str, duration_s: int) -> LoadResult:
            return run_wrk(
                self.wrk,
                url,
                mode=run.mode,
                run_id=pool_prefix if run.mode is Mode.REPLAY else f"{tag}-{phase}",
                concurrency=run.concurrency,
                duration_s=duration_s,
                threads=self.settings.wrk_threads,
                pool=pool,
                workload=run.workload,
            )

        if self.settings.warmup_s > 0:
            wrk("warmup", self.settings.warmup_s)
        log_offset = subject.log.stat().st_size
        pids = {"subject": subject.pid}
        if store is not None:
            pids["store"] = store.pid
        if self.upstream is not None and subject is not self.upstream:
            pids["upstream"] = self.upstream.pid
        before = CpuSnapshot.take(pids)
        profiling = None
        if self.profiler is not None and run.subject is Subject.IDEMPROXY:
            assert self.settings.profile_dir is not None
            profile = self.settings.profile_dir / f"profile-{run.scenario}-c{run.concurrency}.txt"
            profiling = (self.profiler.start(subject.pid, self.settings.duration_s, profile), profile)
        load = wrk("measure", self.settings.duration_s)
        spent = CpuSpent.between(before, CpuSnapshot.take(pids))
        requests = max(load.requests, 1)
        problems = _log_problems(subject, log_offset)
        measurement = Measurement(
            run,
            load,
            cpu_us=spent.processes["subject"] / requests * 1e6,
            store_cpu_us=spent.processes["store"] / requests * 1e6 if store is not None else None,
            peak_rss_mb=peak_rss_mb(subject.pid),
            host_busy_pct=spent.host_busy_pct,
            foreign_cores=spent.foreign_cores,
            bench_cores=spent.bench_cores,
            log_problems=problems,
        )
        if profiling is not None:
            assert self.profiler is not None
            self.profiler.finish(*profiling)
            measurement.notes.append(f"profiled with py-spy: {profiling[1].name}")
        if run.mode in (Mode.REPLAY, Mode.MIXED) or load.replayed:
            measurement.notes.append(f"{100 * load.replayed / requests:.1f}% replayed")
        measurement.notes.append(f"host {spent.host_busy_pct:.0f}% busy, other work {spent.foreign_cores:.2f} cores")
        return measurement

    @contextlib.contextmanager
    def _child(self, child: Child, port: int) -> Iterator[tuple[Child, int]]:
        try:
            yield child, port
        finally:
            self.children.stop(child)

    def _supports_workers(self) -> bool:
        if self._workers_supported is None:
            self._workers_supported = procs.idemproxy_supports_workers(self.settings.idemproxy_python)
        return self._workers_supported


def _log_problems(child: Child, offset: int) -> dict[str, int]:
    """What ``child`` logged above info since ``offset``, summarised and counted."""
    with child.log.open("rb") as log:
        log.seek(offset)
        lines = log.read().decode(errors="replace").splitlines()
    found = Counter(summary for line in lines if (summary := _problem(line)) is not None)
    return dict(found.most_common())


def _problem(line: str) -> str | None:
    if line.startswith("{"):
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            entry = None
        if isinstance(entry, dict):
            level = str(entry.get("level", ""))
            if level not in ("warning", "error", "critical"):
                return None
            exc = str(entry.get("exc") or "").strip().splitlines()
            return f"{level}: {entry.get('msg', '')}" + (f" ({exc[-1][:120]})" if exc else "")
    return line.strip()[:160] if _EXCEPTION_LINE.match(line) else None


# -- the command line ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    names = [s.name for s in SCENARIOS] + [b.value for b in BASELINES]
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark idemproxy against nginx and a naive proxy; print one table.",
    )
    parser.add_argument(
        "--duration", type=int, metavar="S", help=f"seconds measured per run (default {DEFAULT_DURATION_S})"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of every scenario, under 90 seconds")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME[,NAME]",
        help=f"run only these scenarios/baselines (with the baselines they compare to); one of {', '.join(names)}",
    )
    parser.add_argument("--no-baselines", action="store_true", help="skip the baselines (no ratios)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="FILE", help="where the table goes")
    parser.add_argument("--plot", action="store_true", help="also write FILE.png (needs matplotlib)")
    parser.add_argument("--wrk-threads", type=int, default=1, metavar="N", help="wrk threads (default 1)")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy every idemproxy run (stacks written next to FILE)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with configs and logs")
    parser.add_argument(
        "--idemproxy-python",
        default=sys.executable,
        metavar="PYTHON",
        help="the interpreter whose idemproxy is measured (`make bench`: the compiled build's); "
        "forward-redis-pure always runs this interpreter's own",
    )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    # Absolute, not resolved: a venv's python is a symlink that must stay the venv's.
    args.idemproxy_python = os.path.abspath(args.idemproxy_python)
    if not os.access(args.idemproxy_python, os.X_OK):
        raise SystemExit(f"bench: --idemproxy-python {args.idemproxy_python} is not an executable")
    if args.quick:
        return Settings(
            duration_s=args.duration or QUICK_DURATION_S,
            warmup_s=0,
            replay_keys=500,
            preload=50_000,
            wrk_threads=args.wrk_threads,
            profile_dir=args.out.parent if args.profile else None,
            idemproxy_python=args.idemproxy_python,
        )
    duration = args.duration or DEFAULT_DURATION_S
    return Settings(
        duration_s=duration,
        warmup_s=min(3, max(1, duration // 5)),
        replay_keys=5_000,
        preload=None,
        wrk_threads=args.wrk_threads,
        profile_dir=args.out.parent if args.profile else None,
        idemproxy_python=args.idemproxy_python,
    )


def _select(args: argparse.Namespace) -> tuple[list[Scenario], list[Subject]]:
    if not args.only:
        return list(SCENARIOS), [] if args.no_baselines else list(BASELINES)
    wanted = {name.strip() for item in args.only for name in item.split(",") if name.strip()}
    known = {s.name for s in SCENARIOS} | {b.value for b in BASELINES}
    if unknown := wanted - known:
        raise SystemExit(f"bench: unknown scenario {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    scenarios = [s for s in SCENARIOS if s.name in wanted]
    baselines = [b for b in BASELINES if b.value in wanted] or ([] if args.no_baselines else list(BASELINES))
    return scenarios, baselines


#: Seconds to start and stop what a run measures, besides its windows (measured on 2 cores).
_SETUP_S = {Subject.IDEMPROXY: 1.5, Subject.NAIVE: 0.7, Subject.NGINX: 0.2, Subject.DIRECT: 0.1}
#: Checking the tools and builds before the first run.
_START_S = 4.0
#: Operations completed through the proxy per second (replay pools), and records preloaded per second.
_COMPLETED_PER_S = 1500
_PRELOADED_PER_S = 25_000


def _estimate_s(runs: Sequence[Run], settings: Settings) -> float:
    """How long the runs take, set-up included (calibrated on `--quick` runs on 2 cores)."""
    total = _START_S
    for run in runs:
        window = settings.warmup_s + settings.duration_s
        total += window + _SETUP_S[run.subject]
        if run.mode is Mode.REPLAY:
            total += settings.replay_keys / _COMPLETED_PER_S
        if run.preloaded:
            total += window  # its second window
            total += (settings.preload if settings.preload is not None else run.preloaded) / _PRELOADED_PER_S
    return total


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _raise_budget(signum: int, frame: FrameType | None) -> None:
    raise TimeBudgetExceeded


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = _settings(args)
    runs = plan(*_select(args))
    wrk = procs.find_binary("wrk")
    tools = {"wrk": wrk, "nginx": procs.find_binary("nginx", "/usr/sbin", "/usr/local/sbin")}
    if any(run.store is StoreKind.REDIS for run in runs):
        tools["redis-server"] = procs.find_binary("redis-server")
    machine = machine_info(tools)
    machine["idle"] = describe_idle()
    machine["idemproxy build"] = procs.idemproxy_build(settings.idemproxy_python)
    if any(run.pure for run in runs):
        machine["forward-redis-pure build"] = procs.idemproxy_build(sys.executable)
    estimate = _estimate_s(runs, settings)
    budget = int(estimate * 1.5 + 120)
    _say(f"bench: {len(runs)} runs, about {estimate / 60:.1f} min (hard limit {budget / 60:.0f} min)")

    py_spy = find_py_spy() if args.profile else None
    if args.profile and py_spy is None:
        raise SystemExit("bench: --profile needs py-spy (pip install py-spy)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="idemproxy-bench-"))
    children = Children(workdir)
    profiler = Profiler(py_spy, children) if py_spy else None
    bench = Bench(settings, children, wrk, profiler)
    started = time.monotonic()
    results, interrupted = _measure_all(bench, runs, budget)
    elapsed = time.monotonic() - started
    failed = any(m.missing and m.missing.startswith("failed") for m in results)

    described = settings.describe()
    text = report.render(results, machine, described, bench.ledger, elapsed_s=elapsed, interrupted=interrupted)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_bytes(report.to_json(results, machine, described, bench.ledger, elapsed))
    print(text)
    _say(f"bench: table written to {args.out} (and {args.out.with_suffix('.json').name})")
    if args.plot:
        _say("bench: " + report.plot(results, args.out.with_suffix(".png")))
    if args.keep or failed or interrupted:
        _say(f"bench: configs and logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if interrupted or failed else 0


def _measure_all(bench: Bench, runs: Sequence[Run], budget_s: int) -> tuple[list[Measurement], str | None]:
    """Every run in order; stops every child however this ends (Ctrl-C, SIGTERM, budget)."""
    results: list[Measurement] = []
    interrupted: str | None = None
    # SIGINT too: a shell starts background jobs with it ignored, and Ctrl-C must still work.
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in stops}
    signal.signal(signal.SIGALRM, _raise_budget)
    signal.alarm(budget_s)
    try:
        bench.start()
        for index, run in enumerate(runs, 1):
            _say(f"[{index}/{len(runs)}] {run.label} c={run.concurrency} ...", end=" ")
            try:
                measurements = bench.measure(run)
            except BenchError as exc:
                measurements = [Measurement(run, missing=f"failed: {str(exc).splitlines()[0]}")]
                _say(f"\n{exc}")
            except Exception as exc:  # a harness bug: report it, keep measuring the rest
                measurements = [Measurement(run, missing=f"failed: {type(exc).__name__}: {exc}")]
                _say("\n" + traceback.format_exc())
            results += measurements
            _say("; ".join(_summary(measurement) for measurement in measurements))
    except KeyboardInterrupt:
        interrupted = "interrupted"
    except TimeBudgetExceeded:
        interrupted = f"stopped after the time budget of {budget_s}s"
    except BenchError as exc:
        interrupted = f"could not start: {exc}"
    finally:
        signal.alarm(0)
        bench.children.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return results, interrupted


def _summary(m: Measurement) -> str:
    if not m.ok or m.load is None:
        return m.missing or "no result"
    load = m.load
    odd = f", {load.non_2xx} non-2xx, {load.errors} socket errors" if load.non_2xx or load.errors else ""
    return f"{load.rps:,.0f} req/s, p50 {load.p50_ms:.2f} ms, p99 {load.p99_ms:.2f} ms{odd}"


def _say(text: str, end: str = "\n") -> None:
    print(text, end=end, file=sys.stderr, flush=True)
