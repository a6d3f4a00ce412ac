"""Reconcile hooks (``reconcile.hook: tests.support.reconcile_hooks:<name>``) used by the tests.

``lookup_effect`` looks the effect up at the tool (``tests/ledger/test_reconcile.py``); the
others answer without I/O, for the config and probe tests (``tests/config/test_reconcile_config.py``,
``tests/ledger/test_probes.py``), and include what the config must refuse as a hook.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from idemproxy.ledger.probes import ProbeResult
from idemproxy.lifecycle.records import OperationRecord

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


async def found_hook(record: OperationRecord, session: aiohttp.ClientSession) -> ProbeResult:
    """Always finds the effect; quotes the key so a test can tell it saw the right record."""
    body = f'{{"found_by": "hook", "key": "{record.scope.key}"}}'.encode()
    return ProbeResult.found(201, body, source="support_hooks")


async def raising_hook(record: OperationRecord, session: aiohttp.ClientSession) -> ProbeResult:
    raise RuntimeError("the tool's lookup API exploded")


async def wrong_type_hook(record: OperationRecord, session: aiohttp.ClientSession) -> Any:
    return {"outcome": "found"}


def sync_hook(record: OperationRecord, session: aiohttp.ClientSession) -> ProbeResult:
    """Not a coroutine function: the config must refuse it."""
    return ProbeResult.absent()


NOT_CALLABLE = "a module attribute that is not a function"
