"""The ledger: thin I/O shells that persist lifecycle transitions (reserve, finish,
leases, reconciliation and its probes) through a store."""
