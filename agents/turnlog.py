"""The turn journal: where a session's turn is durable between the end of its event-loop pass and
its transaction in the state file's tables. Each pass appends one line per turn to
`<state file>-turns` (mode 600) in one write, in place of one SQLite commit per pass; the tables
take the journal's turns in one transaction a little later and the journal is emptied. A turn is in
the journal once the write returns, so it outlives a crash of the process (not of the machine: no
fsync, as with SQLite's WAL at synchronous=NORMAL). Applying a journal twice leaves the tables as
applying it once, so a crash between the two steps loses nothing. One process owns a journal
(flock); another that opens the same state file writes its turns to the tables directly."""
from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import orjson

log = logging.getLogger("dgxready.mux")
PRIVATE = 0o600


@dataclass(slots=True)
class PendingTurn:
    """A turn's row (`payload`: its messages as JSON) and its session's counters after it."""
    agent: str
    session: str
    number: int
    payload: bytes
    size: int
    first_kept: int
    kept: int
    kept_bytes: int
    updated: float

    def line(self) -> bytes:
        """One JSON array: the counters, then the messages as they are stored (not re-encoded)."""
        head = orjson.dumps((self.agent, self.session, self.number, self.size, self.first_kept, self.kept,
                             self.kept_bytes, self.updated))
        return head[:-1] + b"," + self.payload + b"]\n"


def parse_line(line: bytes) -> PendingTurn | None:
    """The turn of a journal line, or None when the line is not one."""
    try:
        agent, session, number, size, first_kept, kept, kept_bytes, updated, messages = orjson.loads(line)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None
    fields = (agent, session, number, size, first_kept, kept, kept_bytes)
    if not (all(isinstance(f, str) for f in fields[:2]) and all(type(f) is int for f in fields[2:])
            and isinstance(updated, float | int) and isinstance(messages, list)):
        return None
    return PendingTurn(agent, session, number, orjson.dumps(messages), size, first_kept, kept, kept_bytes,
                       float(updated))


@dataclass(frozen=True)
class Replay:
    turns: list[PendingTurn]
    skipped: int


class TurnLog:
    """An open journal this process owns."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd = fd

    @classmethod
    def open(cls, path: Path) -> TurnLog | None:
        """The journal at `path`, created owner-only; None while another process owns it."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, PRIVATE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        os.fchmod(fd, PRIVATE)
        return cls(path, fd)

    def append(self, turns: list[PendingTurn]) -> None:
        data = memoryview(b"".join([t.line() for t in turns]))
        while data:
            data = data[os.write(self.fd, data):]

    def read(self) -> Replay:
        """The turns in the journal, in order. A last line without its newline was cut by a crash
        during the write (its turn is lost, as a crash a moment earlier would have lost it): it is
        left out, as is any line that is not a turn; both are counted and logged."""
        with open(self.fd, "rb", closefd=False) as f:
            f.seek(0)
            lines = f.read().split(b"\n")
        turns, skipped = [], 1 if lines[-1] else 0
        for line in lines[:-1]:
            turn = parse_line(line)
            if turn is None:
                skipped += 1
            else:
                turns.append(turn)
        if skipped:
            log.warning("mux.turn_journal_lines_skipped", extra={"path": str(self.path), "lines": skipped})
        return Replay(turns, skipped)

    def clear(self) -> None:
        os.ftruncate(self.fd, 0)

    def close(self) -> None:
        os.close(self.fd)
