"""The knowledge service the multiplexer's tools call: hybrid search with citations, adding
documents, the ontology's queries and assertions, all behind the versioned cache."""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agents.knowledge.cache import CacheKey, VersionedCache, normalised_sparql, normalised_text
from agents.knowledge.chunking import ChunkLimits, chunk_document, kind_of
from agents.knowledge.embeddings import Embedder
from agents.knowledge.ontology import OntologyGraph, OntologyLimits, parse_turtle
from agents.knowledge.store import KnowledgeStore
from agents.knowledge.types import (
    TEAM_SCOPE,
    Asserted,
    Author,
    ChunkRecord,
    Hit,
    KnowledgeError,
    NewDocument,
    OntologyAnswer,
    SearchAnswer,
    StoredDocument,
)

MAX_LIMIT = 50
DEGRADED = "text (the embeddings server failed)"


@dataclass(frozen=True)
class ServiceSettings:
    chunking: ChunkLimits = field(default_factory=ChunkLimits)
    ontology: OntologyLimits = field(default_factory=OntologyLimits)
    candidates: int = 50
    rrf_k: int = 5
    text_weight: float = 1.0
    vector_weight: float = 0.2
    cache_entries: int = 1024


def role_scope(role: str) -> str:
    return f"role:{role}"


def visible_scopes(role: str) -> tuple[str, ...]:
    return (TEAM_SCOPE, role_scope(role))


def fused(rankings: Sequence[tuple[list[int], float]], k: int) -> dict[int, float]:
    """Weighted reciprocal rank fusion: each (ranking, weight) adds weight / (k + rank) to the
    chunks it ranks."""
    scores: dict[int, float] = {}
    for ranking, weight in rankings:
        for rank, chunk in enumerate(ranking, start=1):
            scores[chunk] = scores.get(chunk, 0.0) + weight / (k + rank)
    return scores


def rank_of(ranking: list[int]) -> dict[int, int]:
    return {chunk: rank for rank, chunk in enumerate(ranking, start=1)}


