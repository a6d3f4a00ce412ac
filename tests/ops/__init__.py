"""The operator's side (``idemproxy.ops``, metrics, logs): the admin API, the ops CLI, metrics and monitoring."""
