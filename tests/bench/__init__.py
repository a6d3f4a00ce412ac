"""The benchmark harness (``bench/``)."""
