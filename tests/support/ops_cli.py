"""``idemproxy ops`` as the tests run it: the real CLI as a subprocess against an admin listener,
a finished run, and what a one-line error looks like."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from typing import Any

from aiohttp.test_utils import TestClient

from idemproxy.lifecycle.records import State
from idemproxy.store import Store
from tests.support.records import op_id_for
from tests.support.upstream import Upstream


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


def assert_one_line_error(run: Run, *fragments: str) -> None:
    assert run.code == 1
    assert run.out == ""
    lines = run.err.splitlines()
    assert len(lines) == 1, run.err
    assert lines[0].startswith("idemproxy ops: ")
    assert "Traceback" not in run.err
    for fragment in fragments:
        assert fragment in lines[0]


async def idemproxy_ops(admin_url: str, *args: str) -> Run:
    env = {name: value for name, value in os.environ.items() if name != "IDEMPROXY_ADMIN_URL"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "idemproxy",
        "ops",
        "--admin",
        admin_url,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


@dataclass
class Setup:
    proxy: TestClient[Any, Any]
    admin_url: str
    store: Store
    upstream: Upstream

    async def needs_attention(self, key: str, task: str | None = None) -> str:
        headers = {"Idempotency-Key": key, **({"X-Agent-Task": task} if task else {})}
        assert (await self.proxy.post("/reset", json={"n": 1}, headers=headers)).status == 502
        assert (await self.proxy.post("/reset", json={"n": 1}, headers=headers)).status == 409
        op_id = op_id_for(key)
        record = await self.store.get(op_id)
        assert record is not None
        assert record.state is State.NEEDS_ATTENTION
        return op_id

    async def ops(self, *args: str) -> Run:
        return await idemproxy_ops(self.admin_url, *args)
