"""The MCP scenarios' requests and upstream, the targets table, and the run's time budget
(the harness's logic only: no nginx, wrk or Redis, and nothing timed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.loadgen import LoadResult
from bench.procs import BenchError, mcp_config, upstream_locations
from bench.report import Target, scaling_ceiling, table, targets, targets_table
from bench.results import Measurement
from bench.run import _estimate_s, _parser, _select, _settings
from bench.scenarios import (
    BASELINES,
    MCP_UPSTREAM_BODY,
    SCENARIOS,
    UPSTREAM_ANSWERS,
    Mode,
    Protocol,
    Run,
    Shape,
    StoreKind,
    Subject,
    plan,
)
from bench.sysinfo import describe_frequency
from idemproxy.config.mcp import McpConfig, RouteMode
from idemproxy.config.settings import load_config
from idemproxy.lifecycle.decisions import COMPLETED
from idemproxy.modes.mcp_messages import (
    Message,
    ToolCall,
    classify_reply,
    parse_messages,
    recorded_call,
    response_to,
    with_id,
)


def _call(key: str) -> ToolCall:
    workload = Protocol.MCP.workload
    message = parse_messages(workload.body_for(key))
    assert isinstance(message, Message)
    call = recorded_call(message, McpConfig())
    assert call is not None
    return call


def test_the_mcp_request_is_a_recorded_tools_call_with_its_key_in_meta() -> None:
    first, second = _call("run-1-0"), _call("run-1-1")

    assert (first.name, first.key, second.key) == ("create_ticket", "run-1-0", "run-1-1")
    assert first.fingerprint == second.fingerprint  # the key is not part of the call
    headers = Protocol.MCP.workload.headers_for("run-1-0")
    assert "Idempotency-Key" not in headers  # the key travels in the body
    assert headers["Accept"] == "application/json, text/event-stream"


def test_the_http_request_carries_its_key_in_the_header() -> None:
    workload = Protocol.HTTP.workload
    assert not workload.key_in_body
    assert workload.body_for("k") == workload.body
    assert workload.headers_for("k") == {"Content-Type": "application/json", "Idempotency-Key": "k"}


def test_the_mcp_upstream_answers_the_call_and_a_replay_gives_it_back_unchanged() -> None:
    call = _call("k")
    reply = response_to(MCP_UPSTREAM_BODY, call.request_id)

    assert reply is not None
    assert classify_reply(reply) is COMPLETED
    assert with_id(MCP_UPSTREAM_BODY, call.request_id) == MCP_UPSTREAM_BODY  # what check_replays compares


def test_the_upstream_serves_each_answer_on_its_path() -> None:
    locations = upstream_locations(UPSTREAM_ANSWERS)

    assert "location / {" in locations
    assert "location = /mcp {" in locations
    assert f"return 200 '{MCP_UPSTREAM_BODY.decode()}';" in locations
    with pytest.raises(BenchError, match="quotes"):
        upstream_locations({"/": b"it's"})


def test_the_mcp_route_config_is_one_mcp_route(tmp_path: Path) -> None:
    path = tmp_path / "idemproxy.yaml"
    path.write_text(mcp_config("http://127.0.0.1:9000", "/mcp"))

    (route,) = load_config(path, environ={}).routes
    assert (route.name, route.prefix, route.mode) == ("mcp", "/mcp", RouteMode.MCP)


def test_mcp_runs_are_compared_with_mcp_baselines() -> None:
    runs = plan(list(SCENARIOS), list(BASELINES))
    mcp = [run for run in runs if run.shape is Shape.MCP]

    assert [run.label for run in mcp] == ["direct MCP", "nginx MCP", "naive MCP", "forward-mcp", "replay-mcp"]
    assert all(run.protocol is Protocol.MCP and run.concurrency == 64 for run in mcp)
    assert mcp[-1].mode is Mode.REPLAY

    naive_post = Run("naive", Subject.NAIVE, Mode.FRESH, 64)
    naive_mcp = Run("naive", Subject.NAIVE, Mode.FRESH, 64, protocol=Protocol.MCP)
    forward_mcp = Run("forward-mcp", Subject.IDEMPROXY, Mode.FRESH, 64, StoreKind.REDIS, protocol=Protocol.MCP)
    results = [_measured(naive_post, 1000), _measured(naive_mcp, 2000), _measured(forward_mcp, 3000)]
    row = next(line for line in table(results).splitlines() if line.startswith("| forward-mcp"))
    assert [cell.strip() for cell in row.split("|")][3:5] == ["3,000", "1.50x"]  # against naive MCP
    judged = {t.text.split(" ÷")[0]: t for t in targets(results, None)}
    assert judged["forward-mcp c=64 req/s"].measured == pytest.approx(1.5)
    assert judged["forward-mcp c=64 req/s"].met is True


def _measured(run: Run, rps: float, *, bench_cores: float | None = None, cpu_us: float = 100.0) -> Measurement:
    load = LoadResult(int(rps * 10), 10.0, 1.0, 1.0, 2.0, 3.0, {200: int(rps * 10)})
    return Measurement(run, load, cpu_us=cpu_us, peak_rss_mb=50.0, bench_cores=bench_cores)


def test_the_scaling_ceiling_is_what_the_cores_carry_at_one_workers_cost() -> None:
    one = _measured(Run("forward-redis", Subject.IDEMPROXY, Mode.FRESH, 64), 7000, bench_cores=1.4)
    two = _measured(Run("forward-redis-2w", Subject.IDEMPROXY, Mode.FRESH, 64, workers=2), 9000)

    assert scaling_ceiling(one, 2, cores=2) == pytest.approx(10_000)  # 7,000 req/s x 2 cores / 1.4 cores
    assert scaling_ceiling(one, 2, cores=8) == pytest.approx(14_000)  # never more than twice one worker
    judged = {t.text.split(" ÷")[0]: t for t in targets([one, two], None, cores=2)}
    efficiency = judged["forward-redis-2w c=64 req/s"]
    assert efficiency.measured == pytest.approx(0.9)
    assert efficiency.met is True
    assert "ceiling 10,000 req/s" in efficiency.note


def test_cpu_per_request_is_judged_against_nginx() -> None:
    nginx = _measured(Run("nginx", Subject.NGINX, Mode.FRESH, 64), 50_000, cpu_us=12.0)
    forward = _measured(Run("forward-redis", Subject.IDEMPROXY, Mode.FRESH, 64), 7000, cpu_us=60.0)

    judged = {t.text: t for t in targets([nginx, forward], None)}
    cpu = judged["forward-redis c=64 CPU µs/req ÷ nginx proxy_pass"]
    assert (cpu.measured, cpu.met) == (5.0, False)  # 60 / 12 > 4.5


def test_the_targets_table_shows_measured_over_target_for_every_target() -> None:
    found = [
        Target("faster", 1.5, at_least=True, measured=1.2),
        Target("smaller", 400, at_least=False, measured=300.0, unit=" B"),
        Target("absent", 1.0, at_least=True, note="not measured in this run"),
    ]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in targets_table(found).splitlines()[2:]]

    assert rows[0] == ["faster", "1.20x", "≥ 1.50x", "0.80", "MISSED", ""]
    assert rows[1] == ["smaller", "300 B", "≤ 400 B", "0.75", "met", ""]
    assert rows[2] == ["absent", "n/a", "≥ 1.00x", "", "n/a", "not measured in this run"]


def test_every_issue_target_is_in_the_table() -> None:
    texts = [t.text for t in targets([], None)]

    assert len(texts) == 14
    for start in (
        "forward-sqlite c=64 req/s ÷ forward-redis c=64",
        "forward-sqlite c=1 p50 ÷ forward-redis c=1 p50",
        "forward-redis-awake c=1 p50 ÷ naive proxy",
        "forward-redis c=8 req/s ÷ naive proxy",
        "forward-redis c=64 req/s ÷ naive proxy",
        "forward-redis c=64 CPU µs/req ÷ nginx proxy_pass",
        "forward-redis-2w c=64 req/s ÷ the 2-worker ceiling",
        "forward-mcp c=64 req/s ÷ naive proxy MCP",
        "replay-mcp c=64 req/s ÷ naive proxy MCP",
        "forward-redis-1m-settled c=64 req/s ÷ forward-redis c=64",
        "Redis memory per completed record",
    ):
        assert any(text.startswith(start) for text in texts), start


@pytest.mark.parametrize(("argv", "limit_s"), [([], 600), (["--quick"], 90)])
def test_the_whole_run_fits_its_time(argv: list[str], limit_s: float) -> None:
    args = _parser().parse_args(argv)
    assert _estimate_s(plan(*_select(args)), _settings(args)) < limit_s


def test_the_frequency_state_is_described(tmp_path: Path) -> None:
    for cpu, now in (("cpu0", "2000000"), ("cpu1", "3000000")):
        policy = tmp_path / cpu / "cpufreq"
        policy.mkdir(parents=True)
        (policy / "scaling_governor").write_text("performance\n")
        (policy / "scaling_min_freq").write_text("1500000\n")
        (policy / "scaling_max_freq").write_text("3500000\n")
        (policy / "scaling_cur_freq").write_text(now + "\n")
    assert describe_frequency(tmp_path) == "governor performance, 1,500-3,500 MHz allowed, 2,000-3,000 MHz now"

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu MHz\t\t: 2596.001\nprocessor\t: 1\ncpu MHz\t\t: 2596.002\n")
    assert describe_frequency(tmp_path / "none", cpuinfo) == (
        "no cpufreq governor (fixed, or set by the host), cpuinfo 2,596 MHz"
    )
