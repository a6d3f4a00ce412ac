"""The benchmark harness's own logic, without nginx, wrk or Redis (and never timing anything)."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bench.idle import CannotKeepAwake, cpus_kept_awake, describe_idle
from bench.ledger_fill import _encode_chunk, record_key
from bench.loadgen import LoadResult
from bench.naive_proxy import build_app
from bench.report import table, targets
from bench.results import LedgerMemory, Measurement
from bench.run import _problem
from bench.scenarios import BASELINES, SCENARIOS, Mode, Run, StoreKind, Subject, plan, settled
from bench.sysinfo import cpu_seconds, peak_rss_mb
from idemproxy.lifecycle.records import Evidence, OperationRecord, State, StoredResponse
from idemproxy.protocol.keys import Scope
from idemproxy.store import redis_record

Client = Callable[..., Awaitable[TestClient[Any, Any]]]
Server = Callable[..., Awaitable[TestServer]]


async def test_naive_proxy_forwards_request_and_answer(aiohttp_server: Server, aiohttp_client: Client) -> None:
    seen: list[tuple[str, str, bytes, dict[str, str]]] = []

    async def tool(request: web.Request) -> web.Response:
        seen.append((request.method, request.path_qs, await request.read(), dict(request.headers)))
        return web.Response(status=201, body=b'{"ok":true}', headers={"X-Tool": "yes"})

    upstream_app = web.Application()
    upstream_app.router.add_route("*", "/{tail:.*}", tool)
    upstream = await aiohttp_server(upstream_app)
    client = await aiohttp_client(build_app(str(upstream.make_url(""))))

    response = await client.post(
        "/v1/tickets?a=1", data=b'{"t":1}', headers={"Idempotency-Key": "k1", "Keep-Alive": "timeout=5"}
    )

    assert response.status == 201
    assert await response.read() == b'{"ok":true}'
    assert response.headers["X-Tool"] == "yes"
    method, path, body, headers = seen[0]
    assert (method, path, body) == ("POST", "/v1/tickets?a=1", b'{"t":1}')
    assert headers["Idempotency-Key"] == "k1"
    assert "Keep-Alive" not in headers  # hop-by-hop: never forwarded


def test_wrk_result_line_is_parsed() -> None:
    output = (
        "Running 1s test\n"
        'BENCH_RESULT {"requests":1000,"duration_us":2000000,'
        '"latency_us":{"p50":1500,"p90":2500,"p99":9000,"max":12000,"mean":1700.5},'
        '"errors":{"connect":0,"read":2,"write":0,"status":3,"timeout":1},'
        '"statuses":{"200":997,"409":3},"replayed":10}\n'
    )
    result = LoadResult.parse(output)
    assert result.rps == 500
    assert (result.p50_ms, result.p99_ms) == (1.5, 9.0)
    assert result.non_2xx == 3
    assert result.errors == 3  # read + timeout; status errors are counted as non-2xx
    assert result.replayed == 10


def _measured(run: Run, rps: float, p50_ms: float, cpu_us: float = 100.0) -> Measurement:
    load = LoadResult(int(rps * 10), 10.0, p50_ms, p50_ms, p50_ms * 2, p50_ms * 3, {200: int(rps * 10)})
    return Measurement(run, load, cpu_us=cpu_us, peak_rss_mb=50.0)


def test_ratios_use_the_baseline_of_the_same_concurrency_and_shape() -> None:
    naive_1 = Run("naive", Subject.NAIVE, Mode.FRESH, 1)
    naive_64 = Run("naive", Subject.NAIVE, Mode.FRESH, 64)
    naive_get = Run("naive", Subject.NAIVE, Mode.GET, 64)
    forward = Run("forward-redis", Subject.IDEMPROXY, Mode.FRESH, 64, StoreKind.REDIS)
    passthrough = Run("passthrough-get", Subject.IDEMPROXY, Mode.GET, 64, StoreKind.REDIS)
    results = [
        _measured(naive_1, 3000, 0.3),
        _measured(naive_64, 4000, 10.0),
        _measured(forward, 1000, 40.0, cpu_us=400.0),
        _measured(naive_get, 2000, 8.0),
        _measured(passthrough, 3000, 12.0),
    ]
    rows = {line.split("|")[1].strip(): line for line in table(results).splitlines()[2:] if "64" in line}
    forward_cells = [cell.strip() for cell in rows["forward-redis"].split("|")]
    assert forward_cells[3:5] == ["1,000", "0.25x"]  # req/s and its ratio to naive at c=64
    assert forward_cells[7:9] == ["40.00", "4.00x"]  # p50 and its ratio
    assert forward_cells[11:13] == ["400", "4.00x"]  # CPU per request
    assert forward_cells[5] == ""  # no nginx baseline in this run: no ratio rather than a wrong one
    passthrough_cells = [cell.strip() for cell in rows["passthrough-get"].split("|")]
    assert passthrough_cells[4] == "1.50x"  # against the GET baseline, not the POST one


def test_targets_are_judged_on_ratios_and_say_what_was_not_measured() -> None:
    naive = Run("naive", Subject.NAIVE, Mode.FRESH, 64)
    forward = Run("forward-redis", Subject.IDEMPROXY, Mode.FRESH, 64, StoreKind.REDIS)
    replay = Run("replay-redis", Subject.IDEMPROXY, Mode.REPLAY, 64, StoreKind.REDIS)
    two = Run("forward-redis-2w", Subject.IDEMPROXY, Mode.FRESH, 64, StoreKind.REDIS, workers=2)
    preloaded = Run("forward-redis-1m", Subject.IDEMPROXY, Mode.FRESH, 64, StoreKind.REDIS, preloaded=1_000_000)
    results = [
        _measured(naive, 1000, 10.0),
        _measured(forward, 1400, 12.0),
        _measured(replay, 1200, 8.0),
        Measurement(two, missing="not available yet"),
        _measured(preloaded, 1300, 12.0),
        _measured(settled(preloaded), 1360, 12.0),
    ]
    ledger = LedgerMemory(
        records=10, seconds=1.0, bytes_per_record=480.0, body_bytes=100, memory_usage_of_real_record=0
    )
    judged = {target.text.split(" ÷")[0]: target for target in targets(results, ledger)}
    assert judged["forward-redis c=64 req/s"].met is True  # 1.4x >= 1.3x
    assert judged["forward-redis c=64 req/s"].quotient == pytest.approx(1.4 / 1.3)
    assert judged["replay-redis c=64 req/s"].met is False  # 1.2x < 1.5x
    assert judged["forward-redis-2w c=64 req/s"].met is None
    assert judged["forward-redis-2w c=64 req/s"].value == "not available yet"
    assert judged["forward-redis c=8 req/s"].value == "not measured in this run"
    memory = judged["Redis memory per completed record, besides the stored body"]
    assert (memory.measured, memory.met) == (380.0, True)
    # The preloaded ledger is judged on its settled window (1360/1400), and its first window is shown too.
    assert judged["forward-redis-1m-settled c=64 req/s"].met is True
    assert judged["forward-redis-1m c=64 req/s"].met is False


def test_plan_measures_baselines_next_to_each_scenario() -> None:
    runs = plan(list(SCENARIOS), list(BASELINES))
    at_64 = [(run.subject, run.mode.shape) for run in runs if run.concurrency == 64]
    assert at_64[:3] == [(Subject.DIRECT, "POST"), (Subject.NGINX, "POST"), (Subject.NAIVE, "POST")]
    get_runs = [run for run in runs if run.mode is Mode.GET]
    assert [run.subject for run in get_runs] == [*BASELINES, Subject.IDEMPROXY]
    assert [run.concurrency for run in runs] == sorted(run.concurrency for run in runs)
    assert {run.scenario for run in runs if not run.is_baseline} == {s.name for s in SCENARIOS}


def test_awake_runs_are_compared_only_with_baselines_measured_awake() -> None:
    runs = plan(list(SCENARIOS), list(BASELINES))
    awake_at_1 = [run for run in runs if run.awake]
    assert [run.subject for run in awake_at_1] == [*BASELINES, Subject.IDEMPROXY, Subject.IDEMPROXY]
    assert {run.concurrency for run in awake_at_1} == {1}
    assert [run.scenario for run in awake_at_1[3:]] == ["forward-redis-awake", "forward-sqlite-awake"]
    assert awake_at_1[2].label == "naive POST awake"

    naive = Run("naive", Subject.NAIVE, Mode.FRESH, 1)
    naive_awake = Run("naive", Subject.NAIVE, Mode.FRESH, 1, awake=True)
    forward = Run("forward-redis", Subject.IDEMPROXY, Mode.FRESH, 1, StoreKind.REDIS)
    forward_awake = Run("forward-redis-awake", Subject.IDEMPROXY, Mode.FRESH, 1, StoreKind.REDIS, awake=True)
    results = [
        _measured(naive, 3000, 0.30),
        _measured(forward, 1500, 0.60),
        _measured(naive_awake, 5000, 0.20),
        _measured(forward_awake, 3500, 0.28),
    ]
    judged = {target.text.split(" ÷")[0]: target for target in targets(results, None)}
    awake = judged["forward-redis-awake c=1 p50"]
    assert awake.value == "1.40x (target ≤ 1.20x)"  # against naive awake (0.20 ms), not naive (0.30 ms)
    assert awake.met is False


def test_cpus_are_kept_awake_exactly_while_held(tmp_path: Path) -> None:
    device = tmp_path / "cpu_dma_latency"
    device.touch()
    open_before = set(os.listdir("/proc/self/fd"))
    with cpus_kept_awake(device):
        assert device.read_bytes() == b"\x00\x00\x00\x00"  # a latency bound of 0 µs
        assert len(set(os.listdir("/proc/self/fd")) - open_before) == 1
    assert set(os.listdir("/proc/self/fd")) == open_before


def test_keeping_the_cpus_awake_without_the_device_says_why(tmp_path: Path) -> None:
    with (
        pytest.raises(CannotKeepAwake, match=r"cannot keep the CPUs out of idle: .*missing: No such file"),
        cpus_kept_awake(tmp_path / "missing"),
    ):
        raise AssertionError("entered without the device")


def test_the_idle_regime_is_described(tmp_path: Path) -> None:
    cpuidle, poll_ns = tmp_path / "cpuidle", tmp_path / "guest_halt_poll_ns"
    cpuidle.mkdir()
    (cpuidle / "current_driver").write_text("haltpoll\n")
    (cpuidle / "current_governor_ro").write_text("haltpoll\n")
    poll_ns.write_text("0\n")
    assert describe_idle(cpuidle, poll_ns) == "cpuidle haltpoll (haltpoll), guest halt polling 0 ns"
    assert describe_idle(tmp_path / "absent", tmp_path / "absent") == "cpuidle none"


def test_only_the_pure_scenario_runs_the_pure_build() -> None:
    runs = plan(list(SCENARIOS), [])

    assert {run.scenario for run in runs if run.pure} == {"forward-redis-pure"}
    assert {run.concurrency for run in runs if run.pure} == {1, 64}


def _parse_resp(data: bytes) -> list[list[bytes]]:
    commands, at = [], 0
    while at < len(data):
        end = data.index(b"\r\n", at)
        count, at = int(data[at + 1 : end]), end + 2
        parts = []
        for _ in range(count):
            end = data.index(b"\r\n", at)
            length = int(data[at + 1 : end])
            parts.append(data[end + 2 : end + 2 + length])
            at = end + 4 + length
        commands.append(parts)
    return commands


def test_preloaded_records_are_the_proxys_records_under_new_keys() -> None:
    template = OperationRecord(
        op_id="0" * 32,
        scope=Scope("anonymous", "default", "template"),
        state=State.COMPLETED,
        fence=1,
        fingerprint="f" * 64,
        attempt=1,
        owner="host:1:abc:1",
        lease_until_ms=0,
        method="POST",
        target="/v1/tickets",
        created_ms=1,
        updated_ms=2,
        response=StoredResponse(200, (("Content-Type", "application/json"),), b"{}", 2, "e" * 64),
        evidence=(Evidence(1, "reserved", {"attempt": 1, "owner": "host:1:abc:1"}), Evidence(2, "completed")),
    )
    commands = _parse_resp(_encode_chunk((template, 86_400_000, "seed", 3, 5)))

    assert [parts[0] for parts in commands] == [b"SET", b"SET"]
    first = commands[0]
    assert first[1].decode() == record_key("seed-3")
    assert first[3:] == [b"PX", b"86400000"]
    op_id = first[1].decode().rsplit(":", 1)[1]
    record = redis_record.unpack(op_id, first[2])
    assert record.scope == Scope("anonymous", "default", "seed-3")
    assert record.evolve(op_id=template.op_id, scope=template.scope) == template


def test_log_problems_are_summarised() -> None:
    json_line = '{"level":"error","msg":"unhandled error","exc":"Traceback\\n  ...\\nValueError: boom"}'
    assert _problem(json_line) == "error: unhandled error (ValueError: boom)"
    assert _problem('{"level":"info","msg":"idemproxy listening"}') is None
    assert _problem("ConnectionResetError: peer gone") == "ConnectionResetError: peer gone"
    assert _problem("  File x.py, line 3") is None


def test_proc_sampling_reads_this_process() -> None:
    assert cpu_seconds(os.getpid()) >= 0
    assert peak_rss_mb(os.getpid()) > 0
