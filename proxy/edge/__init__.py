"""What both listeners put in front of a request: authentication, budgets, problem+json, observation."""
