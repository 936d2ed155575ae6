"""The multiplexer's state store: per-turn session rows, their bounds, retention, the first
schema's migration and the database's file mode (no server needed)."""
import errno
import json
import os
import sqlite3
import tempfile
import time
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agents.config import AgentIdentity, BackendConfig, MuxConfig
from agents.messages import estimate_tokens, message_chars
from agents.mux import create_mux
from agents.proxy import Turn
from agents.server import prepare
from agents.state import CACHED_TURNS, DAY_S, StateLimits, StateStore
from agents.turnlog import TurnLog
from dgxready.roles import load_roles

TURN = [{"role": "user", "content": "u" * 100}, {"role": "assistant", "content": "a" * 100}]
UNBOUNDED = StateLimits(session_max_turns=100_000, session_max_bytes=1 << 30)


def vm_steps(store: StateStore, action) -> int:
    """SQLite virtual-machine instructions `action` executes: work done, independent of timing."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    store._db.set_progress_handler(count, 1)
    try:
        action()
    finally:
        store._db.set_progress_handler(None, 1)
    return steps


def columns_read(store: StateStore, action) -> set[tuple[str, str]]:
    read: set[tuple[str, str]] = set()

    def note(code, table, column, *_):
        if code == sqlite3.SQLITE_READ:
            read.add((table, column))
        return sqlite3.SQLITE_OK

    store._db.set_authorizer(note)
    try:
        action()
    finally:
        store._db.set_authorizer(None)
    return read


def turn(n: int) -> list[dict]:
    return [{"role": "user", "content": f"turn {n}"}, {"role": "assistant", "content": f"answer {n}"}]


def test_a_turn_costs_the_same_at_the_thousandth_turn_as_at_the_second(tmp_path):
    store = StateStore(tmp_path / "s.db", UNBOUNDED)
    store.append_turn("dev", "short", TURN)
    store.append_turn("dev", "long", TURN)
    for _ in range(998):
        store.append_turn("dev", "long", TURN)
    short = vm_steps(store, lambda: store.append_turn("dev", "short", TURN))
    long = vm_steps(store, lambda: store.append_turn("dev", "long", TURN))
    assert long == short
    assert store.session("dev", "long").turns == 1000


class JsonTally:
    """Stands in for the store's orjson module and counts the bytes it parses and writes."""

    def __init__(self):
        self.parsed = self.written = 0

    def loads(self, text):
        self.parsed += len(text)
        return orjson.loads(text)

    def dumps(self, value):
        text = orjson.dumps(value)
        self.written += len(text)
        return text


def test_a_turn_serialises_only_its_own_messages_however_long_the_session(tmp_path, monkeypatch):
    store = StateStore(tmp_path / "s.db", UNBOUNDED)
    for _ in range(500):
        store.append_turn("dev", "long", TURN)
    tally = JsonTally()
    monkeypatch.setattr("agents.state.orjson", tally)
    store.append_turn("dev", "long", TURN)
    assert (tally.parsed, tally.written) == (0, len(orjson.dumps(TURN)))


def test_appending_a_turn_never_reads_the_stored_turns_messages(tmp_path):
    store = StateStore(tmp_path / "s.db", StateLimits(session_max_turns=5))
    for n in range(5):
        store.append_turn("dev", "s", turn(n))
    pruning = columns_read(store, lambda: store.append_turn("dev", "s", turn(5)))
    assert ("session_turns", "messages") not in pruning
    assert store.session("dev", "s").kept_turns == 5


def test_the_prompts_history_reads_only_the_last_turns_asked_for(tmp_path):
    store = StateStore(tmp_path / "s.db", UNBOUNDED)
    for n in range(500):
        store.append_turn("dev", "long", turn(n))
        if n < 8:
            store.append_turn("dev", "short", turn(n))
    assert store.recent_history("dev", "long", 2).messages == turn(498) + turn(499)
    assert store.recent_history("dev", "long", 0).messages == []
    short = vm_steps(store, lambda: store.recent_history("dev", "short", 8))
    long = vm_steps(store, lambda: store.recent_history("dev", "long", 8))
    assert long == short, "reading 8 turns of 500 costs what reading a session of 8 does"


