"""The operator's side: the admin API and the ``idemproxy ops`` command."""
