"""HTTP on the wire (``idemproxy.wire``): the listener's server, the upstream client, header hygiene."""
