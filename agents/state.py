"""Durable state in one SQLite file (WAL): sessions keyed by (agent, session), the tool
audit log, idempotency records, leases with fencing tokens, the workspace and the task board.
Each turn commits in one transaction, so a crash between turns loses nothing."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
  agent TEXT NOT NULL, session TEXT NOT NULL, history TEXT NOT NULL DEFAULT '[]',
  turns INTEGER NOT NULL DEFAULT 0, updated REAL NOT NULL, PRIMARY KEY (agent, session));
CREATE TABLE IF NOT EXISTS audit (
  id INTEGER PRIMARY KEY, ts REAL NOT NULL, agent TEXT NOT NULL, session TEXT, tool TEXT NOT NULL,
  outcome TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency (key TEXT PRIMARY KEY, result TEXT NOT NULL, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
  resource TEXT PRIMARY KEY, holder TEXT NOT NULL, token INTEGER NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS fences (resource TEXT PRIMARY KEY, last_token INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS workspace (
  path TEXT PRIMARY KEY, content TEXT NOT NULL, version INTEGER NOT NULL, token INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS taskboard (
  id INTEGER PRIMARY KEY, ts REAL NOT NULL, agent TEXT NOT NULL, item TEXT NOT NULL);
"""


@dataclass(frozen=True)
class SessionState:
    agent: str
    session: str
    history: list[dict]
    turns: int


class StateStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._depth = 0
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def tx(self):
        return _Tx(self)

    def session(self, agent: str, session: str) -> SessionState:
        with self._lock:
            row = self._db.execute(
                "SELECT history, turns FROM sessions WHERE agent=? AND session=?", (agent, session)).fetchone()
        if not row:
            return SessionState(agent, session, [], 0)
        return SessionState(agent, session, json.loads(row[0]), row[1])

    def append_turn(self, agent: str, session: str, messages: list[dict]) -> int:
        with self.tx() as db:
            row = db.execute("SELECT history, turns FROM sessions WHERE agent=? AND session=?",
                             (agent, session)).fetchone()
            history = json.loads(row[0]) if row else []
            turns = (row[1] if row else 0) + 1
            db.execute("INSERT INTO sessions(agent, session, history, turns, updated) VALUES(?,?,?,?,?) "
                       "ON CONFLICT(agent, session) DO UPDATE SET history=excluded.history, "
                       "turns=excluded.turns, updated=excluded.updated",
                       (agent, session, json.dumps(history + messages), turns, time.time()))
        return turns

    def audit(self, agent: str, session: str | None, tool: str, outcome: str, detail: str) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO audit(ts, agent, session, tool, outcome, detail) VALUES(?,?,?,?,?,?)",
                       (time.time(), agent, session, tool, outcome, detail[:2000]))

    def audit_rows(self) -> list[tuple]:
        with self._lock:
            return self._db.execute(
                "SELECT agent, session, tool, outcome, detail FROM audit ORDER BY id").fetchall()


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT under the store's lock: one writer at a time, all or nothing.
    Nested use joins the outer transaction."""

    def __init__(self, store: StateStore):
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        self.store._lock.acquire()
        if self.store._depth == 0:
            self.store._db.execute("BEGIN IMMEDIATE")
        self.store._depth += 1
        return self.store._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.store._depth -= 1
            if self.store._depth == 0:
                self.store._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.store._lock.release()
