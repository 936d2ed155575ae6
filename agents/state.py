"""Durable state in one SQLite file (WAL, mode 600): sessions keyed by (agent, session) with one
row per turn, the tool audit log, idempotency records, leases with fencing tokens, the workspace
and the task board. A turn appended with `defer` is in its session's history at once; the
multiplexer writes the deferred turns to the turn journal at the end of the event loop's pass
(`journal_turns()`, one write, see agents.turnlog), and moves them into the tables in one
transaction a little later (`flush_turns()`), or before the next read of the tables. A session
keeps its newest turns within a turn and byte bound; the audit log, the task board and idle
sessions are pruned after a retention period (idempotency records by agents.tools)."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter
from pathlib import Path

import orjson

from agents.messages import message_chars
from agents.turnlog import PendingTurn, TurnLog
from dgxready.sqlitefiles import create_private, restrict

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
    # Every turn moves its session's `updated`, which an index re-sorted on each commit; retention
    # reads it every retention_check_s only, over one row per session.
    "DROP INDEX IF EXISTS sessions_updated",
    "CREATE INDEX IF NOT EXISTS audit_ts ON audit(ts)",
    "CREATE INDEX IF NOT EXISTS idempotency_ts ON idempotency(ts)",
    "CREATE INDEX IF NOT EXISTS taskboard_ts ON taskboard(ts)",
)
DAY_S = 86400.0
# The sessions whose counters and newest turns are held in memory (this process is the only
# writer of its sessions), so a turn neither reads its history nor its counters from the file.
CACHED_SESSIONS = 512
CACHED_TURNS = 32
# Deferred turns beyond which an append writes them at once, and journaled turns beyond which the
# journal is moved into the tables at once.
PENDING_TURNS_MAX = 256
JOURNALED_TURNS_MAX = 4096
SAVE_SESSION = ("INSERT INTO sessions(agent, session, turns, kept_turns, kept_bytes, updated) "
                "VALUES(?,?,?,?,?,?) ON CONFLICT(agent, session) DO UPDATE SET turns=excluded.turns, "
                "kept_turns=excluded.kept_turns, kept_bytes=excluded.kept_bytes, updated=excluded.updated")


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


@dataclass(slots=True)
class History:
    """Messages of a session's latest turns, oldest first, and their characters as the token
    estimate counts them (agents.messages.message_chars): counted once, when a turn is kept,
    instead of on every later turn that sends it."""
    messages: list[dict]
    chars: int

    @classmethod
    def of(cls, messages: list[dict]) -> History:
        return cls(messages, sum(map(message_chars, messages)))

    def last(self, count: int) -> History:
        return self if len(self.messages) <= count else History.of(self.messages[-count:])


NO_HISTORY = History([], 0)
CHARS = attrgetter("chars")
MESSAGES = attrgetter("messages")


@dataclass
class CachedSession:
    """A session's counters, the sizes of its kept turns and the newest of them, oldest first."""
    turns: int
    kept: int
    kept_bytes: int
    sizes: deque = field(default_factory=deque)
    recent: deque[History] = field(default_factory=lambda: deque(maxlen=CACHED_TURNS))

    def history(self, turns: int) -> History | None:
        """The last `turns` turns, or None when fewer of the kept turns are held."""
        held = len(self.recent)
        if turns > held and self.kept > held:
            return None
        picked = list(self.recent)[max(0, held - turns):]
        return History(list(chain.from_iterable(map(MESSAGES, picked))), sum(map(CHARS, picked)))

    def add(self, messages: list[dict], size: int, limits: StateLimits) -> None:
        """The next turn, then the oldest dropped while the bounds are exceeded (the newest stays)."""
        self.turns += 1
        self.kept += 1
        self.kept_bytes += size
        self.sizes.append(size)
        self.recent.append(History.of(messages))
        while self.kept > 1 and (self.kept > limits.session_max_turns
                                 or self.kept_bytes > limits.session_max_bytes):
            self.kept -= 1
            self.kept_bytes -= self.sizes.popleft()
        while len(self.recent) > self.kept:
            self.recent.popleft()

    @property
    def first_kept(self) -> int:
        return self.turns - self.kept + 1


