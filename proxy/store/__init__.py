"""Ledger stores: Redis for shared deployments, embedded SQLite by default."""

from __future__ import annotations

from idemproxy.config import StoreConfig
from idemproxy.store.base import RecordMissing, Store, StoreError, StoreUnavailable, Transition

__all__ = ["RecordMissing", "Store", "StoreError", "StoreUnavailable", "Transition", "open_store"]


def open_store(config: StoreConfig) -> Store:
    """The store for ``config.url`` (not yet started)."""
    if config.url.startswith(("redis://", "rediss://")):
        from idemproxy.store.redis import RedisStore

        return RedisStore(
            config.url,
            key_prefix=config.key_prefix,
            socket_timeout_s=config.socket_timeout_s,
            max_connections=config.max_connections,
        )
    from idemproxy.store.sqlite import SqliteStore

    return SqliteStore.from_url(config.url)
