"""Owner-only SQLite files (they hold agents' conversations, keys' uses and team knowledge),
made so without dropping the locks SQLite holds on them."""
from __future__ import annotations

import os
from pathlib import Path

PRIVATE = 0o600


def create_private(path: Path) -> None:
    """A new database file readable by the owner only. An existing one is never opened here:
    closing any descriptor of a file drops every POSIX lock this process holds on it, the locks
    SQLite's other connections in this process rely on (then another process may checkpoint and
    reset the WAL under them, and two writers read the same version)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE))
    except FileExistsError:
        pass


def restrict(path: Path) -> None:
    """The database and its WAL and shared-memory files, owner only (chmod takes no lock; SQLite
    creates the latter two with the database's mode)."""
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if p.exists():
            os.chmod(p, PRIVATE)
