"""Reading configuration (``idemproxy.config``): settings, routes, budgets, reconcile blocks, units, examples."""
