"""Driving wrk with ``bench/wrk/workload.lua`` and reading what it measured."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

import orjson

from bench.procs import BENCH_DIR, BenchError, die_with_parent
from bench.scenarios import HTTP_WORKLOAD, Mode, Workload

SCRIPT = BENCH_DIR / "wrk" / "workload.lua"
_MARKER = "BENCH_RESULT "


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[int, int] = field(default_factory=dict)
    replayed: int = 0
    #: wrk's socket-level errors: connect, read, write, timeout.
    socket_errors: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def non_2xx(self) -> int:
        return sum(count for status, count in self.statuses.items() if not 200 <= status < 300)

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values())

    @classmethod
    def parse(cls, output: str) -> LoadResult:
        line = next((ln for ln in output.splitlines() if ln.startswith(_MARKER)), None)
        if line is None:
            raise BenchError(f"wrk printed no result line:\n{output[-1500:]}")
        data = orjson.loads(line[len(_MARKER) :])
        latency = data["latency_us"]
        errors = data["errors"]
        return cls(
            requests=int(data["requests"]),
            duration_s=data["duration_us"] / 1e6,
            p50_ms=latency["p50"] / 1000,
            p90_ms=latency["p90"] / 1000,
            p99_ms=latency["p99"] / 1000,
            max_ms=latency["max"] / 1000,
            statuses={int(status): int(count) for status, count in data["statuses"].items()},
            replayed=int(data["replayed"]),
            socket_errors={name: int(errors[name]) for name in ("connect", "read", "write", "timeout")},
        )


def run_wrk(
    wrk: str,
    url: str,
    *,
    mode: Mode,
    run_id: str,
    concurrency: int,
    duration_s: int,
    threads: int = 1,
    pool: int = 0,
    request_timeout_s: int = 10,
    workload: Workload = HTTP_WORKLOAD,
) -> LoadResult:
    """One bounded wrk run of ``workload``'s request; ``run_id`` must be unique per call so
    fresh keys never repeat."""
    argv = [
        wrk,
        f"-t{min(threads, concurrency)}",
        f"-c{concurrency}",
        f"-d{duration_s}s",
        f"--timeout={request_timeout_s}s",
        "-s", str(SCRIPT),
        url,
        "--",
        mode.value, run_id, workload.path, workload.body.decode(), str(pool),
        *(f"{name}: {value}" for name, value in workload.headers),
    ]  # fmt: skip
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=duration_s + request_timeout_s + 20,
            check=False,
            cwd=SCRIPT.parent,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {exc.timeout:g}s") from exc
    if done.returncode != 0:
        raise BenchError(f"wrk exited with {done.returncode}:\n{(done.stdout + done.stderr)[-1500:]}")
    return LoadResult.parse(done.stdout)