class KnowledgeService:
    def __init__(self, store: KnowledgeStore, embedder: Embedder | None = None,
                 settings: ServiceSettings | None = None,
                 on_cache_event: Callable[[str, int], None] | None = None):
        self.store = store
        self.embedder = embedder
        self.settings = settings or ServiceSettings()
        self.cache = VersionedCache(self.settings.cache_entries, on_cache_event)
        self.ontology = OntologyGraph(self.settings.ontology)
        # The version each agent's notice was last decided at, so that a turn with nothing new
        # skips reading and writing the agent's `seen` row. One entry per agent.
        self.noticed: dict[str, int] = {}

    def version(self, fresh_within_s: float = 0.0) -> int:
        return self.store.version(fresh_within_s)

    # Documents

    def add_text(self, text: str, source: str, author: Author, scope: str = TEAM_SCOPE,
                 kind: str | None = None) -> StoredDocument:
        kind = kind or kind_of(source)
        chunks = chunk_document(text, kind, source, self.settings.chunking)
        doc = NewDocument(source, kind, author, scope, chunks, hashlib.sha256(text.encode()).hexdigest())
        embeddings = None
        if self.embedder is not None:
            embeddings = self.embedder.embed([f"{c.heading}\n{c.text}" for c in chunks])
        return self.store.add_document(doc, embeddings)

    def add_file(self, path: Path, author: Author, scope: str = TEAM_SCOPE, source: str | None = None
                 ) -> StoredDocument:
        try:
            size = path.stat().st_size
            if size > self.settings.chunking.max_document_bytes:
                limit = self.settings.chunking.max_document_bytes
                raise KnowledgeError(f"{path}: {size} bytes is over the limit of {limit} "
                                     "(knowledge.max_document_bytes)")
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KnowledgeError(f"{path}: {exc}") from None
        return self.add_text(text, source or str(path), author, scope)

    # Search

    def search(self, query: str, limit: int = 5, role: str | None = None) -> SearchAnswer:
        if not query.strip():
            raise KnowledgeError("query: give some words to search for")
        limit = max(1, min(limit, MAX_LIMIT))
        scopes = visible_scopes(role) if role else (TEAM_SCOPE,)
        version = self.store.version()
        key = CacheKey("search", normalised_text(query), (limit, scopes))
        cached = self.cache.get(key, version)
        if cached is not None:
            return SearchAnswer(cached.query, cached.version, cached.hits, True, cached.vector_search)
        answer = self._search(query, limit, scopes, version)
        if answer.vector_search != DEGRADED:
            self.cache.put(key, version, answer)
        return answer

    def _vector_ranking(self, query: str, wanted: int, version: int) -> tuple[list[int], str]:
        """Chunk ids by similarity and the retrieval's name; BM25 alone (not cached) while the
        embeddings server fails."""
        if self.embedder is None:
            return [], "text"
        try:
            vector = self.embedder.embed([query])[0]
        except KnowledgeError:
            return [], DEGRADED
        return self.store.vector_search(vector, wanted, version), "hybrid"

    def _search(self, query: str, limit: int, scopes: tuple[str, ...], version: int) -> SearchAnswer:
        wanted = max(self.settings.candidates, limit)
        # One after the other: the scan is bound by memory bandwidth and takes every core's
        # share (BLAS threads), so BM25 beside it made the 2-core VM's p95 longer, not shorter.
        by_text = self.store.text_search(query, scopes, wanted)
        by_vector, retrieval = self._vector_ranking(query, wanted * 2, version)
        records = self.store.chunks(list(dict.fromkeys(by_text + by_vector)))
        by_vector = [c for c in by_vector if c in records and records[c].scope in scopes][:wanted]
        scores = fused([(by_text, self.settings.text_weight), (by_vector, self.settings.vector_weight)],
                       self.settings.rrf_k)
        text_ranks, vector_ranks = rank_of(by_text), rank_of(by_vector)
        best = sorted((c for c in scores if c in records), key=lambda c: -scores[c])[:limit]
        hits = tuple(Hit(records[c], scores[c], text_ranks.get(c), vector_ranks.get(c)) for c in best)
        return SearchAnswer(query, version, hits, False, retrieval)

    def chunk(self, chunk: int) -> ChunkRecord | None:
        return self.store.chunks([chunk]).get(chunk)

    # Ontology

    def _synced_ontology(self) -> OntologyGraph:
        self.ontology.load(self.store.ontology_since(self.ontology.version))
        return self.ontology

    def asserted_triples(self) -> int:
        with self.ontology.lock:
            return len(self._synced_ontology().asserted)

    def onto_query(self, sparql: str, reasoning: bool = True) -> OntologyAnswer:
        version = self.store.version()
        key = CacheKey("sparql", normalised_sparql(sparql), reasoning)
        cached = self.cache.get(key, version)
        if cached is not None:
            return OntologyAnswer(cached.query, cached.version, cached.form, cached.variables, cached.rows,
                                  cached.boolean, cached.reasoning, True)
        with self.ontology.lock:
            form, variables, rows, boolean = self._synced_ontology().answer(sparql, reasoning)
        answer = OntologyAnswer(sparql, version, form, variables, rows, boolean, reasoning)
        self.cache.put(key, version, answer)
        return answer

    def onto_assert(self, turtle: str, author: Author, name: str) -> Asserted:
        """Parses the Turtle whole before anything is stored; triples the ontology already has
        add nothing (and no version)."""
        limits = self.settings.ontology
        size = len(turtle.encode())
        if size > limits.max_turtle_bytes:
            raise KnowledgeError(f"{name}: {size} bytes of Turtle is over the limit of "
                                 f"{limits.max_turtle_bytes}")
        graph = parse_turtle(turtle, name)
        if len(graph) > limits.max_triples:
            raise KnowledgeError(f"{name}: {len(graph)} triples is over the limit of {limits.max_triples}")
        if len(graph) == 0:
            raise KnowledgeError(f"{name}: no triples")
        with self.ontology.lock:
            new = self._synced_ontology().new_triples(graph)
        if new == 0:
            return Asserted(self.store.version(), 0)
        version = self.store.add_ontology(name, graph.serialize(format="nt"), len(graph), author,
                                          f"asserted {new} new triples ({name})")
        return Asserted(version, new)

    def load_ontology_file(self, path: Path, author: Author) -> Asserted:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KnowledgeError(f"{path}: {exc}") from None
        return self.onto_assert(text, author, str(path))
