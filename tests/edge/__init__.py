"""What both listeners put in front of a request (``idemproxy.edge``): authentication and budgets."""