def test_a_session_keeps_its_newest_turns_within_the_turn_bound(tmp_path):
    store = StateStore(tmp_path / "s.db", StateLimits(session_max_turns=3))
    for n in range(7):
        assert store.append_turn("dev", "s", turn(n)) == n + 1
    view = store.session("dev", "s")
    assert view.turns == 7 and view.kept_turns == 3
    assert view.history == turn(4) + turn(5) + turn(6)


def test_a_session_keeps_its_newest_turns_within_the_byte_bound_and_always_the_last(tmp_path):
    one_turn = len(json.dumps(TURN).encode())
    store = StateStore(tmp_path / "s.db", StateLimits(session_max_bytes=one_turn * 2 + 10))
    for _ in range(5):
        store.append_turn("dev", "s", TURN)
    assert store.session("dev", "s").kept_turns == 2
    huge = [{"role": "user", "content": "h" * one_turn * 4}, {"role": "assistant", "content": "ok"}]
    store.append_turn("dev", "s", huge)
    view = store.session("dev", "s")
    assert view.kept_turns == 1 and view.history == huge and view.turns == 6


def test_sessions_are_kept_per_agent_and_session(tmp_path):
    store = StateStore(tmp_path / "s.db")
    store.append_turn("dev", "s", turn(1))
    store.append_turn("qa", "s", turn(2))
    store.append_turn("dev", "t", turn(3))
    assert store.session("dev", "s").history == turn(1)
    assert store.session("qa", "s").history == turn(2)
    assert store.session("dev", "nothing").turns == 0


FIRST_SCHEMA = """
CREATE TABLE sessions (
  agent TEXT NOT NULL, session TEXT NOT NULL, history TEXT NOT NULL DEFAULT '[]',
  turns INTEGER NOT NULL DEFAULT 0, updated REAL NOT NULL, PRIMARY KEY (agent, session));
CREATE TABLE audit (
  id INTEGER PRIMARY KEY, ts REAL NOT NULL, agent TEXT NOT NULL, session TEXT, tool TEXT NOT NULL,
  outcome TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE taskboard (id INTEGER PRIMARY KEY, ts REAL NOT NULL, agent TEXT NOT NULL, item TEXT NOT NULL);
"""