@dataclass(frozen=True)
class Pruned:
    audit: int
    taskboard: int
    sessions: int


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
        self._sessions: OrderedDict[tuple[str, str], CachedSession] = OrderedDict()
        self._pending: list[PendingTurn] = []
        self._journaled: list[PendingTurn] = []
        create_private(path)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self.tx() as db:
            self._migrate_whole_histories(db)
            for statement in SCHEMA:
                db.execute(statement)
        restrict(path)
        self._journal = TurnLog.open(Path(f"{path}-turns"))
        self._apply_journal()
        self._next_retention = 0.0
        self.retention_due()

    def close(self) -> None:
        with self._lock:
            self.close_journal()
            self._db.close()

    def close_journal(self) -> None:
        """Moves the journal into the tables and lets it go: later turns go to the tables directly."""
        with self._lock:
            self._flush_locked()
            if self._journal is not None:
                self._journal.close()
                self._journal = None

    def _apply_journal(self) -> None:
        """What a journal left by an ended process holds, into the tables, then the journal emptied."""
        if self._journal is None:
            return
        replay = self._journal.read()
        if replay.turns:
            with self.tx() as db:
                self._write_turns(db, replay.turns)
        self._journal.clear()

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
            cached = CachedSession(max(turns, len(chunks)) - len(chunks), 0, 0)
            rows = []
            for messages in chunks:
                payload = orjson.dumps(messages)
                cached.add(messages, len(payload), self.limits)
                rows.append(self._pending_turn(agent, session, cached, payload, updated))
            self._write_turns(db, rows)
            if not rows:
                db.execute(SAVE_SESSION, (agent, session, cached.turns, 0, 0, updated))

    def session(self, agent: str, session: str) -> SessionState:
        """The session's counters and every turn it keeps (the GET session endpoint)."""
        with self._lock:
            self._flush_locked()
            row = self._db.execute("SELECT turns, kept_turns FROM sessions WHERE agent=? AND session=?",
                                   (agent, session)).fetchone()
            rows = self._db.execute("SELECT messages FROM session_turns WHERE agent=? AND session=? "
                                    "ORDER BY turn", (agent, session)).fetchall()
        if not row:
            return SessionState(agent, session, [], 0)
        return SessionState(agent, session, [m for (text,) in rows for m in orjson.loads(text)], row[0], row[1])

    def recent_history(self, agent: str, session: str, turns: int) -> History:
        """The session's last `turns` turns, oldest first: from memory when held, else reading
        those rows only."""
        if turns <= 0:
            return NO_HISTORY
        with self._lock:
            cached = self._cached(agent, session)
            held = cached.history(turns) if cached else None
            if held is not None:
                return held
            self._flush_locked()
            rows = self._db.execute("SELECT messages FROM session_turns WHERE agent=? AND session=? "
                                    "ORDER BY turn DESC LIMIT ?", (agent, session, turns)).fetchall()
        return History.of([m for (text,) in reversed(rows) for m in orjson.loads(text)])

    def _cached(self, agent: str, session: str) -> CachedSession | None:
        cached = self._sessions.get((agent, session))
        if cached is not None:
            self._sessions.move_to_end((agent, session))
        return cached

    def _load_session(self, agent: str, session: str) -> CachedSession:
        """The session's counters, kept turns' sizes and newest turns from the file, now held in
        memory (what is deferred is written first: it may be an evicted session's)."""
        self._flush_locked()
        db = self._db
        row = db.execute("SELECT turns, kept_turns, kept_bytes FROM sessions WHERE agent=? AND session=?",
                         (agent, session)).fetchone()
        cached = CachedSession(row[0] if row else 0, 0, 0)
        if row:
            cached.sizes.extend(size for (size,) in db.execute(
                "SELECT bytes FROM session_turns WHERE agent=? AND session=? ORDER BY turn", (agent, session)))
            cached.kept, cached.kept_bytes = len(cached.sizes), sum(cached.sizes)
            rows = db.execute("SELECT messages FROM session_turns WHERE agent=? AND session=? "
                              "ORDER BY turn DESC LIMIT ?", (agent, session, CACHED_TURNS)).fetchall()
            cached.recent.extend(History.of(orjson.loads(text)) for (text,) in reversed(rows))
        self._sessions[(agent, session)] = cached
        while len(self._sessions) > CACHED_SESSIONS:
            self._sessions.popitem(last=False)
        return cached

    def append_turn(self, agent: str, session: str, messages: list[dict], defer: bool = False) -> int:
        """Adds one turn's row and prunes the oldest beyond the bounds; earlier turns are not read.
        With `defer`, the row is written by the next flush; the turn is in the history at once."""
        payload = orjson.dumps(messages)
        with self._lock:
            try:
                cached = self._cached(agent, session) or self._load_session(agent, session)
                cached.add(messages, len(payload), self.limits)
                self._pending.append(self._pending_turn(agent, session, cached, payload, time.time()))
                if not defer or len(self._pending) >= PENDING_TURNS_MAX:
                    self._flush_locked()
            except BaseException:
                self._sessions.pop((agent, session), None)
                raise
        self.retention_due()
        return cached.turns

    @staticmethod
    def _pending_turn(agent: str, session: str, cached: CachedSession, payload: bytes, updated: float
                      ) -> PendingTurn:
        return PendingTurn(agent, session, cached.turns, payload, cached.sizes[-1], cached.first_kept,
                           cached.kept, cached.kept_bytes, updated)

    @property
    def pending_turns(self) -> int:
        return len(self._pending)

    @property
    def journaled_turns(self) -> int:
        return len(self._journaled)

    def journal_turns(self) -> int:
        """Writes the deferred turns to the journal in one write (to the tables when this store
        owns no journal); returns how many."""
        with self._lock:
            if self._journal is None:
                return self._flush_locked()
            count = self._journal_locked()
            if len(self._journaled) >= JOURNALED_TURNS_MAX:
                self._flush_locked()
            return count

    def flush_turns(self) -> int:
        """Moves the deferred and journaled turns into the tables in one transaction; returns how many."""
        with self._lock:
            return self._flush_locked()

    def _forget(self, turns: list[PendingTurn]) -> None:
        """The file lacks these turns: their sessions are read from it again next time."""
        for turn in turns:
            self._sessions.pop((turn.agent, turn.session), None)

    def _journal_locked(self) -> int:
        pending, self._pending = self._pending, []
        if not pending:
            return 0
        try:
            self._journal.append(pending)
        except BaseException:
            self._forget(pending)
            raise
        self._journaled += pending
        return len(pending)

    def _flush_locked(self) -> int:
        if self._journal is None:
            return self._write_pending_locked()
        self._journal_locked()
        turns = self._journaled
        if not turns:
            return 0
        # A failed write leaves the turns journaled, for the next flush or the next start.
        with self.tx() as db:
            self._write_turns(db, turns)
        self._journaled = []
        self._journal.clear()
        return len(turns)

    def _write_pending_locked(self) -> int:
        """Without a journal: the deferred turns into the tables; a failed write loses them, and
        their sessions are read from the file again."""
        pending, self._pending = self._pending, []
        if not pending:
            return 0
        try:
            with self.tx() as db:
                self._write_turns(db, pending)
        except BaseException:
            self._forget(pending)
            raise
        return len(pending)

    @staticmethod
    def _write_turns(db: sqlite3.Connection, turns: list[PendingTurn]) -> None:
        # OR REPLACE: a journal applied again after a crash before it was emptied changes nothing.
        db.executemany("INSERT OR REPLACE INTO session_turns(agent, session, turn, messages, bytes) "
                       "VALUES(?,?,?,?,?)", [(t.agent, t.session, t.number, t.payload.decode(), t.size)
                                             for t in turns])
        last = {(t.agent, t.session): t for t in turns}
        db.executemany("DELETE FROM session_turns WHERE agent=? AND session=? AND turn<?",
                       [(t.agent, t.session, t.first_kept) for t in last.values() if t.first_kept > 1])
        db.executemany(SAVE_SESSION, [(t.agent, t.session, t.number, t.kept, t.kept_bytes, t.updated)
                                      for t in last.values()])

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
        with self._lock:
            self._flush_locked()
        with self.tx() as db:
            self._sessions.clear()
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
