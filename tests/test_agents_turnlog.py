"""The turn journal in front of the state file's session tables: what a killed process leaves in
it is applied at the next open, a torn line is left out, applying twice is harmless, one process
owns it, and it is private (no server needed; the crash is a real SIGKILL of a child process)."""
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import orjson
from hypothesis import given
from hypothesis import strategies as st

from agents.state import StateLimits, StateStore
from agents.turnlog import PendingTurn, TurnLog, parse_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def turn(n: int) -> list[dict]:
    return [{"role": "user", "content": f"turn {n}"}, {"role": "assistant", "content": f"answer {n}"}]


def table_turns(path, session: str) -> list[int]:
    with sqlite3.connect(path) as db:
        return [n for (n,) in db.execute("SELECT turn FROM session_turns WHERE session=? ORDER BY turn",
                                         (session,))]


def journal_of(path) -> str:
    return f"{path}-turns"


def test_journaled_turns_outlive_a_process_killed_before_they_reach_the_tables(tmp_path):
    path = tmp_path / "s.db"
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from agents.state import StateStore
        store = StateStore(Path({str(path)!r}))
        store.append_turn("dev", "s", [{{"role": "user", "content": "kept"}}])
        for n in (2, 3):
            store.append_turn("dev", "s", [{{"role": "user", "content": f"turn {{n}}"}}], defer=True)
        store.journal_turns()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=os.environ | {"PYTHONPATH": ROOT})
    assert done.returncode == -signal.SIGKILL
    assert table_turns(path, "s") == [1], "the killed process moved nothing after its first turn"
    assert os.path.getsize(journal_of(path)) > 0
    store = StateStore(path)
    assert [m["content"] for m in store.session("dev", "s").history] == ["kept", "turn 2", "turn 3"]
    assert store.append_turn("dev", "s", turn(4)) == 4
    assert os.path.getsize(journal_of(path)) == 0


def test_a_line_cut_by_a_crash_and_a_line_that_is_not_a_turn_are_left_out(tmp_path):
    path = tmp_path / "s.db"
    StateStore(path).close()
    lines = [PendingTurn("dev", "s", n, orjson.dumps(turn(n)), 40, 1, n, 40 * n, time.time()).line()
             for n in (1, 2, 3)]
    with open(journal_of(path), "wb") as f:
        f.write(lines[0] + b'["dev", "s", "not a number"]\n' + b"{not json\n" + lines[1] + lines[2][:-9])
    log = TurnLog.open(tmp_path / "s.db-turns")
    replay = log.read()
    log.close()
    assert [t.number for t in replay.turns] == [1, 2] and replay.skipped == 3
    store = StateStore(path)
    assert store.session("dev", "s").history == turn(1) + turn(2)
    assert table_turns(path, "s") == [1, 2]


def test_applying_a_journal_again_after_a_crash_before_it_was_emptied_changes_nothing(tmp_path):
    path = tmp_path / "s.db"
    limits = StateLimits(session_max_turns=3)
    store = StateStore(path, limits)
    for n in range(1, 7):
        store.append_turn("dev", "s", turn(n), defer=True)
    store.journal_turns()
    with open(journal_of(path), "rb") as f:
        journal = f.read()
    before = store.session("dev", "s")
    store.close()
    with open(journal_of(path), "wb") as f:
        f.write(journal)
    again = StateStore(path, limits)
    assert again.session("dev", "s") == before
    assert table_turns(path, "s") == [4, 5, 6]
    assert again.append_turn("dev", "s", turn(7)) == 7


def test_a_second_store_on_the_same_file_leaves_the_owners_journal_alone(tmp_path):
    path = tmp_path / "s.db"
    owner = StateStore(path)
    owner.append_turn("dev", "a", turn(1), defer=True)
    owner.journal_turns()
    size = os.path.getsize(journal_of(path))
    other = StateStore(path)
    assert os.path.getsize(journal_of(path)) == size
    other.append_turn("dev", "b", turn(2), defer=True)
    other.journal_turns()
    assert table_turns(path, "b") == [1], "a store without the journal writes to the tables"
    assert os.path.getsize(journal_of(path)) == size
    owner.close()
    assert table_turns(path, "a") == [1]
    assert os.path.getsize(journal_of(path)) == 0
    other.close()


def test_the_journal_is_private_under_a_permissive_umask_and_an_open_one_is_made_so(tmp_path):
    old = os.umask(0)
    try:
        store = StateStore(tmp_path / "s.db")
        store.append_turn("dev", "s", turn(1), defer=True)
        store.journal_turns()
        assert os.stat(journal_of(tmp_path / "s.db")).st_mode & 0o777 == 0o600
        store.close()
        os.chmod(journal_of(tmp_path / "s.db"), 0o644)
        StateStore(tmp_path / "s.db").close()
        assert os.stat(journal_of(tmp_path / "s.db")).st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


NAMES = st.text(min_size=1, max_size=40)
CONTENT = st.text(max_size=200)


@given(agent=NAMES, session=NAMES, contents=st.lists(CONTENT, min_size=1, max_size=4),
       counters=st.tuples(*[st.integers(min_value=0, max_value=2**53)] * 5), updated=st.floats(0, 2e9))
def test_any_turn_is_one_line_of_the_journal_and_reads_back_the_same(agent, session, contents, counters,
                                                                     updated):
    number, size, first_kept, kept, kept_bytes = counters
    payload = orjson.dumps([{"role": "user", "content": c} for c in contents])
    pending = PendingTurn(agent, session, number, payload, size, first_kept, kept, kept_bytes, updated)
    line = pending.line()
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert parse_line(line[:-1]) == pending