def test_a_database_from_the_first_schema_opens_with_its_sessions_as_turns(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(FIRST_SCHEMA)
        db.execute("INSERT INTO sessions VALUES(?,?,?,?,?)",
                   ("dev", "s", json.dumps(turn(0) + turn(1) + turn(2)), 3, time.time()))
        db.execute("INSERT INTO sessions VALUES(?,?,?,?,?)", ("dev", "empty", "[]", 5, time.time()))
        db.execute("INSERT INTO taskboard(ts, agent, item) VALUES(?,?,?)", (time.time(), "dev", "kept"))
    store = StateStore(path, StateLimits(session_max_turns=2))
    view = store.session("dev", "s")
    assert view.turns == 3 and view.history == turn(1) + turn(2)
    assert store.session("dev", "empty").turns == 5, "a session with no history keeps its count"
    assert store.append_turn("dev", "s", turn(3)) == 4
    assert store.recent_history("dev", "s", 1).messages == turn(3)
    store.close()
    with sqlite3.connect(path) as db:
        assert "history" not in {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
        assert db.execute("SELECT item FROM taskboard").fetchall() == [("kept",)]
    assert StateStore(path).session("dev", "s").turns == 4


def test_old_audit_rows_taskboard_items_and_idle_sessions_are_pruned_at_open(tmp_path):
    path = tmp_path / "s.db"
    store = StateStore(path)
    store.append_turn("dev", "idle", turn(0))
    store.append_turn("dev", "active", turn(0))
    long_ago = time.time() - 31 * DAY_S
    with store.tx() as db:
        db.execute("INSERT INTO audit(ts, agent, session, tool, outcome, detail) VALUES(?,?,?,?,?,?)",
                   (long_ago, "dev", None, "shell.run", "ok", "old"))
        db.execute("INSERT INTO taskboard(ts, agent, item) VALUES(?,?,?)", (long_ago, "dev", "old"))
        db.execute("UPDATE sessions SET updated=? WHERE session='idle'", (long_ago,))
    store.audit("dev", None, "shell.run", "ok", "new")
    store.close()
    reopened = StateStore(path, StateLimits(retention_days=30))
    assert [r[4] for r in reopened.audit_rows()] == ["new"]
    with reopened.tx() as db:
        assert db.execute("SELECT count(*) FROM taskboard").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM session_turns WHERE session='idle'").fetchone() == (0,)
    assert reopened.session("dev", "idle").turns == 0
    assert reopened.session("dev", "active").turns == 1


def test_a_turn_rewrites_no_index_on_its_sessions_time_and_an_old_files_index_is_dropped(tmp_path):
    path = tmp_path / "s.db"
    StateStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("CREATE INDEX sessions_updated ON sessions(updated)")
    store = StateStore(path)
    store.append_turn("dev", "s", turn(0))
    with store.tx() as db:
        indexed = [row[0] for row in db.execute("SELECT sql FROM sqlite_master WHERE type='index' "
                                                "AND tbl_name='sessions' AND sql IS NOT NULL")]
    assert indexed == []
    assert store.session("dev", "s").turns == 1


def test_retention_runs_on_writes_once_per_check_interval(tmp_path):
    store = StateStore(tmp_path / "s.db", StateLimits(retention_days=1, retention_check_s=3600))
    with store.tx() as db:
        db.execute("INSERT INTO taskboard(ts, agent, item) VALUES(?,?,?)",
                   (time.time() - 2 * DAY_S, "dev", "old"))
    assert store.retention_due() is None, "checked at open, so not due again for an hour"
    store._next_retention = 0.0
    pruned = store.retention_due()
    assert pruned is not None and pruned.taskboard == 1


def test_the_database_and_its_wal_files_are_private_under_a_permissive_umask(tmp_path):
    path = tmp_path / "state" / "mux.db"
    old = os.umask(0)
    try:
        store = StateStore(path)
        store.append_turn("dev", "s", TURN)
        files = [path, tmp_path / "state" / "mux.db-wal", tmp_path / "state" / "mux.db-shm"]
        assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o600 for p in files}
        store.close()
    finally:
        os.umask(old)


def test_an_existing_world_readable_database_is_made_private(tmp_path):
    path = tmp_path / "mux.db"
    StateStore(path).close()
    path.chmod(0o644)
    StateStore(path).close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_session_bound_below_the_history_sent_is_refused():
    backends = [BackendConfig(name="b", url="http://127.0.0.1:1")]
    with pytest.raises(ValidationError, match="session_max_turns \\(4\\) is below history_turns \\(8\\)"):
        MuxConfig(backends=backends, history_turns=8, session_max_turns=4)


def test_the_history_held_in_memory_is_what_the_file_holds(tmp_path):
    store = StateStore(tmp_path / "s.db", StateLimits(session_max_turns=CACHED_TURNS + 8))
    for n in range(CACHED_TURNS + 20):
        store.append_turn("dev", "s", turn(n))
    reopened = StateStore(tmp_path / "s.db", StateLimits(session_max_turns=CACHED_TURNS + 8))
    for turns in (1, 8, CACHED_TURNS, CACHED_TURNS + 8):
        assert store.recent_history("dev", "s", turns) == reopened.recent_history("dev", "s", turns)
    assert store.recent_history("dev", "s", CACHED_TURNS + 8).messages == store.session("dev", "s").history
    assert reopened.append_turn("dev", "s", turn(99)) == CACHED_TURNS + 21
    assert reopened.recent_history("dev", "s", 2).messages == turn(CACHED_TURNS + 19) + turn(99)


def file_turns(path, agent: str, session: str) -> list[int]:
    """The turn numbers the file holds for a session, read over a connection of its own."""
    with sqlite3.connect(path) as db:
        return [n for (n,) in db.execute("SELECT turn FROM session_turns WHERE agent=? AND session=? "
                                         "ORDER BY turn", (agent, session))]


def test_deferred_turns_are_in_the_history_at_once_and_in_the_file_after_one_flush(tmp_path):
    store = StateStore(tmp_path / "s.db")
    assert store.append_turn("dev", "s", turn(1)) == 1
    assert [store.append_turn("dev", "s", turn(n), defer=True) for n in (2, 3)] == [2, 3]
    assert store.recent_history("dev", "s", 2).messages == turn(2) + turn(3)
    assert file_turns(tmp_path / "s.db", "dev", "s") == [1] and store.pending_turns == 2
    assert store.flush_turns() == 2 and store.pending_turns == 0
    assert file_turns(tmp_path / "s.db", "dev", "s") == [1, 2, 3]


def test_every_read_of_the_file_and_closing_it_write_the_deferred_turns_first(tmp_path):
    store = StateStore(tmp_path / "s.db")
    store.append_turn("dev", "s", turn(1), defer=True)
    assert store.session("dev", "s").history == turn(1)
    store.append_turn("dev", "s", turn(2), defer=True)
    store.close()
    assert file_turns(tmp_path / "s.db", "dev", "s") == [1, 2]


@pytest.mark.parametrize("limits", [StateLimits(session_max_turns=3),
                                    StateLimits(session_max_bytes=len(orjson.dumps(turn(10))) * 3 + 5)])
def test_a_group_commit_leaves_the_file_as_committing_each_turn_does_pruning_included(tmp_path, limits):
    alone = StateStore(tmp_path / "alone.db", limits)
    grouped = StateStore(tmp_path / "grouped.db", limits)
    for n in range(12):
        messages = turn(n) if n % 4 else [{"role": "user", "content": "x" * 40 * n}]
        alone.append_turn("dev", f"s{n % 2}", messages)
        grouped.append_turn("dev", f"s{n % 2}", messages, defer=True)
        if n % 5 == 4:
            grouped.flush_turns()
    grouped.flush_turns()
    for session in ("s0", "s1"):
        assert grouped.session("dev", session) == alone.session("dev", session)
        grouped_rows = file_turns(tmp_path / "grouped.db", "dev", session)
        assert grouped_rows == file_turns(tmp_path / "alone.db", "dev", session)
    reopened = StateStore(tmp_path / "grouped.db", limits)
    assert reopened.append_turn("dev", "s0", turn(99)) == alone.append_turn("dev", "s0", turn(99))
    assert reopened.session("dev", "s0") == alone.session("dev", "s0")


def test_a_session_evicted_with_deferred_turns_is_read_back_whole(tmp_path, monkeypatch):
    monkeypatch.setattr("agents.state.CACHED_SESSIONS", 2)
    store = StateStore(tmp_path / "s.db")
    store.append_turn("dev", "a", turn(1), defer=True)
    store.append_turn("dev", "b", turn(2), defer=True)
    store.append_turn("dev", "c", turn(3), defer=True)  # "a" leaves the memory before its row is written
    assert store.append_turn("dev", "a", turn(4), defer=True) == 2
    assert store.recent_history("dev", "a", 8).messages == turn(1) + turn(4)


def test_a_failed_move_into_the_tables_keeps_the_journaled_turns_for_the_next_one(tmp_path, monkeypatch):
    store = StateStore(tmp_path / "s.db")
    store.append_turn("dev", "s", turn(1))
    store.append_turn("dev", "s", turn(2), defer=True)
    store.journal_turns()
    write = StateStore._write_turns

    def disk_full(db, turns):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(StateStore, "_write_turns", staticmethod(disk_full))
    with pytest.raises(sqlite3.OperationalError):
        store.flush_turns()
    monkeypatch.setattr(StateStore, "_write_turns", staticmethod(write))
    assert store.journaled_turns == 1
    assert store.recent_history("dev", "s", 8).messages == turn(1) + turn(2), "the journal still holds turn 2"
    assert store.append_turn("dev", "s", turn(3)) == 3
    assert file_turns(tmp_path / "s.db", "dev", "s") == [1, 2, 3]


def test_a_failed_journal_write_loses_only_its_turns_and_the_memory_follows_the_file(tmp_path, monkeypatch):
    store = StateStore(tmp_path / "s.db")
    store.append_turn("dev", "s", turn(1))
    store.append_turn("dev", "s", turn(2), defer=True)

    def disk_full(log, turns):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TurnLog, "append", disk_full)
    with pytest.raises(OSError):
        store.journal_turns()
    monkeypatch.undo()
    assert store.pending_turns == 0 and store.journaled_turns == 0
    assert store.recent_history("dev", "s", 8).messages == turn(1), "the history is the file's again"
    assert store.append_turn("dev", "s", turn(3)) == 2
    assert file_turns(tmp_path / "s.db", "dev", "s") == [1, 2]


TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)})
HISTORY_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "tool"]),
     "content": st.one_of(st.none(), st.text(max_size=30), st.lists(TEXT_PART, max_size=2))},
    optional={"tool_calls": st.lists(st.fixed_dictionaries(
        {"function": st.fixed_dictionaries({"name": st.text(max_size=5), "arguments": st.text(max_size=10)})}),
        max_size=2)})


@settings(max_examples=25, deadline=None)
@given(turns=st.lists(st.lists(HISTORY_MESSAGE, min_size=1, max_size=4), min_size=1, max_size=6),
       keep=st.integers(min_value=1, max_value=8))
def test_a_historys_character_count_is_its_messages_whether_read_from_memory_or_from_the_file(turns, keep):
    with tempfile.TemporaryDirectory() as tmp:
        store = StateStore(Path(tmp) / "s.db")
        for messages in turns:
            store.append_turn("dev", "s", messages)
        held = store.recent_history("dev", "s", keep)
        reopened = StateStore(Path(tmp) / "s.db")
        read = reopened.recent_history("dev", "s", keep)
        assert held == read
        assert held.chars == sum(message_chars(m) for m in held.messages)
        last = held.last(2)
        assert last.messages == held.messages[-2:]
        assert last.chars == sum(message_chars(m) for m in last.messages)
        store.close()
        reopened.close()


