"""Project-wide defaults, importable without loading TensorFlow."""

DEFAULT_SEED = 42
"""Seed of the shared initial weights (``build_model``) and of every seeded step by default."""

DEFAULT_METHODS = ("fedavg", "fedprox", "fedmed")
"""The course's three aggregation methods."""
