"""The request path every mode shares: relay a forward, answer from a record."""
