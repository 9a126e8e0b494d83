"""A model's tensors, with their HF names and shapes, built from a ModelSpec."""
