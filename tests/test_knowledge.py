"""The knowledge store without a model server: several writing processes, the versioned cache,
reasoning, hostile input, per-role permissions, the vector index's switch to ANN, and change
notices that reach an agent of another process."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agents.config import AgentIdentity, BackendConfig, MuxConfig
from agents.knowledge.cache import CacheKey, VersionedCache
from agents.knowledge.chunking import ChunkLimits, chunk_document
from agents.knowledge.embeddings import EmbeddingClient, EmbeddingSettings
from agents.knowledge.service import DEGRADED, KnowledgeService, ServiceSettings
from agents.knowledge.store import SqliteKnowledgeStore
from agents.knowledge.types import Author, KnowledgeError, VectorBatch
from agents.knowledge.vectors import ExactVectors, SketchSettings, VectorIndex, VectorSettings
from agents.metrics import MuxMetrics
from agents.mux import create_mux
from agents.proxy import Turn
from agents.server import prepare
from agents.state import StateStore
from agents.tools import ToolCall, ToolRegistry
from dgxready.errors import DgxReadyError
from dgxready.ports import free_port
from dgxready.roles import load_roles
from dgxready.settings import REPO_ROOT, load_settings
from model.serve import ServeRequest, embedding_flags, serve

ONTOLOGY = REPO_ROOT / "agents" / "ontology" / "team.ttl"
TEAM = "PREFIX team: <https://dgxready.example/team#>\n"
ME = Author("tester", "platform-engineer")

WRITER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from agents.knowledge.service import KnowledgeService
    from agents.knowledge.store import SqliteKnowledgeStore
    from agents.knowledge.types import Author
    db, name, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    service = KnowledgeService(SqliteKnowledgeStore(db))
    versions = [service.add_text(f"# {name} note {i}\\nwritten by {name}, number {i}", f"{name}/{i}.md",
                                 Author(name, "developer")).version for i in range(count)]
    print(json.dumps(versions))
""")


def knowledge(tmp_path: Path, **settings) -> KnowledgeService:
    return KnowledgeService(SqliteKnowledgeStore(tmp_path / "knowledge.db"),
                            settings=ServiceSettings(**settings))


def write_from_another_process(db: Path, name: str, count: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(db), name, str(count)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, text=True)


def test_several_processes_writing_at_once_lose_nothing_and_versions_increase_strictly(tmp_path):
    db = tmp_path / "knowledge.db"
    SqliteKnowledgeStore(db).close()
    # Unequal shares: writers that finish close the database while the others still write.
    writers = [write_from_another_process(db, f"writer{n}", count) for n, count in enumerate((10, 20, 30, 40))]
    seen = [json.loads(w.communicate(timeout=240)[0]) for w in writers]
    assert all(w.returncode == 0 for w in writers)
    for versions in seen:
        assert versions == sorted(versions) and len(set(versions)) == len(versions)
    every = sorted(v for versions in seen for v in versions)
    assert every == list(range(1, 101)), f"each write is one version, none shared, none skipped: {seen}"
    store = SqliteKnowledgeStore(db)
    assert store.counts() == (100, 100) and store.version() == 100
    assert [c.version for c in store.changes_since(0, 1000)] == list(range(1, 101))


def test_an_update_from_another_process_is_never_answered_from_a_stale_cache(tmp_path):
    events: list[tuple[str, int]] = []
    service = KnowledgeService(SqliteKnowledgeStore(tmp_path / "knowledge.db"),
                               on_cache_event=lambda e, n: events.append((e, n)))
    service.add_text("# Restart\nTo restart the exporter run monitoring.up", "ops.md", ME)
    first = service.search("how do I restart the exporter")
    again = service.search("  How do I RESTART the exporter ")
    assert not first.cached and again.cached and again.hits == first.hits
    writer = write_from_another_process(tmp_path / "knowledge.db", "exporter", 1)
    assert writer.wait(timeout=120) == 0
    after = service.search("how do I restart the exporter")
    assert not after.cached and after.version == first.version + 1
    assert "exporter/0.md" in {h.chunk.source for h in after.hits}
    assert ("hit", 1) in events and ("invalidation", 1) in events


