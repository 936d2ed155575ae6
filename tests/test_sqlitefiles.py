"""The stores make their SQLite files owner-only without dropping SQLite's own locks: closing any
descriptor of a file drops every POSIX lock the process holds on it (read from /proc/locks)."""
from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from agents.knowledge.store import SqliteKnowledgeStore
from agents.state import StateStore

OPENERS: dict[str, Callable[[Path], object]] = {"state": StateStore, "knowledge": SqliteKnowledgeStore}


def locked_by_me(path: Path) -> bool:
    inode, me = os.stat(path).st_ino, str(os.getpid())
    with open("/proc/locks") as locks:
        return any(f[4] == me and int(f[5].rsplit(":", 1)[-1]) == inode
                   for f in (line.split() for line in locks) if f[1] == "POSIX")


@pytest.mark.parametrize("kind", sorted(OPENERS))
def test_an_opened_store_keeps_sqlites_lock_on_its_database(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"{kind}.db"
    store = OPENERS[kind](path)
    try:
        assert locked_by_me(path), "the WAL connection's shared lock on the database file was dropped"
    finally:
        store.close()


@pytest.mark.parametrize("kind", sorted(OPENERS))
def test_a_reopened_store_keeps_its_files_owner_only_and_its_lock(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"{kind}.db"
    OPENERS[kind](path).close()
    os.chmod(path, 0o644)
    store = OPENERS[kind](path)
    try:
        assert locked_by_me(path)
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            if p.exists():
                assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    finally:
        store.close()
