"""Catalogs of models and GPUs: data files validated by pydantic schemas."""