def test_a_cached_answer_is_not_kept_under_a_version_it_may_not_reflect():
    cache = VersionedCache()
    key = CacheKey("search", "q", ())
    cache.get(key, 5)
    cache.put(key, 4, "computed before version 5 landed")
    assert cache.get(key, 5) is None


def test_a_class_hierarchy_inference_appears_in_sparql_answers_only_after_reasoning(tmp_path):
    service = knowledge(tmp_path)
    service.load_ontology_file(ONTOLOGY, ME)
    ask = TEAM + "ASK { team:slo-p95 a team:Requirement }"
    select = TEAM + "SELECT ?r WHERE { ?r a team:Architect } ORDER BY ?r"
    assert service.onto_query(ask, reasoning=False).boolean is False
    assert service.onto_query(select, reasoning=False).rows == ()
    assert service.onto_query(ask).boolean is True
    assert service.onto_query(select).rows == (("https://dgxready.example/team#architect-nusy",),
                                               ("https://dgxready.example/team#architect-systems",))
    owner = service.onto_query(TEAM + "SELECT ?who WHERE { team:rollout team:ownedBy ?who }")
    assert owner.rows == (("https://dgxready.example/team#platform-engineer",),)


def test_an_assertion_reaches_the_next_query_and_its_cached_answer_is_dropped(tmp_path):
    service = knowledge(tmp_path)
    service.load_ontology_file(ONTOLOGY, ME)
    ask = TEAM + "ASK { team:ux-review a team:Artefact }"
    assert service.onto_query(ask).boolean is False and service.onto_query(ask).cached
    added = service.onto_assert(TEAM.replace("PREFIX", "@prefix").rstrip() + " .\n"
                                "team:ux-review a team:UXReview .", ME, "test")
    assert added.triples == 1
    answer = service.onto_query(ask)
    assert answer.boolean is True and not answer.cached and answer.version == added.version
    assert service.onto_assert("<https://dgxready.example/team#ux-review> "
                               "<http://www.w3.org/1999/02/22-rdf-syntax-ns#type> "
                               "<https://dgxready.example/team#UXReview> .", ME, "again").triples == 0
    assert service.version() == added.version, "a repeated assertion is no new version"


@pytest.mark.parametrize(("turtle", "message"), [
    ("@prefix team: <https://x/> .\nteam:a team:b", "malformed Turtle"),
    ("team:a team:b team:c .", "malformed Turtle"),
    ("<a> <b> <c> . }}}", "malformed Turtle"),
])
def test_malformed_turtle_gets_a_clear_error_and_the_store_is_unchanged(tmp_path, turtle, message):
    service = knowledge(tmp_path)
    service.load_ontology_file(ONTOLOGY, ME)
    before = (service.version(), service.asserted_triples())
    with pytest.raises(KnowledgeError, match=message):
        service.onto_assert(turtle, ME, "hostile.ttl")
    assert (service.version(), service.asserted_triples()) == before


@pytest.mark.parametrize(("sparql", "message"), [
    ("SELEC ?x WHERE { ?x ?p ?o }", "malformed SPARQL"),
    ("SELECT ?x WHERE { ?x ?p ", "malformed SPARQL"),
    ("INSERT DATA { <urn:a> <urn:b> <urn:c> }", "SPARQL Update is refused"),
    ("DELETE WHERE { ?s ?p ?o }", "SPARQL Update is refused"),
    ("DROP ALL", "SPARQL Update is refused"),
    ("LOAD <http://example.org/evil.ttl>", "SPARQL Update is refused"),
    ("CONSTRUCT { ?s ?p ?o } WHERE { ?s ?p ?o }", "only SELECT and ASK"),
    ("SELECT ?s FROM <http://example.org/g> WHERE { ?s ?p ?o }", "FROM / FROM NAMED are refused"),
    ("SELECT ?s WHERE { SERVICE <http://example.org/sparql> { ?s ?p ?o } }", "SERVICE is refused"),
])
def test_malformed_sparql_and_sparql_update_get_clear_errors_and_the_store_is_unchanged(tmp_path, sparql,
                                                                                         message):
    service = knowledge(tmp_path)
    service.load_ontology_file(ONTOLOGY, ME)
    before = (service.version(), service.asserted_triples())
    with pytest.raises(KnowledgeError, match=message):
        service.onto_query(sparql)
    assert (service.version(), service.asserted_triples()) == before


