"""Durable state in one SQLite file (WAL, mode 600): sessions keyed by (agent, session) with one
row per turn, the tool audit log, idempotency records, leases with fencing tokens, the workspace
and the task board. Each turn commits in one transaction, so a crash between turns loses nothing.
A session keeps its newest turns within a turn and byte bound; the audit log, the task board
and idle sessions are pruned after a retention period (idempotency records by agents.tools)."""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS sessions (
      agent TEXT NOT NULL, session TEXT NOT NULL, turns INTEGER NOT NULL DEFAULT 0,
      kept_turns INTEGER NOT NULL DEFAULT 0, kept_bytes INTEGER NOT NULL DEFAULT 0,
      updated REAL NOT NULL, PRIMARY KEY (agent, session))""",
    """CREATE TABLE IF NOT EXISTS session_turns (
      agent TEXT NOT NULL, session TEXT NOT NULL, turn INTEGER NOT NULL, messages TEXT NOT NULL,
      bytes INTEGER NOT NULL, PRIMARY KEY (agent, session, turn))""",
    """CREATE TABLE IF NOT EXISTS audit (
      id INTEGER PRIMARY KEY, ts REAL NOT NULL, agent TEXT NOT NULL, session TEXT, tool TEXT NOT NULL,
      outcome TEXT NOT NULL, detail TEXT NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS idempotency (key TEXT PRIMARY KEY, result TEXT NOT NULL, ts REAL NOT NULL)",
    """CREATE TABLE IF NOT EXISTS leases (
      resource TEXT PRIMARY KEY, holder TEXT NOT NULL, token INTEGER NOT NULL, expires REAL NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS fences (resource TEXT PRIMARY KEY, last_token INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS workspace (
      path TEXT PRIMARY KEY, content TEXT NOT NULL, version INTEGER NOT NULL, token INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS taskboard (
      id INTEGER PRIMARY KEY, ts REAL NOT NULL, agent TEXT NOT NULL, item TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS sessions_updated ON sessions(updated)",
    "CREATE INDEX IF NOT EXISTS audit_ts ON audit(ts)",
    "CREATE INDEX IF NOT EXISTS idempotency_ts ON idempotency(ts)",
    "CREATE INDEX IF NOT EXISTS taskboard_ts ON taskboard(ts)",
)
PRIVATE = 0o600
DAY_S = 86400.0


@dataclass(frozen=True)
class StateLimits:
    """What the store keeps: per session, the newest `session_max_turns` turns within
    `session_max_bytes` (the newest turn is always kept); everywhere, `retention_days`, checked
    at most every `retention_check_s`."""
    session_max_turns: int = 100
    session_max_bytes: int = 1 << 20
    retention_days: float = 30.0
    retention_check_s: float = 600.0


@dataclass(frozen=True)
class SessionState:
    agent: str
    session: str
    history: list[dict]
    turns: int
    kept_turns: int = 0


@dataclass(frozen=True)
class Pruned:
    audit: int
    taskboard: int
    sessions: int


def private_files(path: Path) -> None:
    """The database and its WAL and shared-memory files, readable by the owner only (they hold
    every agent's conversations); SQLite creates the latter two with the database's mode."""
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, PRIVATE))
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if p.exists():
            os.chmod(p, PRIVATE)


def columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def split_turns(history: list[dict]) -> list[list[dict]]:
    """A whole-history list (the first schema) as turns: each turn ended with the answer."""
    turns, current = [], []
    for message in history:
        current.append(message)
        if message.get("role") == "assistant":
            turns.append(current)
            current = []
    return turns + ([current] if current else [])


class StateStore:
    def __init__(self, path: Path, limits: StateLimits | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.limits = limits or StateLimits()
        self._lock = threading.RLock()
        self._depth = 0
        private_files(path)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self.tx() as db:
            self._migrate_whole_histories(db)
            for statement in SCHEMA:
                db.execute(statement)
        private_files(path)
        self._next_retention = 0.0
        self.retention_due()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def tx(self):
        return _Tx(self)

    def _migrate_whole_histories(self, db: sqlite3.Connection) -> None:
        """The first schema kept a session's whole history in one JSON column; move it to rows."""
        if "history" not in columns(db, "sessions"):
            return
        old = db.execute("SELECT agent, session, history, turns, updated FROM sessions").fetchall()
        db.execute("DROP TABLE sessions")
        for statement in SCHEMA[:2]:
            db.execute(statement)
        for agent, session, history, turns, updated in old:
            chunks = split_turns(json.loads(history))
            last = max(turns, len(chunks))
            sizes = [self._insert_turn(db, agent, session, number, json.dumps(messages))
                     for number, messages in enumerate(chunks, start=last - len(chunks) + 1)]
            kept, kept_bytes = self._prune_session(db, agent, session, len(sizes), sum(sizes))
            self._save_session(db, agent, session, last, kept, kept_bytes, updated)

    def session(self, agent: str, session: str) -> SessionState:
        """The session's counters and every turn it keeps (the GET session endpoint)."""
        with self._lock:
            row = self._db.execute("SELECT turns, kept_turns FROM sessions WHERE agent=? AND session=?",
                                   (agent, session)).fetchone()
            rows = self._db.execute("SELECT messages FROM session_turns WHERE agent=? AND session=? "
                                    "ORDER BY turn", (agent, session)).fetchall()
        if not row:
            return SessionState(agent, session, [], 0)
        return SessionState(agent, session, [m for (text,) in rows for m in json.loads(text)], row[0], row[1])

    def recent_history(self, agent: str, session: str, turns: int) -> list[dict]:
        """The messages of the session's last `turns` turns, oldest first; reads those rows only."""
        if turns <= 0:
            return []
        with self._lock:
            rows = self._db.execute("SELECT messages FROM session_turns WHERE agent=? AND session=? "
                                    "ORDER BY turn DESC LIMIT ?", (agent, session, turns)).fetchall()
        return [m for (text,) in reversed(rows) for m in json.loads(text)]

    def append_turn(self, agent: str, session: str, messages: list[dict]) -> int:
        """Adds one turn's row and prunes the oldest beyond the bounds; earlier turns are not read."""
        payload = json.dumps(messages)
        with self.tx() as db:
            row = db.execute("SELECT turns, kept_turns, kept_bytes FROM sessions WHERE agent=? AND session=?",
                             (agent, session)).fetchone()
            turns, kept, kept_bytes = row or (0, 0, 0)
            size = self._insert_turn(db, agent, session, turns + 1, payload)
            kept, kept_bytes = self._prune_session(db, agent, session, kept + 1, kept_bytes + size)
            self._save_session(db, agent, session, turns + 1, kept, kept_bytes, time.time())
        self.retention_due()
        return turns + 1

    def _insert_turn(self, db: sqlite3.Connection, agent: str, session: str, number: int,
                     payload: str) -> int:
        size = len(payload.encode())
        db.execute("INSERT INTO session_turns(agent, session, turn, messages, bytes) VALUES(?,?,?,?,?)",
                   (agent, session, number, payload, size))
        return size

    def _prune_session(self, db: sqlite3.Connection, agent: str, session: str, kept: int,
                       kept_bytes: int) -> tuple[int, int]:
        limits = self.limits
        while kept > 1 and (kept > limits.session_max_turns or kept_bytes > limits.session_max_bytes):
            number, size = db.execute("SELECT turn, bytes FROM session_turns WHERE agent=? AND session=? "
                                      "ORDER BY turn LIMIT 1", (agent, session)).fetchone()
            db.execute("DELETE FROM session_turns WHERE agent=? AND session=? AND turn=?",
                       (agent, session, number))
            kept, kept_bytes = kept - 1, kept_bytes - size
        return kept, kept_bytes

    def _save_session(self, db: sqlite3.Connection, agent: str, session: str, turns: int, kept: int,
                      kept_bytes: int, updated: float) -> None:
        db.execute("INSERT INTO sessions(agent, session, turns, kept_turns, kept_bytes, updated) "
                   "VALUES(?,?,?,?,?,?) ON CONFLICT(agent, session) DO UPDATE SET turns=excluded.turns, "
                   "kept_turns=excluded.kept_turns, kept_bytes=excluded.kept_bytes, updated=excluded.updated",
                   (agent, session, turns, kept, kept_bytes, updated))

    def audit(self, agent: str, session: str | None, tool: str, outcome: str, detail: str) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO audit(ts, agent, session, tool, outcome, detail) VALUES(?,?,?,?,?,?)",
                       (time.time(), agent, session, tool, outcome, detail[:2000]))
        self.retention_due()

    def audit_rows(self) -> list[tuple]:
        with self._lock:
            return self._db.execute(
                "SELECT agent, session, tool, outcome, detail FROM audit ORDER BY id").fetchall()

    def retention_due(self) -> Pruned | None:
        """Prunes when `retention_check_s` has passed since the last time: one clock read per write."""
        now = time.monotonic()
        if now < self._next_retention:
            return None
        self._next_retention = now + self.limits.retention_check_s
        return self.prune_older_than(time.time() - self.limits.retention_days * DAY_S)

    def prune_older_than(self, cutoff: float) -> Pruned:
        """Audit rows and task-board items written before `cutoff`, and sessions idle since."""
        with self.tx() as db:
            audit = db.execute("DELETE FROM audit WHERE ts < ?", (cutoff,)).rowcount
            taskboard = db.execute("DELETE FROM taskboard WHERE ts < ?", (cutoff,)).rowcount
            db.execute("DELETE FROM session_turns WHERE (agent, session) IN "
                       "(SELECT agent, session FROM sessions WHERE updated < ?)", (cutoff,))
            sessions = db.execute("DELETE FROM sessions WHERE updated < ?", (cutoff,)).rowcount
        return Pruned(audit, taskboard, sessions)


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
