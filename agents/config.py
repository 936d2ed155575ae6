"""Multiplexer configuration (agents/multiplexer.yaml or --config), validated at load, and
the agent keys file that maps each API key to an agent and its role."""
from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from agents.sandbox import DEFAULT_SHELL_ALLOWLIST, check_pattern, refuse_bare_program
from dgxready.config import load_yaml
from dgxready.errors import ConfigError
from dgxready.files import atomic_write_text


class BackendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,40}$")
    url: str = Field(pattern=r"^https?://")
    kind: Literal["llamacpp", "vllm", "openai"] = "llamacpp"
    max_concurrency: int = Field(4, ge=1, le=1024, description="llama-server -np / vLLM max_num_seqs")
    model: str | None = Field(None, description="model id to send (default: the first in /v1/models)")
    api_key_file: Path | None = Field(None, description="file holding the backend's API key (llama-server "
                                                        "--api-key-file, vLLM --api-key)")

    def api_key(self) -> str | None:
        if self.api_key_file is None:
            return None
        try:
            return self.api_key_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"backends.{self.name}.api_key_file: {exc.strerror}: "
                              f"{self.api_key_file}") from None


# What the multiplexer holds of one backend answer (agents.proxy): far above a role's longest answer,
# logprobs included, and a bound on what a runaway backend can make it hold.
MAX_ANSWER_BYTES = 64 << 20

ShellPattern = Annotated[list[str], BeforeValidator(refuse_bare_program), AfterValidator(check_pattern)]


