"""Ledger stores: Redis for shared deployments, embedded SQLite by default."""

from __future__ import annotations

from typing import TYPE_CHECKING

from idemproxy.config.redis_urls import is_redis_url, missing_redis_client
from idemproxy.lifecycle.transitions import Transition
from idemproxy.store.base import Hazard, RecordMissing, Store, StoreError, StoreUnavailable, StoreUnsafe

if TYPE_CHECKING:  # only opening a store needs the config
    from idemproxy.config.settings import StoreConfig

__all__ = [
    "Hazard",
    "RecordMissing",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "StoreUnsafe",
    "Transition",
    "open_store",
]


def open_store(config: StoreConfig) -> Store:
    """The store for ``config.url`` (not yet started)."""
    if is_redis_url(config.url):
        if missing := missing_redis_client():
            raise StoreError(missing)
        from idemproxy.store.redis import RedisStore

        return RedisStore.from_url(
            config.url,
            key_prefix=config.key_prefix,
            socket_timeout_s=config.socket_timeout_s,
            max_connections=config.max_connections,
            min_replicas_ack=config.min_replicas_ack,
            replica_ack_timeout_s=config.replica_ack_timeout_s,
            allow_eviction=config.allow_eviction,
        )
    from idemproxy.store.sqlite import SqliteStore

    return SqliteStore.from_url(config.url, synchronous=config.sqlite_synchronous)
