"""The planner: a search space, an analytic step-time model, and an ILP that picks the best plan."""
