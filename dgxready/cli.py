"""Glue for Invoke tasks: user errors become a clean message and exit code 1."""
from __future__ import annotations

import functools

from invoke.exceptions import Exit

from dgxready.errors import DgxReadyError
from dgxready.progress import make_console

out = make_console()


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DgxReadyError as exc:
            raise Exit(f"error: {exc}", code=1) from None

    return wrapper
