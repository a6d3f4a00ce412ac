"""The ledger over a store (``idemproxy.ledger``): forwarding, probes, reconciling, outages, the completed cache."""