class KnowledgeConfig(BaseModel):
    """The shared knowledge store (agents.knowledge) behind kb.search, kb.add, onto.query, onto.assert."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = Field(True, description="serve the knowledge tools (off: they answer that no store exists)")
    db: Path | None = Field(None, description="SQLite file of the store (default: knowledge.db beside "
                                              "state_db)")
    embeddings_url: str | None = Field(None, pattern=r"^https?://", description="an OpenAI-compatible "
                                       "/v1/embeddings server (model.serve --embeddings); without one, "
                                       "search is BM25 only")
    embeddings_model: str = Field("default", description="model name sent to the embeddings server")
    ann_threshold: int = Field(200_000, ge=1, description="live chunks from which an HNSW index (usearch) "
                                                          "replaces exact search")
    ann_expansion_search: int = Field(256, ge=8, le=4096, description="HNSW search breadth (recall vs time)")
    max_document_bytes: int = Field(2 << 20, ge=1024, description="larger documents are refused")
    max_chunk_chars: int = Field(1500, ge=200, le=20000, description="longest chunk; longer sections are cut")
    max_turtle_bytes: int = Field(256 * 1024, ge=1024, description="larger onto.assert payloads are refused")
    cache_entries: int = Field(1024, ge=0, description="answers kept per process, keyed by knowledge version")
    rrf_k: int = Field(5, ge=1, le=1000, description="reciprocal rank fusion's k: the lower, the more the top "
                       "ranks weigh")
    vector_weight: float = Field(0.2, ge=0, le=10, description="weight of the vector ranking against BM25's "
                                 "(1.0); 0.2 suits the default chat model's weak embeddings, a real "
                                 "embedding model earns 1.0")
    embed_max_chars: int = Field(800, ge=100, le=20000, description="characters of a chunk (heading first) "
                                 "that are embedded; BM25 indexes all of it")


class MuxConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(8090, ge=0, le=65535)
    backends: list[BackendConfig] = Field(min_length=1)
    queue_max: int = Field(256, ge=1, description="queued requests beyond which new ones get 429")
    queue_per_agent_max: int | None = Field(None, ge=1, description="queued requests of one agent beyond "
                                            "which its new ones get 429 (default: max(4, queue_max // 4))")
    client_tools_policy: Literal["drop", "refuse"] = Field(
        "drop", description="a client-declared tool its role's client_tools do not allow: dropped from "
                            "the request (named in x-dgxready-dropped-tools), or the request refused (400)")
    deadline_s: float = Field(300.0, gt=0, description="default time a request may wait and run")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="a request body beyond which the client "
                                "gets 413")
    max_answer_bytes: int = Field(MAX_ANSWER_BYTES, ge=64 * 1024, description="what the multiplexer holds "
                                  "of one backend answer, a whole answer or a session's streamed one; "
                                  "beyond it the backend has failed the turn (so a runaway backend cannot "
                                  "exhaust the multiplexer's memory)")
    keep_alive_s: float = Field(75.0, gt=0, le=3600, description="how long an idle client connection is "
                                "kept open; longer than clients keep theirs (httpx, the OpenAI SDK's, 5 s; "
                                "aiohttp 15 s), so that a client never reuses one the multiplexer is closing")
    history_turns: int = Field(8, ge=0, description="earlier turns of a session sent to the model")
    session_max_turns: int = Field(100, ge=1, description="turns a session keeps; the oldest are pruned")
    session_max_bytes: int = Field(1 << 20, ge=1024, description="bytes of messages a session keeps "
                                                                 "(its newest turn always)")
    session_commit_ms: float = Field(0.0, ge=0, le=1000, description="turns answered within this many "
                                     "milliseconds share one write to the turn journal (<state_db>-turns); a "
                                     "crash loses at most the turns of this window (0: the turns that end in "
                                     "one pass of the event loop share a write made before it waits again)")
    session_apply_ms: float = Field(250.0, gt=0, le=10_000, description="journaled turns move into the "
                                    "state file's tables, in one transaction, this many milliseconds after "
                                    "the first of them was journaled (every read of the tables moves them "
                                    "first; a restart applies what a crash left in the journal)")
    retention_days: float = Field(30.0, gt=0, description="audit rows, task-board items and sessions "
                                                          "idle longer are pruned")
    health_interval_s: float = Field(2.0, gt=0)
    cooldown_s: float = Field(10.0, gt=0)
    rate_limits: bool = Field(True, description="enforce each role's requests_per_minute")
    state_db: Path | None = Field(None, description="SQLite file for sessions and tools")
    keys_file: Path | None = None
    shell_allowlist: list[ShellPattern] = Field(
        default_factory=lambda: [list(p) for p in DEFAULT_SHELL_ALLOWLIST],
        description="argv patterns shell.run may run (pattern language: agents/sandbox.py)")
    shell_timeout_s: float = Field(5.0, gt=0, le=300, description="wall time of one shell.run")
    shell_output_bytes: int = Field(64 * 1024, ge=1024, le=16 << 20, description="stdout and stderr "
                                    "of one shell.run together, beyond which it is stopped")
    idempotency_window_s: float = Field(60.0, ge=0, description="a call repeated this soon without an "
                                                                "Idempotency-Key is a retry, applied once")
    idempotency_retention_s: float = Field(86400.0, gt=0, description="how long an Idempotency-Key "
                                                                      "is remembered")
    knowledge: KnowledgeConfig = Field(default_factory=KnowledgeConfig)

    @model_validator(mode="after")
    def sessions_keep_the_history_sent(self) -> MuxConfig:
        if self.session_max_turns < self.history_turns:
            raise ValueError(f"session_max_turns ({self.session_max_turns}) is below history_turns "
                             f"({self.history_turns}): a session would not keep the turns it sends")
        return self

    @model_validator(mode="after")
    def idempotency_records_outlive_the_window(self) -> MuxConfig:
        if self.idempotency_retention_s < self.idempotency_window_s:
            raise ValueError(f"idempotency_retention_s ({self.idempotency_retention_s:g}) is below "
                             f"idempotency_window_s ({self.idempotency_window_s:g})")
        return self


class AgentIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")
    role: str
    key: str = Field(min_length=16)


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    agents: list[AgentIdentity]


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_config(path: Path) -> MuxConfig:
    return load_yaml(path, MuxConfig)


def load_keys(path: Path, roles: set[str]) -> dict[str, AgentIdentity]:
    """API key digest -> identity. Keys are compared by digest, never logged."""
    keys = load_yaml(path, KeysFile)
    out: dict[str, AgentIdentity] = {}
    for i, ident in enumerate(keys.agents):
        if ident.role not in roles:
            raise ConfigError(f"{path.name}: agents[{i}].role: unknown role {ident.role!r}")
        digest = key_digest(ident.key)
        if digest in out:
            raise ConfigError(f"{path.name}: agents[{i}].key: duplicate key")
        out[digest] = ident
    return out


def team_roles(count: int, role_order: tuple[str, ...]) -> list[str]:
    """The seven roles, then extra developers and QA specialists, alternating, up to `count`."""
    roles = list(role_order[:count])
    extra = ("developer", "qa-specialist")
    while len(roles) < count:
        roles.append(extra[(len(roles) - len(role_order)) % 2])
    return roles


def write_keys(path: Path, count: int, role_order: tuple[str, ...]) -> KeysFile:
    seen: dict[str, int] = {}
    agents = []
    for role in team_roles(count, role_order):
        seen[role] = seen.get(role, 0) + 1
        agents.append(AgentIdentity(name=f"{role}-{seen[role]}", role=role,
                                    key=f"dgx-{secrets.token_urlsafe(24)}"))
    keys = KeysFile(agents=agents)
    atomic_write_text(path, yaml.safe_dump(keys.model_dump(mode="json"), sort_keys=False))
    os.chmod(path, 0o600)
    return keys
