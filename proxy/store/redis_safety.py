"""What a Redis node holding ledger keys must be configured like, read from the
node and judged.

- Eviction: only ``maxmemory-policy noeviction`` keeps every record. Under
  ``allkeys-*`` Redis drops any key when memory runs out, under ``volatile-*``
  exactly those with a TTL (completed records); a retry of an evicted
  operation is then forwarded again. The policy comes from ``CONFIG GET``, or
  from ``INFO memory`` where a managed service disables ``CONFIG``.
- Replicas: ``INFO replication``'s ``connected_slaves`` decides the default
  of ``min_replicas_ack`` for a plain Redis, and warns when a master has fewer
  replicas than reservations wait for.

Reading is I/O at the edge (``read_node``); the judgment (``eviction_hazard``)
is a pure function of what was read, and ``Verdict`` keeps the latest one and
reports it: ``hazards`` for readiness, the ``idemproxy_store_unsafe`` gauge, and
log lines, each said once per change.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from idemproxy import metrics
from idemproxy.store.base import Hazard, StoreUnsafe

log = logging.getLogger(__name__)

SAFE_POLICY = "noeviction"
#: ``Hazard.reason`` (and the ``idemproxy_store_unsafe`` label) of an evicting node.
EVICTION = "eviction"

#: Sends one command to one node and returns redis-py's reply.
Send = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """What one master said. ``None``: it refused to say (the command is disabled
    or not permitted to this user)."""

    node: str
    policy: str | None
    replicas: int | None


async def read_node(node: str, send: Send) -> NodeSettings:
    """``node``'s eviction policy and connected replicas. A command the node refuses
    leaves its value ``None``; an unreachable node raises (redis-py's errors)."""
    # CONFIG is disabled on managed services (or not permitted to this user): INFO says it too.
    config = await _answer(send, "CONFIG", "GET", "maxmemory-policy")
    policy = _config_value(config, "maxmemory-policy") if config is not None else None
    if policy is None:
        memory = await _answer(send, "INFO", "memory")
        policy = _info_value(memory, "maxmemory_policy") if memory is not None else None
    replication = await _answer(send, "INFO", "replication")
    connected = _info_value(replication, "connected_slaves") if replication is not None else None
    return NodeSettings(node, policy, int(connected) if connected is not None else None)


def eviction_hazard(nodes: Sequence[NodeSettings], *, accepted: bool) -> Hazard | None:
    """The hazard of the nodes whose policy may evict records, or ``None``.
    A policy that could not be read is not one (``unreadable`` names those)."""
    evicting = [node for node in nodes if node.policy is not None and node.policy != SAFE_POLICY]
    if not evicting:
        return None
    which = ", ".join(f"{node.node} has maxmemory-policy {node.policy}" for node in evicting)
    detail = (
        f"redis {which}: it evicts ledger records when memory runs out, and a retry of an evicted operation "
        f"runs the call again; run `CONFIG SET maxmemory-policy {SAFE_POLICY}` and put "
        f"'maxmemory-policy {SAFE_POLICY}' in redis.conf (a managed service: its parameter group), "
        "or set store.allow_eviction: true to accept the risk"
    )
    return Hazard(EVICTION, detail, accepted=accepted)


def unreadable(nodes: Sequence[NodeSettings]) -> list[str]:
    """The nodes whose policy could be read neither by CONFIG nor by INFO."""
    return [node.node for node in nodes if node.policy is None]


class Verdict:
    """The latest judgment of the masters' settings, and how it is reported."""

    def __init__(self, *, allow_eviction: bool) -> None:
        self.allow_eviction = allow_eviction
        self.hazards: tuple[Hazard, ...] = ()
        #: The last read succeeded (else the next one comes sooner).
        self.current = False
        self._unreadable_warned = False

    def at_start(self, nodes: Sequence[NodeSettings]) -> None:
        """Judge ``nodes`` as the store starts: ``StoreUnsafe`` for a hazard not accepted."""
        for hazard in self._judge(nodes):
            if not hazard.accepted:
                raise StoreUnsafe(hazard.detail)
            log.warning(
                f"store.allow_eviction is set, so the proxy starts, but the ledger can lose records: {hazard.detail}"
            )

    def again(self, nodes: Sequence[NodeSettings]) -> tuple[Hazard, ...]:
        """Judge ``nodes`` while the store runs; a change is logged."""
        before = self.hazards
        hazards = self._judge(nodes)
        if hazards == before:
            return hazards
        for hazard in hazards:
            if hazard.accepted:
                log.warning(f"store.allow_eviction is set, but the ledger can lose records: {hazard.detail}")
            else:
                log.error(f"the ledger can lose records; /readyz fails until this is fixed: {hazard.detail}")
        if not hazards:
            log.info(f"no Redis master may evict ledger records any more (maxmemory-policy {SAFE_POLICY})")
        return hazards

    def _judge(self, nodes: Sequence[NodeSettings]) -> tuple[Hazard, ...]:
        hazard = eviction_hazard(nodes, accepted=self.allow_eviction)
        self.hazards = (hazard,) if hazard is not None else ()
        self.current = True
        metrics.STORE_UNSAFE.labels(EVICTION).set(0 if hazard is None else 1)
        if (hidden := unreadable(nodes)) and not self._unreadable_warned:
            self._unreadable_warned = True
            log.warning(
                f"cannot read the maxmemory-policy of redis {', '.join(hidden)} (CONFIG and INFO refused): "
                f"whether it may evict ledger records is unknown; make sure it runs maxmemory-policy {SAFE_POLICY}"
            )
        return self.hazards


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _answer(send: Send, *command: str) -> Any:
    """The node's reply to ``command``, or ``None`` if it refuses the command."""
    try:
        return await send(*command)
    except ResponseError:
        return None


def _config_value(reply: Any, name: str) -> str | None:
    """A ``CONFIG GET`` reply: a mapping, or a flat list of names and values (RESP2)."""
    pairs = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)
    for key, value in pairs:
        if _text(key) == name:
            return _text(value)
    return None


def _info_value(reply: Any, name: str) -> str | None:
    """A field of an ``INFO`` reply (parsed by redis-py into a mapping, or raw text)."""
    if isinstance(reply, dict):
        value = reply.get(name)
        return None if value is None else _text(value)
    for line in _text(reply).splitlines():
        key, sep, value = line.partition(":")
        if sep and key == name:
            return value.strip()
    return None
