"""Faults injected into real components, checked against the invariants: at most one effect
per operation, the same answer for every duplicate, nothing lost or stuck."""
