"""Invoke tasks for the agent multiplexer and the team runner."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from invoke import Collection, task
from rich.markup import escape
from rich.table import Table

from agents.config import BackendConfig, MuxConfig, load_config, load_keys, write_keys
from agents.knowledge.embeddings import EmbeddingClient
from agents.knowledge.ingest import Ingested, ingest_paths
from agents.knowledge.service import KnowledgeService
from agents.knowledge.setup import embedding_settings, knowledge_db, service_settings
from agents.knowledge.store import SqliteKnowledgeStore
from agents.knowledge.types import TEAM_SCOPE, Author
from agents.knowledge.vectors import VectorSettings
from agents.service import (
    DEFAULT_CONFIG,
    default_db_path,
    default_keys_path,
    ensure_port_free,
    serve_forever,
    start_background,
)
from agents.team import run_team
from dgxready.cli import out, user_errors
from dgxready.roles import ROLE_ORDER, load_roles
from dgxready.settings import load_settings
from model.running import running_model

FEATURE = ("Feature request: per-agent token budgets in the multiplexer, so that one agent "
           "cannot starve the others on the shared DGX Spark.")


def ensure_keys(path: Path, count: int) -> None:
    if not path.exists():
        keys = write_keys(path, count, ROLE_ORDER)
        out.print(f"wrote {len(keys.agents)} agent keys to {path} (mode 600)")


def any_backend_answers(config: MuxConfig) -> bool:
    for b in config.backends:
        try:
            if httpx.get(f"{b.url}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            continue
    return False


@contextlib.contextmanager
def backend_for(config: MuxConfig, parallel: int) -> Iterator[MuxConfig]:
    """The configured backends if one answers; otherwise start the default model for them."""
    if any_backend_answers(config):
        yield config
        return
    with running_model(parallel=parallel, ctx_per_slot=4096) as model:
        yield config.model_copy(update={"backends": [BackendConfig(
            name="local", url=model.base_url, kind="llamacpp", max_concurrency=parallel)]})


@task(help={"count": "number of agents (the seven roles, then extra developers and QA)",
            "output": "keys file to write (default: <state dir>/agent-keys.yaml)"})
@user_errors
def keys(c, count=10, output=None):
    """Create one API key per agent, mapped to its role; the file is written with mode 600."""
    path = Path(output) if output else default_keys_path()
    written = write_keys(path, int(count), ROLE_ORDER)
    for a in written.agents:
        out.print(f"{a.name:<22} {a.role}")
    out.print(f"keys in {path}")


@task(help={"config": "multiplexer YAML (default agents/multiplexer.yaml)",
            "port": "port to listen on (overrides the config)",
            "parallel": "slots for the backend started when none is reachable"})
@user_errors
def serve(c, config=None, port=None, parallel=10):
    """Run the OpenAI-compatible multiplexer in the foreground (Ctrl-C stops it)."""
    source = Path(config) if config else DEFAULT_CONFIG
    cfg = load_config(source)
    if port:
        cfg = cfg.model_copy(update={"port": int(port)})
    ensure_port_free(cfg, source)
    ensure_keys(cfg.keys_file or default_keys_path(), 10)
    with backend_for(cfg, int(parallel)) as live:
        backends = ", ".join(b.url for b in live.backends)
        out.print(f"multiplexer on http://{live.host}:{live.port}/v1 -> {backends}; "
                  f"keys: {live.keys_file or default_keys_path()}")
        serve_forever(live)


@task(help={"scenario": "the scenario to run (feature-cycle)",
            "agents": "number of agents, at least 7",
            "url": "a running multiplexer (default: start one, and a backend if needed)",
            "keys_file": "agent keys for --url (default: <state dir>/agent-keys.yaml)",
            "max_tokens": "output cap per agent turn",
            "output": "transcript JSON (default: <state dir>/runs/<timestamp>.json)"})
@user_errors
def run(c, scenario="feature-cycle", agents=10, url=None, keys_file=None, max_tokens=96, output=None):
    """Run the seven roles through a feature cycle, concurrently, through the multiplexer."""
    settings = load_settings()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out_path = Path(output) if output else settings.state_dir / "runs" / f"{stamp}.json"
    n = int(agents)
    if n < 7:
        raise SystemExit("error: --agents must be at least 7 (one per role)")
    if url:
        kpath = Path(keys_file) if keys_file else default_keys_path()
        team = list(load_keys(kpath, set(load_roles())).values())[:n]
        result = run_team(url, team, out_path, FEATURE, int(max_tokens), scenario)
    else:
        kpath = settings.state_dir / "runs" / "team-keys.yaml"
        team = write_keys(kpath, n, ROLE_ORDER).agents
        base = MuxConfig(port=0, backends=[BackendConfig(name="local", url="http://127.0.0.1:1")],
                         keys_file=kpath, state_db=settings.state_dir / "runs" / "team.db")
        with backend_for(base, n) as cfg:
            mux = start_background(cfg)
            try:
                result = run_team(mux.url, team, out_path, FEATURE, int(max_tokens), scenario)
            finally:
                mux.stop()
    table = Table(title=f"{scenario}: {n} agents, wall {result.wall_s:.1f} s, "
                        f"P95 latency {result.p95_latency_s:.2f} s")
    for col in ("stage", "agent", "latency s", "TTFT s", "tokens out", "tools", "cites", "error"):
        table.add_column(col)
    for r in result.records:
        outcomes = sorted(set(r.tool_calls.values()))
        tools = ", ".join(f"{o} {list(r.tool_calls.values()).count(o)}" for o in outcomes)
        table.add_row(str(r.stage), r.agent, f"{r.latency_s:.2f}", f"{r.ttft_s or 0:.2f}",
                      str(r.completion_tokens), tools, str(len(r.citations)), r.error or "")
    out.print(table)
    for r in result.records:
        for citation in r.citations:
            out.print(f"{r.agent} cites {escape(citation)}")
    for failure in result.failures:
        out.print(f"[red]hand-off failed[/]: {escape(str(failure))}")
    out.print(f"transcript: {out_path}")
    if not result.ok:
        raise SystemExit(1)


def embeddings_answer(url: str) -> bool:
    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def embeddings_for(config: MuxConfig, url: str | None, embed: bool) -> Iterator[EmbeddingClient | None]:
    """The embeddings server given or configured if it answers; otherwise the default model started
    in embeddings mode for the length of the task; none with --no-embed."""
    if not embed:
        yield None
        return
    url = url or config.knowledge.embeddings_url
    if url and embeddings_answer(url):
        yield EmbeddingClient(embedding_settings(config.knowledge, url))
        return
    with running_model(parallel=2, ctx_per_slot=1024, backend="llamacpp", embeddings=True) as model:
        yield EmbeddingClient(embedding_settings(config.knowledge, model.base_url))


@contextlib.contextmanager
def knowledge_service(config_path: str | None, db: str | None, embeddings_url: str | None,
                      embed: bool) -> Iterator[KnowledgeService]:
    cfg = load_config(Path(config_path) if config_path else DEFAULT_CONFIG)
    path = Path(db) if db else knowledge_db(cfg.knowledge, cfg.state_db or default_db_path())
    store = SqliteKnowledgeStore(path, VectorSettings(ann_threshold=cfg.knowledge.ann_threshold,
                                                      expansion_search=cfg.knowledge.ann_expansion_search,
                                                      index_dir=Path(f"{path}.ann")))
    try:
        with embeddings_for(cfg, embeddings_url, embed) as embedder:
            yield KnowledgeService(store, embedder, service_settings(cfg.knowledge))
    finally:
        store.close()


KNOWLEDGE_HELP = {"config": "multiplexer YAML whose knowledge settings apply (default agents/multiplexer.yaml)",
                  "db": "knowledge SQLite file (default: the config's knowledge.db, else beside the state db)",
                  "embeddings_url": "an OpenAI-compatible /v1/embeddings server (default: the config's "
                                    "knowledge.embeddings_url; else the default model is started for it)",
                  "embed": "compute embeddings (--no-embed: BM25 only, no embeddings server)"}


def print_ingested(n: int, total: int, item: Ingested) -> None:
    what = "triples" if item.kind == "ontology" else "chunks"
    state = f"version {item.version}" if item.changed else "unchanged"
    out.print(f"[{n}/{total}] {escape(item.source)}: {item.items} {what}, {state}, {item.seconds:.1f} s")


@task(help=KNOWLEDGE_HELP | {
    "path": "a file or folder (Markdown, text, JSON; Turtle .ttl into the ontology)",
    "scope": "team (every agent) or role:<name> (agents of that role)",
    "author": "the name recorded as the author"})
@user_errors
def kb_ingest(c, path, config=None, db=None, embeddings_url=None, embed=True, scope=TEAM_SCOPE,
              author="operator"):
    """Ingest documents into the shared knowledge store and Turtle into its ontology."""
    started = time.perf_counter()
    with knowledge_service(config, db, embeddings_url, embed) as service:
        done = ingest_paths(service, [Path(path)], Author(author, "operator"), scope, print_ingested)
        chunks = sum(d.items for d in done if d.kind == "document")
        out.print(f"{len(done)} files, {chunks} chunks in {time.perf_counter() - started:.1f} s; "
                  f"knowledge version {service.version()} in {service.store.path}")


@task(help=KNOWLEDGE_HELP | {"query": "the question", "limit": "results to show",
                             "role": "search as this role (its role-scoped documents too)"})
@user_errors
def kb_query(c, query, config=None, db=None, embeddings_url=None, embed=True, limit=5, role="developer"):
    """Hybrid search of the shared knowledge: BM25 and embeddings fused; each result cites its chunk."""
    with knowledge_service(config, db, embeddings_url, embed) as service:
        answer = service.search(query, int(limit), role)
    table = Table(title=f"{escape(query)} (version {answer.version}, {answer.vector_search})")
    for col in ("#", "citation", "BM25 rank", "vector rank", "text"):
        table.add_column(col)
    for n, hit in enumerate(answer.hits, start=1):
        table.add_row(str(n), escape(hit.citation), str(hit.text_rank or "-"), str(hit.vector_rank or "-"),
                      escape(" ".join(hit.chunk.text.split())[:160]))
    out.print(table)


@task(help={"file": "a SPARQL SELECT or ASK query (.rq)", "config": KNOWLEDGE_HELP["config"],
            "db": KNOWLEDGE_HELP["db"], "reasoning": "with RDFS + OWL 2 RL inferences (--no-reasoning: "
                                                    "asserted triples only)"})
@user_errors
def onto_query(c, file, config=None, db=None, reasoning=True):
    """Answer a SPARQL SELECT or ASK query over the team's ontology."""
    sparql = Path(file).read_text()
    with knowledge_service(config, db, None, False) as service:
        answer = service.onto_query(sparql, bool(reasoning))
    if answer.form == "ask":
        out.print(f"{answer.boolean} (version {answer.version})")
        return
    table = Table(title=f"{escape(file)}: {len(answer.rows)} rows (version {answer.version})")
    for var in answer.variables:
        table.add_column(var)
    for row in answer.rows:
        table.add_row(*(escape(v or "") for v in row))
    out.print(table)


ns = Collection("agents")
for t in (keys, serve, run, kb_ingest, kb_query, onto_query):
    ns.add_task(t)
