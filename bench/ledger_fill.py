"""Putting completed operations in the ledger before a measurement.

Two ways, both yielding records the proxy itself made or would make:

- ``complete_through_proxy``: real requests through a running idemproxy (the
  replay scenario's keys);
- ``preload_redis``: a large number of records cloned from one the proxy
  really completed, each re-encoded with the Redis store's own record
  layout (``store.redis_record``), key layout and operation ids, and
  pipelined into Redis with ``redis-cli --pipe``.

``check_replays`` proves a record replays through the proxy before anything
is measured on top of it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import redis

from bench.procs import LOOPBACK, BenchError, die_with_parent, find_binary
from bench.results import LedgerMemory
from bench.scenarios import CALLER, HTTP_WORKLOAD, ROUTE, Workload
from idemproxy.config.settings import StoreConfig
from idemproxy.lifecycle.records import OperationRecord, State
from idemproxy.protocol.keys import Scope, operation_id
from idemproxy.store import redis_record
from idemproxy.store.redis_schema import RedisKeys

_CHUNK = 20_000
_KEYS = RedisKeys(StoreConfig().key_prefix)


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    replayed: bool
    body: bytes


async def _post(session: aiohttp.ClientSession, url: str, key: str, workload: Workload) -> Answer:
    async with session.post(
        url + workload.path, data=workload.body_for(key), headers=workload.headers_for(key)
    ) as response:
        body = await response.read()
        return Answer(response.status, response.headers.get("Idempotent-Replayed") == "true", body)


def complete_through_proxy(
    url: str, keys: Sequence[str], concurrency: int = 32, workload: Workload = HTTP_WORKLOAD
) -> None:
    """POST ``workload``'s request once per key through the proxy; each must be forwarded
    and answered 200 with the upstream's answer."""

    async def main() -> None:
        queue = iter(keys)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def worker() -> None:
                for key in queue:
                    answer = await _post(session, url, key, workload)
                    if answer.status != 200 or answer.replayed or answer.body != workload.answer:
                        raise BenchError(
                            f"completing {key!r} through the proxy: status {answer.status}, "
                            f"replayed={answer.replayed}: {answer.body[:300]!r}"
                        )

            await asyncio.gather(*(worker() for _ in range(concurrency)))

    asyncio.run(main())


def check_replays(url: str, key: str, workload: Workload = HTTP_WORKLOAD) -> None:
    """``key`` must come back as a replay of the upstream's answer, byte for byte."""

    async def main() -> Answer:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            return await _post(session, url, key, workload)

    answer = asyncio.run(main())
    if answer.status != 200 or not answer.replayed or answer.body != workload.answer:
        raise BenchError(
            f"{key!r} did not replay through the proxy: status {answer.status}, "
            f"replayed={answer.replayed}, body {answer.body[:300]!r}"
        )


def record_key(key: str) -> str:
    """The Redis key holding the operation the proxy creates for ``key``."""
    return _KEYS.record(operation_id(Scope(caller=CALLER, route=ROUTE, key=key)))


def preload_redis(port: int, template_key: str, key_prefix: str, count: int) -> LedgerMemory:
    """Write ``count`` completed records for keys ``{key_prefix}-0`` ... into Redis.

    ``template_key`` must already be completed through the proxy: its record,
    re-encoded with each new scope and operation id, is what every key gets.
    """
    client = redis.Redis(host=LOOPBACK, port=port)
    try:
        template_key_name = record_key(template_key)
        raw: bytes | None = client.get(template_key_name)  # type: ignore[assignment]
        if raw is None:
            raise BenchError(f"no record for the template key {template_key!r} in Redis")
        template = redis_record.unpack(template_key_name.rsplit(":", 1)[1], raw)
        if template.state is not State.COMPLETED or template.response is None:
            raise BenchError(f"the template record is {template.state}, not a completed response")
        ttl_ms = int(client.pttl(template_key_name))
        real_usage = int(client.memory_usage(template_key_name, samples=0) or 0)
        before = int(client.info("memory")["used_memory"])
        started = time.monotonic()
        _pipe(port, _chunks(template, ttl_ms, key_prefix, count), count)
        seconds = time.monotonic() - started
        after = int(client.info("memory")["used_memory"])
        body = template.response.body or b""
        return LedgerMemory(count, seconds, (after - before) / count, len(body), real_usage)
    finally:
        client.close()


