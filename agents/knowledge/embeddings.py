"""Embeddings from an OpenAI-compatible `/v1/embeddings` endpoint: a llama-server started with
--embeddings (model.serve's embeddings mode) or vLLM serving an embedding model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import httpx
import numpy as np

from agents.knowledge.types import KnowledgeError


class Embedder(Protocol):
    def embed(self, texts: list[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class EmbeddingSettings:
    url: str
    model: str = "default"
    batch: int = 8
    max_chars: int = 800
    timeout_s: float = 600.0
    api_key: str | None = None


class EmbeddingClient:
    """Batches texts to the endpoint; each text is cut to `max_chars` so it fits one batch of the
    server (llama-server needs a whole input in one ubatch)."""

    def __init__(self, settings: EmbeddingSettings):
        self.settings = settings
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self.http = httpx.Client(timeout=settings.timeout_s, headers=headers)

    def embed(self, texts: list[str]) -> np.ndarray:
        rows = []
        step = self.settings.batch
        for start in range(0, len(texts), step):
            rows.extend(self._batch([t[:self.settings.max_chars] or " " for t in texts[start:start + step]]))
        return np.asarray(rows, dtype=np.float32)

    def _batch(self, texts: list[str]) -> list[list[float]]:
        url = f"{self.settings.url.rstrip('/')}/v1/embeddings"
        try:
            response = self.http.post(url, json={"model": self.settings.model, "input": texts})
        except httpx.HTTPError as exc:
            raise KnowledgeError(f"embeddings: {url}: {exc.__class__.__name__}: {exc}") from None
        if response.status_code != 200:
            raise KnowledgeError(f"embeddings: {url}: HTTP {response.status_code}: {response.text[:200]}")
        data = sorted(response.json()["data"], key=lambda item: item["index"])
        if len(data) != len(texts):
            raise KnowledgeError(f"embeddings: {url} answered {len(data)} embeddings for {len(texts)} inputs")
        return [item["embedding"] for item in data]

    def close(self) -> None:
        self.http.close()
