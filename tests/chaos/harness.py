"""The chaos suite: many agents, several proxies, one Redis, a misbehaving tool, and faults.

Simulated agents issue operations through two or more real ``idemproxy run``
processes, with retries, concurrent duplicates (up to ``max_copies``) and
abandoned requests, against a tool (``tests.chaos.tool``) that logs every
side effect durably and misbehaves on purpose (timeouts, commit-then-reset,
502s, 503s). Meanwhile a fault injector SIGKILLs and restarts proxies, pauses
them past their lease, and restarts and briefly stops Redis.

Afterwards the checker verifies, for every operation id:

1. the tool performed its side effect at most once (its own log says so);
2. every definitive answer any caller got is the same, and true (it names the
   effect the tool logged);
3. no operation is lost: it is COMPLETED, or visibly NEEDS_ATTENTION, or
   RELEASED with no effect at the tool — never PENDING or UNKNOWN once the
   reconcilers have settled;
4. the ledger agrees with the tool: a COMPLETED record holds the answer the
   tool gave for its one effect.

``python -m tests.chaos.harness --operations 10000`` (``make chaos``) runs a
long campaign and prints the counts; tests/chaos/test_chaos.py runs a short one
in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from idemproxy.config.settings import StoreConfig
from idemproxy.lifecycle.records import UNRESOLVED_STATES, OperationRecord, State
from idemproxy.protocol.keys import Scope, operation_id
from idemproxy.store import open_store
from tests.chaos.tool import reconcile_config
from tests.support.processes import wait_http
from tests.support.redis_server import RedisServer, free_port, restartable_port

ROUTE = "tool"
CALLER = "anonymous"
#: Answers after which an agent tries again (after a short pause).
RETRYABLE = frozenset({409, 502, 503, 504})


@dataclass(frozen=True)
class ChaosConfig:
    operations: int = 2000
    agents: int = 24
    proxies: int = 2
    duplicate_rate: float = 0.1  # operations sent as several concurrent copies
    max_copies: int = 10
    abandon_rate: float = 0.03  # requests the agent gives up on mid-flight
    fault_every_s: tuple[float, float] = (0.8, 2.0)
    operation_deadline_s: float = 60.0
    settle_timeout_s: float = 60.0
    tool_faults: dict[str, float] = field(
        default_factory=lambda: {"timeout": 0.02, "reset": 0.03, "bad_gateway": 0.03, "unavailable": 0.03}
    )
    seed: int = 1


@dataclass
class Answer:
    status: int
    body: bytes
    replayed: bool


@dataclass
class Report:
    operations: int = 0
    requests: int = 0
    abandoned: int = 0
    answers: Counter[int] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    duplicates_prevented: int = 0
    reconciled: int = 0
    completed: int = 0
    needs_attention: int = 0
    released_unfinished: int = 0
    effects: int = 0
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        rows = [
            ("operations", self.operations),
            ("requests sent", self.requests),
            ("requests abandoned by agents", self.abandoned),
            *((f"answers {status}", count) for status, count in sorted(self.answers.items())),
            *((f"fault: {kind}", count) for kind, count in sorted(self.faults.items())),
            ("side effects at the tool", self.effects),
            ("duplicate side effects prevented (replayed answers)", self.duplicates_prevented),
            ("operations COMPLETED", self.completed),
            ("  of which reconciled from the tool's state", self.reconciled),
            ("operations NEEDS_ATTENTION", self.needs_attention),
            ("operations RELEASED without effect (agent gave up)", self.released_unfinished),
            ("violations", len(self.violations)),
            ("seconds", round(self.seconds, 1)),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


class Deployment:
    """Redis, the tool and the proxy processes, each restartable."""

    def __init__(self, directory: Path, config: ChaosConfig) -> None:
        self.directory = directory
        self.config = config
        # Proxies and Redis are restarted on their ports mid-campaign, while the campaign's
        # own connections hold ephemeral ports.
        self.redis = RedisServer(directory / "redis", port=restartable_port())
        self.tool_port = free_port()
        self.tool_log = directory / "effects.log"
        self.tool: subprocess.Popen[bytes] | None = None
        self.ports = [(restartable_port(), restartable_port()) for _ in range(config.proxies)]
        self.proxies: list[subprocess.Popen[bytes] | None] = [None] * config.proxies

    @property
    def proxy_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{listen}" for listen, _ in self.ports]

    def start(self) -> None:
        self.redis.start()
        self.tool = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.tool", "--port", str(self.tool_port), "--log", str(self.tool_log),
             "--seed", str(self.config.seed)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=_repo_root(),
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{self.tool_port}/effects?key=-")
        for index in range(len(self.proxies)):
            self.start_proxy(index)

    def start_proxy(self, index: int) -> None:
        listen, admin = self.ports[index]
        config = {
            "listen": f"127.0.0.1:{listen}",
            "admin_listen": f"127.0.0.1:{admin}",
            "log_level": "warning",
            "store": {"url": self.redis.url, "socket_timeout": "500ms"},
            "routes": [
                {
                    "name": ROUTE,
                    "prefix": "/",
                    "upstream": f"http://127.0.0.1:{self.tool_port}",
                    "connect_timeout": "500ms",
                    "read_timeout": "700ms",
                    "lease": "2s",
                    "wait": "3s",
                    "max_attempts": 50,
                    "reconcile": reconcile_config(max_backoff="1s", max_probes=40, on_demand_timeout="2s"),
                }
            ],
        }
        path = self.directory / f"proxy-{index}.yaml"
        path.write_text(yaml.safe_dump(config))
        with open(self.directory / f"proxy-{index}.log", "ab") as log:  # the child keeps its own copy
            self.proxies[index] = subprocess.Popen(
                [sys.executable, "-m", "idemproxy", "run", "--config", str(path)], stdout=log, stderr=log
            )
        try:
            wait_http(f"http://127.0.0.1:{admin}/healthz")
        except RuntimeError as exc:
            log_tail = (self.directory / f"proxy-{index}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"proxy {index} did not start: {exc}\n{log_tail}") from None

    def kill_proxy(self, index: int) -> None:
        process = self.proxies[index]
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.wait()

    def signal_proxy(self, index: int, signum: int) -> None:
        process = self.proxies[index]
        if process is not None and process.poll() is None:
            process.send_signal(signum)

    def stop(self) -> None:
        for index in range(len(self.proxies)):
            self.kill_proxy(index)
        if self.tool is not None:
            self.tool.kill()
            self.tool.wait()
        if self.redis.process is not None:
            self.redis.process.send_signal(signal.SIGCONT)
        self.redis.kill()


class Campaign:
    def __init__(self, deployment: Deployment, config: ChaosConfig) -> None:
        self.deployment = deployment
        self.config = config
        self.random = random.Random(config.seed)
        self.report = Report(operations=config.operations)
        self.answers: dict[str, list[Answer]] = {}
        self._stop_faults = asyncio.Event()
        self._fault_lock = asyncio.Lock()

    async def run(self) -> Report:
        started = time.monotonic()
        keys = [f"op-{n}" for n in range(self.config.operations)]
        queue: asyncio.Queue[str] = asyncio.Queue()
        for key in keys:
            queue.put_nowait(key)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
            await self._set_tool_faults(session, self.config.tool_faults)
            injector = asyncio.create_task(self._inject_faults())
            await asyncio.gather(*(self._agent(session, queue) for _ in range(self.config.agents)))
            self._stop_faults.set()
            await injector
            await self._set_tool_faults(session, {})
        await self._check(keys)
        self.report.seconds = time.monotonic() - started
        return self.report

    # -- agents ----------------------------------------------------------------------

    async def _agent(self, session: aiohttp.ClientSession, queue: asyncio.Queue[str]) -> None:
        while not queue.empty():
            key = queue.get_nowait()
            copies = 1
            if self.random.random() < self.config.duplicate_rate:
                copies = self.random.randint(2, self.config.max_copies)
            await asyncio.gather(*(self._until_answered(session, key) for _ in range(copies)))

    async def _until_answered(self, session: aiohttp.ClientSession, key: str) -> None:
        deadline = time.monotonic() + self.config.operation_deadline_s
        while time.monotonic() < deadline:
            url = self.random.choice(self.deployment.proxy_urls) + "/act"
            self.report.requests += 1
            if self.random.random() < self.config.abandon_rate:
                self.report.abandoned += 1
                request = asyncio.ensure_future(self._send(session, url, key))
                await asyncio.sleep(self.random.uniform(0, 0.3))
                request.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError, TimeoutError):
                    await request
                continue
            try:
                answer = await self._send(session, url, key)
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(self.random.uniform(0.05, 0.3))
                continue
            self.report.answers[answer.status] += 1
            self.answers.setdefault(key, []).append(answer)
            if answer.status not in RETRYABLE or b"needs-attention" in answer.body:
                return
            await asyncio.sleep(self.random.uniform(0.05, 0.3))

    async def _send(self, session: aiohttp.ClientSession, url: str, key: str) -> Answer:
        async with session.post(url, json={"key": key}, headers={"Idempotency-Key": key}) as response:
            body = await response.read()
            return Answer(response.status, body, response.headers.get("Idempotent-Replayed") == "true")

    # -- faults -------------------------------------------------------------------------

    async def _inject_faults(self) -> None:
        low, high = self.config.fault_every_s
        kinds = ["kill_proxy", "pause_proxy", "restart_redis", "pause_redis"]
        while not self._stop_faults.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_faults.wait(), self.random.uniform(low, high))
                return
            kind = self.random.choice(kinds)
            self.report.faults[kind] += 1
            await asyncio.to_thread(self._fault, kind)

    def _fault(self, kind: str) -> None:
        deployment = self.deployment
        index = self.random.randrange(len(deployment.proxies))
        if kind == "kill_proxy":
            deployment.kill_proxy(index)
            deployment.start_proxy(index)
        elif kind == "pause_proxy":  # past its lease: a zombie when it wakes
            deployment.signal_proxy(index, signal.SIGSTOP)
            time.sleep(2.5)
            deployment.signal_proxy(index, signal.SIGCONT)
        elif kind == "restart_redis":
            deployment.redis.restart()
        elif kind == "pause_redis":
            assert deployment.redis.process is not None
            deployment.redis.process.send_signal(signal.SIGSTOP)
            time.sleep(1.0)
            deployment.redis.process.send_signal(signal.SIGCONT)

    async def _set_tool_faults(self, session: aiohttp.ClientSession, faults: dict[str, float]) -> None:
        url = f"http://127.0.0.1:{self.deployment.tool_port}/_chaos/faults"
        async with session.post(url, json=faults) as response:
            response.raise_for_status()

    # -- the invariants ----------------------------------------------------------------

    async def _check(self, keys: list[str]) -> None:
        report = self.report
        store = open_store(StoreConfig(url=self.deployment.redis.url))
        await store.start()
        try:
            await self._settle(store)
            effects: dict[str, list[int]] = {}
            for line in self.deployment.tool_log.read_bytes().splitlines():
                entry = orjson.loads(line)
                effects.setdefault(entry["key"], []).append(entry["effect_id"])
            report.effects = sum(len(ids) for ids in effects.values())
            report.faults.update(_tool_faults_seen(self.answers))
            for key in keys:
                record = await store.get(operation_id(Scope(caller=CALLER, route=ROUTE, key=key)))
                self._check_operation(key, record, effects.get(key, []))
        finally:
            await store.close()

    async def _settle(self, store: Any) -> None:
        """Wait (bounded) until the reconcilers have settled every unknown outcome."""
        deadline = time.monotonic() + self.config.settle_timeout_s
        while time.monotonic() < deadline:
            counts = await store.count_unresolved()
            if counts[State.PENDING] == 0 and counts[State.UNKNOWN] == 0:
                return
            await asyncio.sleep(0.5)

    def _check_operation(self, key: str, record: OperationRecord | None, effect_ids: list[int]) -> None:
        report = self.report
        violations = report.violations
        answers = self.answers.get(key, [])
        report.duplicates_prevented += sum(answer.replayed for answer in answers)
        if len(effect_ids) > 1:
            violations.append(f"{key}: {len(effect_ids)} side effects at the tool: {effect_ids}")
        definitive = {(answer.status, answer.body) for answer in answers if 200 <= answer.status < 300}
        if len(definitive) > 1:
            violations.append(f"{key}: conflicting answers {sorted(definitive)}")
        for status, body in definitive:
            if orjson.loads(body).get("effect_id") not in effect_ids:
                violations.append(f"{key}: answered {status} {body!r} but the tool logged {effect_ids}")
        for answer in answers:
            if answer.status not in RETRYABLE and not 200 <= answer.status < 300:
                violations.append(f"{key}: unexpected answer {answer.status} {answer.body[:200]!r}")
        if record is None:
            if effect_ids or definitive:
                violations.append(f"{key}: no record, but effects {effect_ids} / answers {definitive}")
            return
        if record.state in UNRESOLVED_STATES - {State.NEEDS_ATTENTION}:
            violations.append(f"{key}: still {record.state.value} after settling")
        elif record.state is State.NEEDS_ATTENTION:
            report.needs_attention += 1
        elif record.state is State.RELEASED:
            if effect_ids:
                violations.append(f"{key}: RELEASED but the tool performed {effect_ids}")
            report.released_unfinished += 1
        elif record.state is State.COMPLETED:
            report.completed += 1
            report.reconciled += record.reconciled
            stored = record.response
            if stored is None or stored.body is None or not effect_ids:
                violations.append(f"{key}: COMPLETED with {stored} but the tool logged {effect_ids}")
            elif orjson.loads(stored.body).get("effect_id") != effect_ids[0]:
                violations.append(f"{key}: ledger says {stored.body!r}, the tool logged {effect_ids}")
            elif definitive and definitive != {(stored.status, stored.body)}:
                violations.append(f"{key}: callers got {definitive}, the ledger holds {stored.status} {stored.body!r}")


def _tool_faults_seen(answers: dict[str, list[Answer]]) -> Counter[str]:
    seen: Counter[str] = Counter()
    for key_answers in answers.values():
        for answer in key_answers:
            if b"upstream-timeout" in answer.body:
                seen["tool: timeout (seen by callers)"] += 1
            elif b"upstream-connection-lost" in answer.body:
                seen["tool: commit-then-reset (seen by callers)"] += 1
            elif answer.status == 502:
                seen["tool: 502 (seen by callers)"] += 1
            elif answer.status == 503 and b"ledger-unavailable" not in answer.body:
                seen["tool: 503 (seen by callers)"] += 1
            elif b"ledger-unavailable" in answer.body:
                seen["ledger unreachable: 503 fail-closed (seen by callers)"] += 1
    return seen


def _repo_root() -> str:
    return str(Path(__file__).resolve().parent.parent.parent)


async def run_campaign(config: ChaosConfig, directory: Path) -> Report:
    deployment = Deployment(directory, config)
    await asyncio.to_thread(deployment.start)
    try:
        return await Campaign(deployment, config).run()
    finally:
        await asyncio.to_thread(deployment.stop)


def main() -> int:
    parser = argparse.ArgumentParser(description="Run a chaos campaign against real idemproxy processes.")
    parser.add_argument("--operations", type=int, default=10_000)
    parser.add_argument("--agents", type=int, default=32)
    parser.add_argument("--proxies", type=int, default=2)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--keep", action="store_true", help="keep the logs and data directory")
    args = parser.parse_args()
    config = ChaosConfig(operations=args.operations, agents=args.agents, proxies=args.proxies, seed=args.seed)
    directory = Path(tempfile.mkdtemp(prefix="idemproxy-chaos-"))
    report = asyncio.run(run_campaign(config, directory))
    if report.violations or args.keep:
        print(f"logs and data kept in {directory}")
    else:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"chaos campaign: seed {config.seed}, {config.proxies} proxies, {config.agents} agents\n")
    print(report.table())
    for violation in report.violations[:50]:
        print(f"VIOLATION {violation}")
    return 1 if report.violations else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
