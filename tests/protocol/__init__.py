"""What the proxy and its clients agree on (``idemproxy.protocol``): problem types, keys, fingerprints."""
