"""The knowledge store with real embeddings: the default model served by a second llama-server in
embeddings mode (model.serve --embeddings), the runbooks and README ingested, and questions
whose answering section is known."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import httpx
import pytest

from agents.config import KnowledgeConfig
from agents.knowledge.embeddings import EmbeddingClient, EmbeddingSettings
from agents.knowledge.service import KnowledgeService
from agents.knowledge.store import SqliteKnowledgeStore
from agents.knowledge.types import Author
from dgxready.ports import free_port
from dgxready.settings import REPO_ROOT, load_settings
from model.catalog import load_catalog
from model.serve import ServeRequest, serve, stop
from tests.agents_helpers import start_mux

pytestmark = pytest.mark.server

DOCUMENTS = tuple(sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "runbooks").glob("*.md")))
EMBEDDING_DIM = 576
ALERTS, SERVING, TROUBLE = "runbooks/alerts.md", "runbooks/serving.md", "runbooks/troubleshooting.md"


@dataclass(frozen=True)
class Question:
    """A question and the sections that answer it: (source, a part of the heading path)."""
    text: str
    answers: tuple[tuple[str, str], ...]


def q(text: str, *answers: tuple[str, str]) -> Question:
    return Question(text, answers)


QUESTIONS = (
    q("end-to-end latency at the 95th percentile is above six seconds, what do I check?",
      (ALERTS, "SloP95LatencyHigh"), (TROUBLE, "Latency over the SLO")),
    q("the time to first token is too slow for the agents", (ALERTS, "SloP95TtftHigh")),
    q("more than one percent of requests through the multiplexer fail", (ALERTS, "ErrorRateHigh")),
    q("the multiplexer took a backend out of rotation", (ALERTS, "BackendDown"), (TROUBLE, "A backend down")),
    q("an engine that model.serve recorded is no longer running", (ALERTS, "EngineProcessDown")),
    q("the multiplexer's health endpoint answers 503", (ALERTS, "MultiplexerUnhealthy")),
    q("requests have been waiting in the multiplexer queue for minutes", (ALERTS, "QueueBacklogSustained")),
    q("llama.cpp keeps requests deferred, waiting for a slot", (ALERTS, "EngineRequestsWaiting")),
    q("agents get HTTP 429 because the queue is full or they are rate limited", (ALERTS, "RequestsThrottled"),
      (TROUBLE, "429 storms"), (SERVING, "inference service")),
    q("the vLLM KV cache is almost full and requests get preempted", (ALERTS, "KvCacheNearlyFull")),
    q("the GPU runs too hot", (ALERTS, "GpuTemperatureHigh")),
    q("the GPU framebuffer memory is almost used up", (ALERTS, "GpuMemoryPressure")),
    q("the shared CPU and GPU memory pool of the DGX Spark is nearly exhausted",
      (ALERTS, "UnifiedMemoryPressure"), ("runbooks/dgx-spark.md", "Unified memory")),
    q("host memory is above 95 percent on a CPU host", (ALERTS, "HostMemoryPressure")),
    q("the kernel's out of memory killer killed a process", (ALERTS, "HostOomKill")),
    q("what does XID 79 mean on the GPU?", (ALERTS, "GpuXidError")),
    q("the disk holding the model store is almost full", (ALERTS, "ModelStoreDiskNearlyFull")),
    q("Prometheus cannot scrape the dgxready exporter", (ALERTS, "ExporterMissing")),
    q("llama-server answers 404 on /metrics when Prometheus scrapes it", (ALERTS, "ScrapeTargetDown")),
    q("model.serve says the port is already in use", (SERVING, "inference service")),
    q("the memory plan refuses: the model does not fit", (SERVING, "inference service")),
    q("how do I restore the state after a disaster?", ("runbooks/backup.md", "Restore after a disaster")),
    q("does prefix caching help repeated system prompts?", ("runbooks/performance.md", "Prefix caching")),
    q("how do I run two replicas behind one multiplexer on two Sparks?",
      ("runbooks/dgx-spark.md", "Two replicas behind one multiplexer")),
    q("an agent's tool call was denied by its role", (TROUBLE, "Denied tools")),
)
UNRELATED_SOURCE = "unrelated/cooking.md"
UNRELATED = """# Bread
Mix flour, water, salt and yeast; knead ten minutes and let the dough rise for an hour.
# Soup
Simmer onions, carrots and celery in stock; season with salt and pepper before serving.
# Garden
Water the tomatoes in the morning and tie the stems to stakes as they grow.
"""


@contextlib.contextmanager
def embedding_server(tmp_path_factory, session_store):
    mp = pytest.MonkeyPatch()
    mp.setenv("DGXREADY_MODEL_STORE", str(session_store))
    mp.setenv("DGXREADY_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    settings = load_settings()
    state = serve(ServeRequest(model=load_catalog().default, backend="llamacpp", port=free_port(),
                               parallel=2, ctx_per_slot=1024, embeddings=True), settings)
    try:
        yield state
    finally:
        stop(port=state.port, settings=settings)
        mp.undo()


@pytest.fixture(scope="module")
def embeddings_url(tmp_path_factory, session_store, llama_build):
    with embedding_server(tmp_path_factory, session_store) as state:
        yield state.base_url


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, embeddings_url):
    db = tmp_path_factory.mktemp("knowledge") / "knowledge.db"
    service = KnowledgeService(SqliteKnowledgeStore(db), EmbeddingClient(EmbeddingSettings(embeddings_url)))
    author = Author("tester", "platform-engineer")
    for source in DOCUMENTS:
        service.add_file(REPO_ROOT / source, author, source=source)
    service.add_text(UNRELATED, UNRELATED_SOURCE, author)
    return service


def rank_of_answer(service: KnowledgeService, question: Question) -> int | None:
    hits = service.search(question.text, limit=10).hits
    for rank, hit in enumerate(hits, start=1):
        if any(hit.chunk.source == source and section in hit.chunk.heading
               for source, section in question.answers):
            return rank
    return None


def test_the_embeddings_server_answers_with_the_default_models_width(embeddings_url):
    vectors = EmbeddingClient(EmbeddingSettings(embeddings_url)).embed(["backend down", "gpu hot"])
    assert vectors.shape == (2, EMBEDDING_DIM)


def test_hybrid_search_ranks_the_answering_section_above_unrelated_ones(ingested):
    """Measured on the 2-core VM: first for 23 of 25, in the top 3 for 24 (BM25 alone: 22 and 24;
    the default model's embeddings alone: 2 and 2)."""
    assert len(QUESTIONS) >= 20
    ranks = {q.text: rank_of_answer(ingested, q) for q in QUESTIONS}
    in_top3 = sum(1 for r in ranks.values() if r is not None and r <= 3)
    first = sum(1 for r in ranks.values() if r == 1)
    assert in_top3 >= 23 and first >= 20, f"top 3: {in_top3}, first: {first} of {len(QUESTIONS)}: {ranks}"
    for q in QUESTIONS:
        sources = [h.chunk.source for h in ingested.search(q.text, limit=10).hits]
        answer = ranks[q.text] or len(sources) + 1
        assert UNRELATED_SOURCE not in sources[:answer], f"an unrelated chunk outranks the answer: {q.text}"


def test_every_hit_cites_its_document_chunk_and_version(ingested):
    answer = ingested.search("what does XID 79 mean on the GPU?", limit=3)
    top = answer.hits[0]
    assert answer.vector_search == "hybrid" and any(h.vector_rank is not None for h in answer.hits)
    assert top.citation == (f"runbooks/alerts.md#{top.chunk.heading} (document {top.chunk.document}, "
                            f"chunk {top.chunk.chunk}, version {top.chunk.version})")


def test_agents_search_through_the_multiplexer_and_a_role_without_kb_add_is_denied(tmp_path, served,
                                                                                   embeddings_url):
    knowledge = KnowledgeConfig(embeddings_url=embeddings_url)
    mux = start_mux(tmp_path, [("local", served.base_url, 2)], knowledge=knowledge)
    try:
        def call(role: str, tool: str, args: dict) -> httpx.Response:
            return httpx.post(f"{mux.url}/v1/tools/call", headers=mux.headers(mux.key(role)), timeout=120,
                              json={"tool": tool, "args": args})

        text = (REPO_ROOT / "runbooks/alerts.md").read_text()
        added = call("platform-engineer", "kb.add", {"source": "runbooks/alerts.md", "text": text})
        assert added.status_code == 200, added.text
        denied = call("developer", "kb.add", {"source": "mine.md", "text": "# mine\nnot allowed"})
        assert denied.status_code == 403 and "may not call kb.add" in denied.json()["error"]
        for expected_cached in (False, True):
            found = call("developer", "kb.search", {"query": "what does XID 79 mean?", "limit": 3}).json()
            assert found["ok"] and found["result"]["cached"] is expected_cached
            top = found["result"]["results"][0]
            assert top["heading"].endswith("GpuXidError") and "version 1)" in top["citation"]
        metrics = httpx.get(f"{mux.url}/metrics").text
        assert 'dgxready_mux_knowledge_cache_total{event="hit"} 1.0' in metrics
        assert 'outcome="denied",tool="kb.add"' in metrics
    finally:
        mux.mux.stop()
