"""Benchmarks for the multiplexer's bars (overhead, serving efficiency, fairness)."""
