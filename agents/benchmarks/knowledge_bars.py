"""The knowledge store's bars (issue #14), measured, not asserted:
- query: hybrid search (FTS5 BM25 + exact numpy vectors, fused by reciprocal rank, chunks read
  back with their citations) over a store of `--exact-size` chunks of dimension 576, the embedding
  call excluded (the query vectors are computed beforehand): p95 <= 20 ms at 100k chunks;
- ann: the usearch HNSW index at `--ann-size` vectors: p95 <= 20 ms with recall@10 >= 0.95 against
  exact search, with the index's build time and memory, per search breadth (expansion_search);
- ingest: documents per second and chunks per second, with embeddings from a real
  /v1/embeddings server (--embeddings-url, or the default model started in embeddings mode) and
  without.

The synthetic corpus: chunks of 60 words drawn (Zipf) from 20,000 made-up words; vectors of
intrinsic dimension 32 (a random projection of Gaussian latents to 576, plus noise), as real
embeddings are far from isotropic; queries are perturbed stored vectors and words of a stored
chunk (its content words: the 200 most frequent synthetic words stand for stopwords). Each
figure comes with wall and CPU time per query, the host's cores and its load, since
other work shares this machine. `--json FILE` writes them."""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from agents.knowledge.chunking import ChunkLimits
from agents.knowledge.embeddings import EmbeddingClient, EmbeddingSettings
from agents.knowledge.service import KnowledgeService, ServiceSettings
from agents.knowledge.store import SqliteKnowledgeStore
from agents.knowledge.types import Author, ChunkText, NewDocument
from agents.knowledge.vectors import AnnVectors, ExactVectors, VectorSettings
from dgxready.settings import REPO_ROOT
from model.running import running_model

DIM = 576
LATENT = 32
WORDS = 20_000
WORDS_PER_CHUNK = 60
COMMON = 200
CHUNKS_PER_DOCUMENT = 1000
BAR_MS = 20.0
RECALL_BAR = 0.95
AUTHOR = Author("bench", "platform-engineer")


@dataclass(frozen=True)
class Latency:
    """Wall time per query, and the CPU the whole process spent on it (every thread: the BLAS
    threads of the scan and the text search's thread included)."""
    p50_ms: float
    p95_ms: float
    cpu_p95_ms: float

    @classmethod
    def of(cls, wall: list[float], cpu: list[float]) -> Latency:
        return cls(float(np.percentile(wall, 50) * 1e3), float(np.percentile(wall, 95) * 1e3),
                   float(np.percentile(cpu, 95) * 1e3))


@dataclass(frozen=True)
class Host:
    cores: int
    load_before: float
    load_after: float


@dataclass(frozen=True)
class QueryBar:
    chunks: int
    build_s: float
    hybrid: Latency
    text_only: Latency
    vector_only: Latency
    met: bool


@dataclass(frozen=True)
class AnnPoint:
    expansion_search: int
    latency: Latency
    recall_at_10: float
    met: bool


@dataclass(frozen=True)
class AnnBar:
    vectors: int
    dtype: str
    connectivity: int
    expansion_add: int
    build_s: float
    memory_bytes: int
    exact: Latency
    points: list[AnnPoint]


@dataclass(frozen=True)
class IngestBar:
    mode: str
    documents: int
    chunks: int
    bytes: int
    seconds: float

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.seconds


class Corpus:
    """Synthetic chunks and vectors, the same for a given seed."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.words = np.array([f"w{i}x{(i * 7919) % 1000}" for i in range(WORDS)])
        self.projection = self.rng.standard_normal((LATENT, DIM)).astype(np.float32)
        ranks = np.arange(1, WORDS + 1)
        self.word_p = (1.0 / ranks) / np.sum(1.0 / ranks)

    def texts(self, n: int) -> list[str]:
        picks = self.rng.choice(WORDS, size=(n, WORDS_PER_CHUNK), p=self.word_p)
        return [" ".join(self.words[row]) for row in picks]

    def questions(self, n: int, words: int = 6) -> list[str]:
        """Content words of stored chunks: the corpus's COMMON most frequent words play the part
        English stopwords play in real questions (the store drops those)."""
        texts = self.texts(n)
        return [" ".join([w for w in t.split() if int(w[1:w.index("x")]) >= COMMON][:words]) for t in texts]

    def vectors(self, n: int) -> np.ndarray:
        latent = self.rng.standard_normal((n, LATENT)).astype(np.float32)
        rows = latent @ self.projection + 0.3 * self.rng.standard_normal((n, DIM)).astype(np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    def queries_near(self, rows: np.ndarray, n: int) -> np.ndarray:
        picked = rows[self.rng.integers(0, len(rows), n)]
        noisy = picked + 0.02 * self.rng.standard_normal(picked.shape).astype(np.float32)
        return noisy / np.linalg.norm(noisy, axis=1, keepdims=True)


def host(load_before: float) -> Host:
    return Host(os.cpu_count() or 1, load_before, os.getloadavg()[0])


def timed(fn: Callable[[int], object], n: int) -> Latency:
    wall, cpu = [], []
    for i in range(n):
        w, c = time.perf_counter(), time.process_time()
        fn(i)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return Latency.of(wall, cpu)


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class FixedEmbedder:
    """The query vectors, computed beforehand: the bar excludes the embedding call."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors
        self.next = 0

    def embed(self, texts: list[str]) -> np.ndarray:
        row = self.vectors[self.next % len(self.vectors)]
        self.next += 1
        return row[None, :]


