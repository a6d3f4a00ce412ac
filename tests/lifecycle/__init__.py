"""An operation's life (``idemproxy.lifecycle``): records, states and the decisions tables."""
