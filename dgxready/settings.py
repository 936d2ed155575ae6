from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from dgxready.config import load_yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
BASELINES_DIR = REPO_ROOT / "bench" / "baselines"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_PYTHON_SDIST_SHA256 = {
    "0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
}


def _xdg(var: str, fallback: str) -> Path:
    return Path(os.environ.get(var) or Path.home() / fallback)


class LlamaCppSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    python_sdist_version: str = Field(
        LLAMA_CPP_PYTHON_VERSION, description="llama-cpp-python sdist whose vendored llama.cpp is built"
    )
    cuda: str = Field("auto", pattern="^(auto|on|off)$", description="build with CUDA")
    cuda_architectures: str | None = Field(None, description="CMAKE_CUDA_ARCHITECTURES override")
    jobs: int | None = Field(None, ge=1, description="parallel build jobs (default: CPU count)")


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    parallel: int = Field(4, ge=1, le=256)
    ctx_per_slot: int = Field(4096, ge=256)
    startup_timeout_s: float = Field(120.0, gt=0)
    vllm_image: str = "nvcr.io/nvidia/vllm:25.10-py3"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cache_dir: Path = Field(default_factory=lambda: _xdg("XDG_CACHE_HOME", ".cache") / "dgxready")
    model_store: Path | None = None
    state_dir: Path = Field(
        default_factory=lambda: _xdg("XDG_STATE_HOME", ".local/state") / "dgxready"
    )
    llamacpp: LlamaCppSettings = LlamaCppSettings()
    serve: ServeSettings = ServeSettings()

    @property
    def models_dir(self) -> Path:
        return self.model_store or self.cache_dir / "models"

    @property
    def downloads_dir(self) -> Path:
        return self.cache_dir / "downloads"


ENV_OVERRIDES = {
    "DGXREADY_CACHE_DIR": "cache_dir",
    "DGXREADY_MODEL_STORE": "model_store",
    "DGXREADY_STATE_DIR": "state_dir",
}


def config_path() -> Path | None:
    explicit = os.environ.get("DGXREADY_CONFIG")
    if explicit:
        return Path(explicit)
    local = REPO_ROOT / "dgxready.yaml"
    return local if local.exists() else None


def load_settings() -> Settings:
    """Defaults in code, overridden by dgxready.yaml (or $DGXREADY_CONFIG), then by env vars."""
    path = config_path()
    settings = load_yaml(path, Settings) if path else Settings()
    updates = {field: Path(os.environ[var]) for var, field in ENV_OVERRIDES.items() if os.environ.get(var)}
    return settings.model_copy(update=updates) if updates else settings