def fill_store(store: SqliteKnowledgeStore, corpus: Corpus, chunks: int) -> None:
    for start in range(0, chunks, CHUNKS_PER_DOCUMENT):
        n = min(CHUNKS_PER_DOCUMENT, chunks - start)
        pieces = tuple(ChunkText(f"section {start + i}", text) for i, text in enumerate(corpus.texts(n)))
        doc = NewDocument(f"synthetic/{start // CHUNKS_PER_DOCUMENT}.md", "markdown", AUTHOR, "team", pieces,
                          f"{start:064x}")
        store.add_document(doc, corpus.vectors(n))
        if (start // CHUNKS_PER_DOCUMENT) % 20 == 19:
            progress(f"store: {start + n} of {chunks} chunks")


def query_bar(size: int, queries: int, tmp: Path) -> QueryBar:
    corpus = Corpus(1)
    started = time.perf_counter()
    store = SqliteKnowledgeStore(tmp / f"exact-{size}.db", VectorSettings(ann_threshold=size + 1))
    fill_store(store, corpus, size)
    index = store.synced_index()
    assert index is not None and index.mode == "exact"
    build_s = time.perf_counter() - started
    progress(f"query: {size} chunks stored and loaded in {build_s:.0f} s")
    rows = index.rows
    assert isinstance(rows, ExactVectors)
    vectors = corpus.queries_near(rows.matrix[:rows.count], queries)
    texts = corpus.questions(queries)
    service = KnowledgeService(store, FixedEmbedder(vectors), ServiceSettings(cache_entries=0))
    for i in range(5):
        service.search(texts[i], 10)
    hybrid = timed(lambda i: service.search(texts[i], 10), queries)
    text_only = timed(lambda i: store.text_search(texts[i], ("team",), 50), queries)
    vector_only = timed(lambda i: store.vector_search(vectors[i], 100), queries)
    store.close()
    return QueryBar(size, build_s, hybrid, text_only, vector_only, hybrid.p95_ms <= BAR_MS)


def recall(exact: ExactVectors, ann: AnnVectors, queries: np.ndarray) -> float:
    hits = [len({c for c, _ in exact.search(q, 10)} & {c for c, _ in ann.search(q, 10)}) / 10 for q in queries]
    return float(np.mean(hits))


def ann_bar(size: int, queries: int, breadths: list[int], settings: VectorSettings) -> AnnBar:
    corpus = Corpus(2)
    exact = ExactVectors(DIM)
    step = 50_000
    for start in range(0, size, step):
        n = min(step, size - start)
        exact.add(np.arange(start + 1, start + n + 1), corpus.vectors(n))
    ann = AnnVectors(DIM, settings)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    for start in range(0, size, step):
        ann.add(exact.ids[start:start + step], exact.matrix[start:start + step])
        elapsed = time.perf_counter() - started
        progress(f"ann: {min(start + step, size)} of {size} vectors indexed, {elapsed:.0f} s")
    build_s = time.perf_counter() - started
    rss_grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    progress(f"ann: built in {build_s:.0f} s, {ann.memory_bytes / 2**20:.0f} MiB "
             f"(peak RSS grew {rss_grew:.0f} MiB)")
    qs = corpus.queries_near(exact.matrix[:exact.count], queries)
    exact_latency = timed(lambda i: exact.search(qs[i], 10), min(queries, 50))
    points = []
    for breadth in breadths:
        ann.index.expansion_search = breadth
        latency = timed(lambda i: ann.search(qs[i], 10), queries)
        r = recall(exact, ann, qs)
        points.append(AnnPoint(breadth, latency, r, latency.p95_ms <= BAR_MS and r >= RECALL_BAR))
        progress(f"ann: expansion_search {breadth}: p95 {latency.p95_ms:.2f} ms, recall@10 {r:.3f}")
    return AnnBar(size, settings.ann_dtype, settings.connectivity, settings.expansion_add, build_s,
                  ann.memory_bytes, exact_latency, points)


def runbook_texts() -> list[tuple[str, str]]:
    files = sorted((REPO_ROOT / "runbooks").glob("*.md"))
    return [(str(p.relative_to(REPO_ROOT)), p.read_text()) for p in files]


def ingest_round(service: KnowledgeService, mode: str, rounds: int) -> IngestBar:
    docs = chunks = size = 0
    started = time.perf_counter()
    for r in range(rounds):
        for source, text in runbook_texts():
            stored = service.add_text(f"{text}\n\nround {r}", f"{mode}/{r}/{source}", AUTHOR)
            docs, chunks, size = docs + 1, chunks + stored.chunks, size + len(text.encode())
        progress(f"ingest {mode}: round {r + 1} of {rounds}, {chunks} chunks")
    return IngestBar(mode, docs, chunks, size, time.perf_counter() - started)


def ingest_bars(tmp: Path, rounds_plain: int, rounds_embedded: int, url: str | None) -> list[IngestBar]:
    plain = KnowledgeService(SqliteKnowledgeStore(tmp / "ingest-plain.db"),
                             settings=ServiceSettings(chunking=ChunkLimits()))
    bars = [ingest_round(plain, "without-embeddings", rounds_plain)]
    if url:
        embedded = KnowledgeService(SqliteKnowledgeStore(tmp / "ingest-embedded.db"),
                                    EmbeddingClient(EmbeddingSettings(url)))
        return bars + [ingest_round(embedded, "with-embeddings", rounds_embedded)]
    with running_model(parallel=2, ctx_per_slot=1024, backend="llamacpp", embeddings=True) as model:
        embedded = KnowledgeService(SqliteKnowledgeStore(tmp / "ingest-embedded.db"),
                                    EmbeddingClient(EmbeddingSettings(model.base_url)))
        return bars + [ingest_round(embedded, "with-embeddings", rounds_embedded)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("query", "ann", "ingest"), action="append",
                        help="run only these parts (repeatable; default: all)")
    parser.add_argument("--exact-size", type=int, default=100_000, help="chunks in the store for the query bar")
    parser.add_argument("--ann-size", type=int, default=1_000_000, help="vectors in the ANN index")
    parser.add_argument("--queries", type=int, default=200, help="queries per measurement")
    parser.add_argument("--breadths", default="64,96,128,256", help="expansion_search values to measure")
    parser.add_argument("--dtype", default="f16", choices=("f32", "f16", "i8"), help="ANN storage type")
    parser.add_argument("--connectivity", type=int, default=16, help="HNSW M")
    parser.add_argument("--expansion-add", type=int, default=128, help="HNSW ef_construction")
    parser.add_argument("--threads", type=int, default=2, help="threads for the ANN build")
    parser.add_argument("--ingest-rounds", type=int, default=20, help="runbook passes without embeddings")
    parser.add_argument("--ingest-rounds-embedded", type=int, default=1, help="runbook passes with embeddings")
    parser.add_argument("--embeddings-url", help="an /v1/embeddings server (default: start the default model)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    parts = args.only or ["query", "ann", "ingest"]
    load = os.getloadavg()[0]
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="kb-bars-") as tmp:
        if "query" in parts:
            results["query"] = asdict(query_bar(args.exact_size, args.queries, Path(tmp)))
        if "ann" in parts:
            settings = VectorSettings(connectivity=args.connectivity, expansion_add=args.expansion_add,
                                      ann_dtype=args.dtype, threads=args.threads)
            breadths = [int(b) for b in args.breadths.split(",")]
            results["ann"] = asdict(ann_bar(args.ann_size, args.queries, breadths, settings))
        if "ingest" in parts:
            bars = ingest_bars(Path(tmp), args.ingest_rounds, args.ingest_rounds_embedded, args.embeddings_url)
            results["ingest"] = [asdict(b) | {"chunks_per_s": b.chunks_per_s} for b in bars]
    results["host"] = asdict(host(load))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
