"""Memory models: one module per component, small pure functions returning int bytes.

Importing this package must not import pulp, pandas, rich or typer.
"""
