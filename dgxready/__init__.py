"""Shared plumbing for the dgxready toolkit: settings, validated YAML, atomic files."""

__version__ = "0.1.0"
