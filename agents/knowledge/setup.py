"""The knowledge service as the multiplexer's configuration describes it."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from agents.config import KnowledgeConfig
from agents.knowledge.chunking import ChunkLimits
from agents.knowledge.embeddings import EmbeddingClient, EmbeddingSettings
from agents.knowledge.ontology import OntologyLimits
from agents.knowledge.service import KnowledgeService, ServiceSettings
from agents.knowledge.store import SqliteKnowledgeStore
from agents.knowledge.vectors import VectorSettings


def knowledge_db(config: KnowledgeConfig, state_db: Path) -> Path:
    return config.db or state_db.with_name("knowledge.db")


def service_settings(config: KnowledgeConfig) -> ServiceSettings:
    return ServiceSettings(chunking=ChunkLimits(max_chars=config.max_chunk_chars,
                                                max_document_bytes=config.max_document_bytes),
                           ontology=OntologyLimits(max_turtle_bytes=config.max_turtle_bytes),
                           cache_entries=config.cache_entries, rrf_k=config.rrf_k,
                           vector_weight=config.vector_weight)


def embedding_settings(config: KnowledgeConfig, url: str) -> EmbeddingSettings:
    return EmbeddingSettings(url, config.embeddings_model, max_chars=config.embed_max_chars)


def open_knowledge(config: KnowledgeConfig, state_db: Path,
                   on_cache_event: Callable[[str, int], None] | None = None) -> KnowledgeService | None:
    """None when the configuration turns the store off."""
    if not config.enabled:
        return None
    path = knowledge_db(config, state_db)
    store = SqliteKnowledgeStore(path, VectorSettings(ann_threshold=config.ann_threshold,
                                                      expansion_search=config.ann_expansion_search,
                                                      index_dir=Path(f"{path}.ann")))
    embedder = EmbeddingClient(embedding_settings(config, config.embeddings_url)) \
        if config.embeddings_url else None
    return KnowledgeService(store, embedder, service_settings(config), on_cache_event)
