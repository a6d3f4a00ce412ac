"""Reconcile hooks (``reconcile.hook: tests.support_hooks:<name>``) for the config and probe tests."""

from __future__ import annotations

from typing import Any

import aiohttp

from idemproxy.probes import ProbeResult
from idemproxy.records import OperationRecord


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
