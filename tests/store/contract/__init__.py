"""The store contract: one suite, run against the SQLite and the Redis ledger."""
