"""Benchmarks for the provisioning bars."""
