"""Reproducibility: the smoke test that proves a fresh clone serves the default model."""
