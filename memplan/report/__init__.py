"""Presentation: tables, JSON, CSV. The only layer that converts bytes to GiB/GB."""