def test_a_document_past_the_size_limit_is_refused_whole(tmp_path):
    service = knowledge(tmp_path, chunking=ChunkLimits(max_document_bytes=64 * 1024))
    huge = "# Huge\n" + "all work and no play " * 4000
    with pytest.raises(KnowledgeError, match=r"huge\.md: \d+ bytes is over the limit of 65536"):
        service.add_text(huge, "huge.md", ME)
    big_file = tmp_path / "big.md"
    big_file.write_text(huge)
    with pytest.raises(KnowledgeError, match="over the limit"):
        service.add_file(big_file, ME)
    assert service.version() == 0 and service.store.counts() == (0, 0)


def test_markdown_is_chunked_by_headings_and_size_and_json_by_keys():
    text = "intro line\n# Top\nunder top\n## Sub\n```\n# not a heading\n```\n" + "word " * 500
    chunks = chunk_document(text, "markdown", "x.md", ChunkLimits(max_chars=400))
    assert chunks[0].heading == "" and chunks[1].heading == "Top"
    assert {c.heading for c in chunks[2:]} == {"Top > Sub"} and all(len(c.text) <= 400 for c in chunks)
    assert "# not a heading" in chunks[2].text
    data = chunk_document(json.dumps({"alerts": ["a"], "owner": "platform"}), "json", "x.json", ChunkLimits())
    assert [c.heading for c in data] == ["alerts", "owner"]
    with pytest.raises(KnowledgeError, match="x.json: not JSON"):
        chunk_document("{oops", "json", "x.json", ChunkLimits())


def registry_with_knowledge(tmp_path: Path) -> tuple[ToolRegistry, StateStore]:
    state = StateStore(tmp_path / "state.db")
    return ToolRegistry(state, knowledge=knowledge(tmp_path)), state


def test_a_role_without_kb_add_is_denied_and_the_denial_is_audited(tmp_path):
    roles = load_roles()
    tools, state = registry_with_knowledge(tmp_path)
    args = {"source": "notes.md", "text": "# Notes\nthe developer's notes"}
    denied = tools.call(ToolCall("developer-1", roles["developer"], "s1", "kb.add", args))
    assert not denied.ok and denied.outcome == "denied" and "may not call kb.add" in denied.error
    assert ("developer-1", "s1", "kb.add", "denied", "role developer may not call kb.add") in state.audit_rows()
    assert tools.knowledge.version() == 0
    added = tools.call(ToolCall("platform-engineer-1", roles["platform-engineer"], "s2", "kb.add", args))
    assert added.ok and added.result["version"] == 1
    found = tools.call(ToolCall("developer-1", roles["developer"], "s1", "knowledge.query",
                                {"query": "developer notes"}))
    assert found.ok and found.result["results"][0]["citation"].startswith("notes.md#Notes (document 1, chunk 1")


def test_a_role_scoped_document_is_found_by_its_role_only(tmp_path):
    roles = load_roles()
    tools, _ = registry_with_knowledge(tmp_path)
    added = tools.call(ToolCall("qa-specialist-1", roles["qa-specialist"], None, "kb.add",
                                {"source": "flaky.md", "text": "flaky tests quarantine list", "scope": "role"}))
    assert added.ok
    for role, expected in (("qa-specialist", 1), ("developer", 0)):
        got = tools.call(ToolCall(f"{role}-1", roles[role], None, "kb.search", {"query": "flaky quarantine"}))
        assert len(got.result["results"]) == expected, role


def test_the_vector_index_switches_to_ann_past_its_threshold_and_follows_later_versions(tmp_path):
    rng = np.random.default_rng(7)
    settings = VectorSettings(ann_threshold=300, index_dir=tmp_path / "knowledge.db.ann")
    store = SqliteKnowledgeStore(tmp_path / "knowledge.db", settings)
    service = KnowledgeService(store, embedder=None)
    rows = {}
    for n in range(4):
        doc = "\n".join(f"# part {n}-{i}\ntext {n} {i}" for i in range(100))
        stored = add_with_vectors(service, doc, f"d{n}.md", rng)
        rows[n] = stored.document
        store.vector_search(rng.standard_normal(16), 5)
        assert store.index.mode == ("exact" if n < 2 else "ann")
    assert len(store.index) == 400 and sorted(p.name for p in settings.index_dir.iterdir()) == ["v3.usearch"]
    target = np.frombuffer(store.db.execute("SELECT embedding FROM chunks WHERE id=150").fetchone()[0],
                           dtype=np.float32)
    assert store.vector_search(target, 1) == [150]
    add_with_vectors(service, "# replaced\nnew text", "d1.md", rng)
    assert 150 not in store.vector_search(target, 10) and len(store.index) == 301
    reopened = SqliteKnowledgeStore(tmp_path / "knowledge.db", settings)
    assert reopened.vector_search(target, 10) == store.vector_search(target, 10)
    assert reopened.index.mode == "ann" and reopened.index.version == store.version()


