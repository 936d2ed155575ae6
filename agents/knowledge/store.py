"""The knowledge store's interface, and its embedded implementation: one SQLite file in WAL mode
that several processes share. Every write takes the database's write lock (BEGIN IMMEDIATE),
appends one row to the change log, and that row's number is the new knowledge version, so
versions increase strictly across processes and nothing a writer commits is lost.

A PostgreSQL + pgvector implementation would keep the same tables (the embedding column as
`vector(dim)` with an HNSW index, `tsvector` + `ts_rank` or ParadeDB BM25 for text_search, the
change log's version from a sequence taken in the writing transaction) and answer vector_search
in the database instead of an in-process index."""
from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from agents.knowledge.types import (
    Author,
    Change,
    ChunkRecord,
    KnowledgeError,
    NewDocument,
    StoredDocument,
    VectorBatch,
)
from agents.knowledge.vectors import VectorIndex, VectorSettings, normalised
from dgxready.sqlitefiles import create_private, restrict

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS changes (
      version INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL, subject TEXT NOT NULL,
      author TEXT NOT NULL, role TEXT NOT NULL, scope TEXT NOT NULL, summary TEXT NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS documents (
      id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, kind TEXT NOT NULL, scope TEXT NOT NULL,
      author TEXT NOT NULL, role TEXT NOT NULL, ts REAL NOT NULL, sha256 TEXT NOT NULL,
      version INTEGER NOT NULL, removed_in INTEGER, chunks INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS chunks (
      id INTEGER PRIMARY KEY AUTOINCREMENT, document INTEGER NOT NULL REFERENCES documents(id),
      ordinal INTEGER NOT NULL, heading TEXT NOT NULL, text TEXT NOT NULL, scope TEXT NOT NULL,
      version INTEGER NOT NULL, removed_in INTEGER, embedding BLOB)""",
    """CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
      heading, text, content='chunks', content_rowid='id', tokenize='porter unicode61')""",
    """CREATE TABLE IF NOT EXISTS ontology (
      version INTEGER PRIMARY KEY, name TEXT NOT NULL, turtle TEXT NOT NULL, triples INTEGER NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS seen (agent TEXT PRIMARY KEY, version INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS documents_live ON documents(source, scope) WHERE removed_in IS NULL",
    "CREATE INDEX IF NOT EXISTS chunks_version_id ON chunks(version, id)",
    "CREATE INDEX IF NOT EXISTS chunks_removed ON chunks(removed_in) WHERE removed_in IS NOT NULL",
)
WORD_RE = re.compile(r"\w+", re.UNICODE)
STOPWORDS = frozenset(
    "a an and are as at be by do does for from how i if in is it its my of on or so that the this to "
    "what when where which who why with you your we our can should would".split())
VECTOR_PAGE = 20_000
TEXT_OVERFETCH = 4  # candidates per wanted hit before the scope filter
CHUNK_COLUMNS = ("c.id, c.document, c.ordinal, d.source, c.heading, c.text, c.scope, d.author, d.role, "
                 "d.ts, c.version")


def fts_query(text: str) -> str | None:
    """A free-text question as an FTS5 query: its words, quoted, OR-ed; None when none is left."""
    words = [w for w in dict.fromkeys(WORD_RE.findall(text.lower())) if w not in STOPWORDS]
    return " OR ".join(f'"{w}"' for w in words[:32]) or None


class KnowledgeStore(Protocol):
    """What the knowledge service needs of a store; SqliteKnowledgeStore is the embedded one."""

    def version(self, fresh_within_s: float = 0.0) -> int: ...

    def add_document(self, doc: NewDocument, embeddings: np.ndarray | None) -> StoredDocument: ...

    def text_search(self, query: str, scopes: Sequence[str], limit: int) -> list[int]: ...

    def vector_search(self, query: np.ndarray, limit: int, version: int | None = None) -> list[int]: ...

    def chunks(self, ids: Sequence[int]) -> dict[int, ChunkRecord]: ...

    def changes_since(self, version: int, limit: int) -> list[Change]: ...

    def add_ontology(self, name: str, turtle: str, triples: int, author: Author, summary: str) -> int: ...

    def ontology_since(self, version: int) -> list[tuple[int, str]]: ...

    def seen(self, agent: str) -> int | None: ...

    def mark_seen(self, agent: str, version: int) -> None: ...


class SqliteKnowledgeStore:
    def __init__(self, path: Path, vectors: VectorSettings | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.vector_settings = vectors or VectorSettings(index_dir=Path(f"{path}.ann"))
        self.lock = threading.RLock()
        create_private(path)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        with self.write() as db:
            for statement in SCHEMA:
                db.execute(statement)
        restrict(path)
        self.index: VectorIndex | None = None
        self._version_mark: tuple[int, int] | None = None
        self._version = 0
        self._external_checked = 0.0

    def close(self) -> None:
        with self.lock:
            if self.index is not None:
                self.index.save()
            self.db.close()

    def write(self) -> _Write:
        return _Write(self)

    def version(self, fresh_within_s: float = 0.0) -> int:
        """Read again only after a commit: another connection's moves `data_version`, this
        connection's moves `total_changes`. Every chat turn asks, so the cheap check matters: with
        `fresh_within_s`, another process's commit is looked for at most that often."""
        with self.lock:
            changes = self.db.total_changes
            mark = self._version_mark
            now = time.monotonic()
            if mark is not None and mark[1] == changes and now < self._external_checked + fresh_within_s:
                return self._version
            self._external_checked = now
            mark = (self.db.execute("PRAGMA data_version").fetchone()[0], changes)
            if mark != self._version_mark:
                self._version = self.db.execute("SELECT coalesce(max(version), 0) FROM changes").fetchone()[0]
                self._version_mark = mark
            return self._version

    def dim(self) -> int | None:
        with self.lock:
            row = self.db.execute("SELECT value FROM meta WHERE key='dim'").fetchone()
        return int(row[0]) if row else None

    @staticmethod
    def _next_version(db: sqlite3.Connection, kind: str, subject: str, author: Author, scope: str,
                      summary: str) -> int:
        version = db.execute("SELECT coalesce(max(version), 0) + 1 FROM changes").fetchone()[0]
        db.execute("INSERT INTO changes(version, ts, kind, subject, author, role, scope, summary) "
                   "VALUES(?,?,?,?,?,?,?,?)",
                   (version, time.time(), kind, subject, author.agent, author.role, scope, summary[:300]))
        return version

    def _check_dim(self, db: sqlite3.Connection, embeddings: np.ndarray, source: str) -> None:
        row = db.execute("SELECT value FROM meta WHERE key='dim'").fetchone()
        dim = embeddings.shape[1]
        if row is None:
            db.execute("INSERT INTO meta(key, value) VALUES('dim', ?)", (str(dim),))
        elif int(row[0]) != dim:
            raise KnowledgeError(f"{source}: embeddings of dimension {dim}, but this store holds "
                                 f"dimension {row[0]} ({self.path}); use the same embedding model")

    def add_document(self, doc: NewDocument, embeddings: np.ndarray | None) -> StoredDocument:
        """Stores the document (replacing a live one of the same source and scope) as one version;
        an unchanged document (same sha256) is left as it is, at no new version."""
        if embeddings is not None and len(embeddings) != len(doc.chunks):
            raise KnowledgeError(f"{doc.source}: {len(embeddings)} embeddings for {len(doc.chunks)} chunks")
        with self.write() as db:
            old = db.execute("SELECT id, sha256, version, chunks FROM documents WHERE source=? AND scope=? "
                             "AND removed_in IS NULL", (doc.source, doc.scope)).fetchone()
            if old and old[1] == doc.sha256:
                return StoredDocument(old[0], old[2], old[3])
            if embeddings is not None:
                self._check_dim(db, embeddings, doc.source)
            verb = "replaced" if old else "added"
            version = self._next_version(db, "document", doc.source, doc.author, doc.scope,
                                         f"{verb} {doc.source} ({len(doc.chunks)} chunks)")
            if old:
                self._remove_document(db, old[0], version)
            document = self._insert_document(db, doc, version, embeddings)
        return StoredDocument(document, version, len(doc.chunks), old[0] if old else None)

    @staticmethod
    def _insert_document(db: sqlite3.Connection, doc: NewDocument, version: int,
                         embeddings: np.ndarray | None) -> int:
        document = db.execute(
            "INSERT INTO documents(source, kind, scope, author, role, ts, sha256, version, chunks) "
            "VALUES(?,?,?,?,?,?,?,?,?)", (doc.source, doc.kind, doc.scope, doc.author.agent, doc.author.role,
                                          time.time(), doc.sha256, version, len(doc.chunks))).lastrowid
        rows = normalised(embeddings) if embeddings is not None else None
        for ordinal, piece in enumerate(doc.chunks):
            blob = rows[ordinal].tobytes() if rows is not None else None
            chunk = db.execute(
                "INSERT INTO chunks(document, ordinal, heading, text, scope, version, embedding) "
                "VALUES(?,?,?,?,?,?,?)", (document, ordinal, piece.heading, piece.text, doc.scope, version,
                                          blob)).lastrowid
            db.execute("INSERT INTO chunks_fts(rowid, heading, text) VALUES(?,?,?)",
                       (chunk, piece.heading, piece.text))
        return document

    @staticmethod
    def _remove_document(db: sqlite3.Connection, document: int, version: int) -> None:
        for chunk, heading, text in db.execute("SELECT id, heading, text FROM chunks WHERE document=?",
                                               (document,)).fetchall():
            db.execute("INSERT INTO chunks_fts(chunks_fts, rowid, heading, text) VALUES('delete',?,?,?)",
                       (chunk, heading, text))
        db.execute("UPDATE chunks SET removed_in=? WHERE document=?", (version, document))
        db.execute("UPDATE documents SET removed_in=? WHERE id=?", (version, document))

    def text_search(self, query: str, scopes: Sequence[str], limit: int) -> list[int]:
        """Chunk ids by BM25 (headings weigh twice the text), best first."""
        match = fts_query(query)
        if match is None:
            return []
        marks = ",".join("?" * len(scopes))
        with self.lock:
            rows = self.db.execute(
                f"SELECT c.id FROM (SELECT rowid, bm25(chunks_fts, 2.0, 1.0) AS score FROM chunks_fts "
                f"WHERE chunks_fts MATCH ? ORDER BY score LIMIT ?) AS f JOIN chunks c ON c.id = f.rowid "
                f"WHERE c.scope IN ({marks}) ORDER BY f.score LIMIT ?",
                (match, limit * TEXT_OVERFETCH, *scopes, limit)).fetchall()
        return [r[0] for r in rows]

    def vector_search(self, query: np.ndarray, limit: int, version: int | None = None) -> list[int]:
        """Chunk ids by cosine similarity, best first, from this process's index brought up to date
        (to `version` when the caller has just read it)."""
        index = self.synced_index(version)
        if index is None:
            return []
        if query.shape[-1] != index.dim:
            raise KnowledgeError(f"a query embedding of dimension {query.shape[-1]}, but {self.path} holds "
                                 f"dimension {index.dim}: search with the embedding model that ingested it")
        with index.lock:
            return [chunk for chunk, _ in index.search(query, limit)]

    def synced_index(self, version: int | None = None) -> VectorIndex | None:
        """The index, up to date at `version` (read here when not given): a search that passes the
        version it has just read uses no database connection while the index is current, so it
        does not wait behind another thread's query."""
        if self.index is None:
            dim = self.dim()
            if dim is None:
                return None
            self.index = VectorIndex(dim, self.vector_settings)
        with self.index.lock:
            now = self.version() if version is None else version
            if self.index.version >= now:
                return self.index
            for batch in self.vector_batches(self.index.version, now):
                self.index.apply(batch)
            self.index.settle()
        return self.index

    def vector_batches(self, since: int, upto: int) -> Iterator[VectorBatch]:
        """The live rows added after `since` up to `upto`, in pages, then the rows removed."""
        after = 0
        while True:
            with self.lock:
                rows = self.db.execute(
                    "SELECT id, embedding FROM chunks WHERE version > ? AND version <= ? AND id > ? "
                    "AND embedding IS NOT NULL AND (removed_in IS NULL OR removed_in > ?) ORDER BY id LIMIT ?",
                    (since, upto, after, upto, VECTOR_PAGE)).fetchall()
            if not rows:
                break
            after = rows[-1][0]
            yield VectorBatch(since, [r[0] for r in rows], [r[1] for r in rows])
        with self.lock:
            removed = [r[0] for r in self.db.execute(
                "SELECT id FROM chunks WHERE removed_in > ? AND removed_in <= ? AND version <= ? "
                "AND embedding IS NOT NULL", (since, upto, since))]
        yield VectorBatch(upto, removed_ids=removed)

    def chunks(self, ids: Sequence[int]) -> dict[int, ChunkRecord]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self.lock:
            rows = self.db.execute(
                f"SELECT {CHUNK_COLUMNS} FROM chunks c JOIN documents d ON d.id = c.document "
                f"WHERE c.id IN ({marks}) AND c.removed_in IS NULL", tuple(ids)).fetchall()
        return {r[0]: ChunkRecord(*r) for r in rows}

    def changes_since(self, version: int, limit: int) -> list[Change]:
        with self.lock:
            rows = self.db.execute(
                "SELECT version, ts, kind, subject, author, role, scope, summary FROM changes "
                "WHERE version > ? ORDER BY version LIMIT ?", (version, limit)).fetchall()
        return [Change(*r) for r in rows]

    def add_ontology(self, name: str, turtle: str, triples: int, author: Author, summary: str) -> int:
        with self.write() as db:
            version = self._next_version(db, "ontology", name, author, "team", summary)
            db.execute("INSERT INTO ontology(version, name, turtle, triples) VALUES(?,?,?,?)",
                       (version, name, turtle, triples))
        return version

    def ontology_since(self, version: int) -> list[tuple[int, str]]:
        with self.lock:
            return self.db.execute("SELECT version, turtle FROM ontology WHERE version > ? ORDER BY version",
                                   (version,)).fetchall()

    def seen(self, agent: str) -> int | None:
        with self.lock:
            row = self.db.execute("SELECT version FROM seen WHERE agent=?", (agent,)).fetchone()
        return row[0] if row else None

    def mark_seen(self, agent: str, version: int) -> None:
        with self.write() as db:
            db.execute("INSERT INTO seen(agent, version) VALUES(?,?) ON CONFLICT(agent) "
                       "DO UPDATE SET version=max(version, excluded.version)", (agent, version))

    def counts(self) -> tuple[int, int]:
        """Live documents and chunks."""
        with self.lock:
            docs = self.db.execute("SELECT count(*) FROM documents WHERE removed_in IS NULL").fetchone()[0]
            chunks = self.db.execute("SELECT count(*) FROM chunks WHERE removed_in IS NULL").fetchone()[0]
        return docs, chunks


class _Write:
    """BEGIN IMMEDIATE ... COMMIT under the store's lock: the database's one writer at a time."""

    def __init__(self, store: SqliteKnowledgeStore):
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        self.store.lock.acquire()
        self.store.db.execute("BEGIN IMMEDIATE")
        return self.store.db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.store.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.store.lock.release()
