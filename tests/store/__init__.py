"""The ledger stores (``idemproxy.store``): the contract on SQLite and Redis, Redis topologies, safety and faults."""