def add_with_vectors(service: KnowledgeService, text: str, source: str, rng: np.random.Generator):
    """Adds with random embeddings of dimension 16 (what is tested here is the index, not them);
    searches then go by raw vectors, through the store."""
    service.embedder = RandomRows(rng)
    try:
        return service.add_text(text, source, ME)
    finally:
        service.embedder = None


class RandomRows:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.rng.standard_normal((len(texts), 16)).astype(np.float32)


def test_exact_and_ann_search_agree_on_the_nearest_rows():
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((2000, 32)).astype(np.float32)
    exact = VectorIndex(32, VectorSettings(ann_threshold=10**9))
    ann = VectorIndex(32, VectorSettings(ann_threshold=1))
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    for index in (exact, ann):
        index.apply(VectorBatch(1, list(range(1, 2001)), [r.tobytes() for r in unit]))
        index.settle()
    assert exact.mode == "exact" and ann.mode == "ann"
    queries = rng.standard_normal((50, 32)).astype(np.float32)
    recall = np.mean([len({c for c, _ in exact.search(q, 10)} & {c for c, _ in ann.search(q, 10)}) / 10
                      for q in queries])
    assert recall >= 0.95


def full_scan(rows: ExactVectors, query: np.ndarray, k: int) -> list[int]:
    scores = rows.matrix[:rows.count] @ query
    return [int(rows.ids[i]) for i in np.argsort(-scores)[:k]]


@pytest.mark.parametrize("rank", [8, 48, None], ids=["low-rank", "rank-near-the-sketch", "isotropic"])
def test_the_sketch_pruned_exact_search_answers_as_the_full_scan_through_adds_and_removes(rank):
    rng = np.random.default_rng(11)
    dim = 96

    projection = rng.standard_normal((rank, dim)) if rank else np.eye(dim)

    def unit_rows(n: int) -> np.ndarray:
        latent = rng.standard_normal((n, rank or dim)) @ projection
        rows = latent + 0.05 * rng.standard_normal((n, dim))
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)

    settings = SketchSettings(dim=16, from_rows=1000, sample=500)
    exact = ExactVectors(dim, settings)
    exact.add(np.arange(1, 3001), unit_rows(3000))
    assert exact.fit_sketch() is not None
    exact.add(np.arange(3001, 4001), unit_rows(1000))
    exact.remove(list(range(1, 4001, 7)))
    pruned = 0
    for _ in range(40):
        query = unit_rows(1)[0] if rng.random() < 0.5 else exact.matrix[rng.integers(exact.count)]
        found = exact.search(query, 50)
        assert [c for c, _ in found] == full_scan(exact, query, 50)
        pruned += exact._candidates(query, 50) is not None
    if rank == 8:
        assert pruned == 40, "on rows of rank 8, a 16-direction sketch rules most rows out"


def test_a_relaxed_version_check_sees_its_own_commits_at_once_and_anothers_after_the_interval(tmp_path):
    mine = KnowledgeService(SqliteKnowledgeStore(tmp_path / "knowledge.db"))
    other = KnowledgeService(SqliteKnowledgeStore(tmp_path / "knowledge.db"))
    assert mine.version(60.0) == 0
    other.add_text("# A\nfirst", "a.md", ME)
    assert mine.version(60.0) == 0, "another connection's commit waits for the interval"
    assert mine.version() == 1, "a strict check sees it at once"
    other.add_text("# B\nsecond", "b.md", ME)
    mine.add_text("# C\nthird", "c.md", ME)
    assert mine.version(60.0) == 3, "a commit of its own makes it look again"
    other.add_text("# D\nfourth", "d.md", ME)
    assert mine.version(60.0) == 3
    assert mine.version(0.0) == 4


