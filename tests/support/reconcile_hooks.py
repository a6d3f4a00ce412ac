"""A reconcile hook (``module:function``) used by the tests: looks the effect up at the tool."""

from __future__ import annotations

import aiohttp

from idemproxy.probes import ProbeResult
from idemproxy.records import OperationRecord

#: Set by the test to the upstream's base URL.
UPSTREAM_URL = ""


async def lookup_effect(record: OperationRecord, session: aiohttp.ClientSession) -> ProbeResult:
    async with session.get(f"{UPSTREAM_URL}/lookup", params={"key": record.scope.key}) as response:
        if response.status != 200:
            return ProbeResult.unknown(f"lookup answered {response.status}")
        matches = (await response.json())["matches"]
    if not matches:
        return ProbeResult.absent(source="hook")
    return ProbeResult.found(200, b'{"found_by": "hook"}', source="hook")