def test_a_session_turns_cost_counts_its_history_as_an_estimate_over_the_whole_prompt_would(tmp_path):
    roles = load_roles()
    config = MuxConfig(port=0, backends=[BackendConfig(name="local", url="http://127.0.0.1:1")],
                       state_db=tmp_path / "mux.db", history_turns=2)
    ident = AgentIdentity(name="developer-1", role="developer", key="k" * 20)
    mux = create_mux(config, roles, {"d": ident}, StateStore(tmp_path / "mux.db"))
    calls = [{"function": {"name": "run_tests", "arguments": '{"path": "tests/"}'}}]
    result = {"role": "tool", "content": [{"type": "text", "text": "2 failed"}]}
    mux.store.append_turn("developer-1", "s", turn(1))
    asked = {"role": "assistant", "content": None, "tool_calls": calls}
    mux.store.append_turn("developer-1", "s", [{"role": "user", "content": "fix it"}, asked, result])
    mux.store.append_turn("developer-1", "s", turn(3))
    for data in ({"stream": True}, {}):
        ask = Turn(ident, roles["developer"], "s", [{"role": "user", "content": "next"}], data,
                   time.monotonic() + 60, 0.0, {}, None, 64)
        prepare(mux, ask)
        sent = ask.prompt[1:-1]
        assert sent == [asked, result, *turn(3)], "two turns' worth: 4 of the last two turns' 5 messages"
        output = 0 if data else 64
        assert ask.cost == pytest.approx(estimate_tokens(ask.prompt, output))