def test_another_process_update_reaches_a_subscribed_agents_next_turn_as_a_change_notice(tmp_path):
    roles = load_roles()
    config = MuxConfig(port=0, backends=[BackendConfig(name="local", url="http://127.0.0.1:1")],
                       state_db=tmp_path / "mux.db")
    ident = AgentIdentity(name="developer-1", role="developer", key="k" * 20)
    mux = create_mux(config, roles, {"d": ident}, StateStore(tmp_path / "mux.db"))
    assert isinstance(mux.metrics, MuxMetrics) and mux.knowledge is not None

    def next_prompt() -> list[dict]:
        turn = Turn(ident, roles["developer"], None, [{"role": "user", "content": "hi"}], {},
                    time.monotonic() + 60, 0.0, {}, None, 64)
        prepare(mux, turn)
        return turn.prompt

    assert [m["role"] for m in next_prompt()] == ["system", "user"], "the first turn records where it starts"
    writer = write_from_another_process(tmp_path / "knowledge.db", "architect-systems-1", 2)
    assert writer.wait(timeout=120) == 0
    prompt = next_prompt()
    notice = prompt[1]["content"]
    assert prompt[1]["role"] == "system" and "changed since version 0 (now 2)" in notice
    assert "v2 added architect-systems-1/1.md (1 chunks) by architect-systems-1 (developer)" in notice
    assert len(notice) <= roles["developer"].knowledge_notice_tokens * 4
    assert [m["role"] for m in next_prompt()] == ["system", "user"], "a notice is given once"
    hits = mux.tools.call(ToolCall("developer-1", roles["developer"], None, "kb.search",
                                   {"query": "architect-systems-1 note 1"}))
    assert hits.result["results"][0]["source"] == "architect-systems-1/1.md"


def test_an_embedding_model_is_served_only_in_embeddings_mode():
    with pytest.raises(DgxReadyError, match="is an embedding model: serve it with --embeddings"):
        serve(ServeRequest(model="nomic-embed-text-v1.5", port=free_port()), load_settings())
    flags = embedding_flags("llamacpp", 1024)
    assert flags[:3] == ["--embeddings", "--pooling", "mean"] and flags[-2:] == ["-ub", "1024"]
    assert embedding_flags("vllm", 1024) == ["--runner", "pooling"]


def test_search_falls_back_to_bm25_uncached_while_the_embeddings_server_is_down(tmp_path):
    service = knowledge(tmp_path)
    service.add_text("# Fans\nraise the GPU fan profile", "fans.md", ME)
    service.embedder = EmbeddingClient(EmbeddingSettings(f"http://127.0.0.1:{free_port()}", timeout_s=2))
    for _ in range(2):
        answer = service.search("GPU fan profile")
        assert answer.vector_search == DEGRADED and not answer.cached
        assert [h.chunk.source for h in answer.hits] == ["fans.md"]


def test_a_vector_search_at_a_version_just_read_runs_while_another_thread_holds_the_database(tmp_path):
    # A search reads the version once; its scan of a current index then needs no connection, so
    # it does not wait behind another thread's query (another agent's tool call, a write).
    rng = np.random.default_rng(5)
    store = SqliteKnowledgeStore(tmp_path / "knowledge.db")
    service = KnowledgeService(store, embedder=None)
    add_with_vectors(service, "\n".join(f"# part {i}\ntext {i}" for i in range(20)), "d.md", rng)
    version = store.version()
    store.vector_search(rng.standard_normal(16), 3)
    answered = []
    with store.lock:
        worker = threading.Thread(target=lambda: answered.append(
            store.vector_search(rng.standard_normal(16), 3, version)))
        worker.start()
        worker.join(timeout=5)
        assert answered and len(answered[0]) == 3
        blocked = threading.Thread(target=lambda: store.vector_search(rng.standard_normal(16), 3))
        blocked.start()
        blocked.join(timeout=0.3)
        assert blocked.is_alive()   # without the version it reads it, and waits for the connection
    blocked.join(timeout=5)
    assert not blocked.is_alive()
