"""What crosses the knowledge package's boundaries: documents going in, cited hits coming out,
the change log that drives the cache and the change notices."""
from __future__ import annotations

from dataclasses import dataclass, field

from dgxready.errors import DgxReadyError

TEAM_SCOPE = "team"


class KnowledgeError(DgxReadyError):
    """Refused input or a failed query; the message says what and where, and nothing was stored."""


@dataclass(frozen=True)
class Author:
    """Who added something: the agent and its role (a person or task uses its own name)."""
    agent: str
    role: str


@dataclass(frozen=True)
class ChunkText:
    """One piece of a document: the heading path it sits under and its text."""
    heading: str
    text: str


@dataclass(frozen=True)
class NewDocument:
    source: str
    kind: str
    author: Author
    scope: str
    chunks: tuple[ChunkText, ...]
    sha256: str


@dataclass(frozen=True)
class StoredDocument:
    document: int
    version: int
    chunks: int
    replaced: int | None = None


@dataclass(frozen=True)
class ChunkRecord:
    """A stored chunk with its metadata, as search results cite it."""
    chunk: int
    document: int
    ordinal: int
    source: str
    heading: str
    text: str
    scope: str
    author: str
    role: str
    ts: float
    version: int


@dataclass(frozen=True)
class Hit:
    """One search result: the chunk, cited by document, chunk and knowledge version, with the
    ranks it had in each retriever (None where it was not retrieved) and its fused score."""
    chunk: ChunkRecord
    score: float
    text_rank: int | None
    vector_rank: int | None

    @property
    def citation(self) -> str:
        return f"{self.chunk.source}#{self.chunk.heading or 'chunk ' + str(self.chunk.ordinal)} " \
               f"(document {self.chunk.document}, chunk {self.chunk.chunk}, version {self.chunk.version})"


@dataclass(frozen=True)
class SearchAnswer:
    query: str
    version: int
    hits: tuple[Hit, ...]
    cached: bool = False
    vector_search: str = "none"


@dataclass(frozen=True)
class Change:
    """One entry of the change log: every write is one version."""
    version: int
    ts: float
    kind: str
    subject: str
    author: str
    role: str
    scope: str
    summary: str


@dataclass(frozen=True)
class OntologyAnswer:
    query: str
    version: int
    form: str
    variables: tuple[str, ...] = ()
    rows: tuple[tuple[str | None, ...], ...] = ()
    boolean: bool | None = None
    reasoning: bool = True
    cached: bool = False


@dataclass(frozen=True)
class Asserted:
    version: int
    triples: int


@dataclass
class VectorBatch:
    """The vector changes since a version: chunks added (ids and float32 rows) and removed."""
    version: int
    added_ids: list[int] = field(default_factory=list)
    added: list[bytes] = field(default_factory=list)
    removed_ids: list[int] = field(default_factory=list)