@dataclass(frozen=True, slots=True)
class KeyTable:
    """How many keys Redis holds, and what its key tables (keys and expiries) take."""

    keys: int
    table_bytes: int

    @classmethod
    def of(cls, port: int) -> KeyTable:
        """Read from the Redis on ``port``; a table that is being rehashed counts both halves."""
        client = redis.Redis(host=LOOPBACK, port=port)
        try:
            stats = client.memory_stats()
            database = stats.get("db.0") or {}
            tables = int(database.get("overhead.hashtable.main", 0)) + int(
                database.get("overhead.hashtable.expires", 0)
            )
            return cls(int(client.dbsize()), tables)
        finally:
            client.close()

    def change_to(self, after: KeyTable) -> str:
        return (
            f"Redis keys {self.keys:,} → {after.keys:,}, key tables "
            f"{self.table_bytes / 1e6:.0f} → {after.table_bytes / 1e6:.0f} MB"
        )


def flush_to_disk(directory: Path) -> float:
    """fsync every file under ``directory``; returns the seconds it took."""
    started = time.monotonic()
    for path in directory.rglob("*"):
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
    return time.monotonic() - started


def _chunks(template: OperationRecord, ttl_ms: int, key_prefix: str, count: int) -> Iterator[bytes]:
    jobs = [(template, ttl_ms, key_prefix, start, min(start + _CHUNK, count)) for start in range(0, count, _CHUNK)]
    processes = min(2, multiprocessing.cpu_count())
    with multiprocessing.get_context("fork").Pool(processes, initializer=_default_signals) as pool:
        yield from pool.imap(_encode_chunk, jobs)


def _default_signals() -> None:
    # Forked from the harness, whose handlers turn SIGTERM into KeyboardInterrupt;
    # the pool's own shutdown (SIGTERM) must end a worker quietly.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _encode_chunk(job: tuple[OperationRecord, int, str, int, int]) -> bytes:
    """RESP for ``SET ... PX`` of each record in the job's key range, with the template's evidence and TTL."""
    template, ttl_ms, key_prefix, start, stop = job
    ttl = str(ttl_ms).encode()
    evidence = b"".join(redis_record.pack_evidence(entry) for entry in template.evidence)
    out: list[bytes] = []
    for index in range(start, stop):
        scope = Scope(caller=CALLER, route=ROUTE, key=f"{key_prefix}-{index}")
        op_id = operation_id(scope)
        value = redis_record.pack(template.evolve(op_id=op_id, scope=scope), evidence)
        out.append(_resp([b"SET", _KEYS.record(op_id).encode(), value, b"PX", ttl]))
    return b"".join(out)


def _resp(parts: list[bytes]) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out += (b"$%d\r\n" % len(part), part, b"\r\n")
    return b"".join(out)


def _pipe(port: int, chunks: Iterator[bytes], count: int) -> None:
    cli = find_binary("redis-cli")
    process = subprocess.Popen(
        [cli, "-h", LOOPBACK, "-p", str(port), "--pipe"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,  # noqa: PLW1509
    )
    assert process.stdin is not None
    try:
        for chunk in chunks:
            process.stdin.write(chunk)
        output = process.communicate(timeout=120)[0].decode(errors="replace")  # closes stdin
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    match = re.search(r"errors: (\d+), replies: (\d+)", output)
    if match is None or int(match.group(1)) != 0 or int(match.group(2)) != count:
        raise BenchError(f"redis-cli --pipe did not load {count} records:\n{output[-1000:]}")
