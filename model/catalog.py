"""The model catalog (model/models.yaml), validated at load."""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dgxready.config import load_yaml
from dgxready.errors import DgxReadyError

CATALOG_PATH = Path(__file__).with_name("models.yaml")
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
Engine = Literal["vllm", "llamacpp"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileSpec(Strict):
    name: str = Field(description="path of the file in the source repo, and in the store")
    size: int | None = Field(None, gt=0, description="exact bytes, checked on pull")
    approx_size: int | None = Field(None, gt=0, description="for planning where no exact size is published")
    sha256: str
    path_in_wheel: str | None = None

    @model_validator(mode="after")
    def _one_size(self) -> FileSpec:
        if (self.size is None) == (self.approx_size is None):
            raise ValueError("give exactly one of size and approx_size")
        return self

    @property
    def planning_size(self) -> int:
        return self.size or self.approx_size or 0

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, v: str) -> str:
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise ValueError("not a 64-hex digest")
        return v

    @field_validator("name")
    @classmethod
    def _relative_path(cls, v: str) -> str:
        p = PurePosixPath(v)
        if not v or p.is_absolute() or ".." in p.parts or "\\" in v or "\0" in v:
            raise ValueError("must be a relative path without '..'")
        return v


class WheelSource(Strict):
    kind: Literal["pypi-wheel"]
    package: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(pattern=r"^[0-9][A-Za-z0-9.+!-]*$")


class HuggingFaceSource(Strict):
    kind: Literal["huggingface"]
    repo: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
    revision: str = Field(pattern=r"^[0-9a-f]{40}$", description="a pinned commit sha")


Source = Annotated[WheelSource | HuggingFaceSource, Field(discriminator="kind")]


class ModelFormat(Strict):
    engine: Engine
    quantization: str | None = Field(None, description="e.g. Q4_1, Q4_K_M, fp8, awq")
    source: Source | None = Field(None, description="absent for formats made locally")
    files: list[FileSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _wheel_members(self) -> ModelFormat:
        if isinstance(self.source, WheelSource):
            for f in self.files:
                if not f.path_in_wheel:
                    raise ValueError(f"file {f.name!r} from a wheel needs path_in_wheel")
        return self

    @property
    def weight_bytes(self) -> int:
        weights = [f for f in self.files if f.name.endswith((".gguf", ".safetensors"))]
        return sum(f.planning_size for f in weights or self.files)

    @property
    def entry_file(self) -> FileSpec:
        """The file an engine is pointed at: the GGUF for llama.cpp."""
        ggufs = [f for f in self.files if f.name.endswith(".gguf")]
        return ggufs[0] if ggufs else self.files[0]


class Architecture(Strict):
    params: int = Field(gt=0, description="parameter count")
    layers: int = Field(gt=0)
    attention_heads: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    context_length: int = Field(gt=0)


class ModelEntry(Strict):
    description: str
    license: str
    purpose: Literal["chat", "embedding"] = Field("chat", description="an embedding model is served only "
                                                  "with --embeddings, for /v1/embeddings")
    architecture: Architecture
    formats: dict[Annotated[str, Field(pattern=NAME_PATTERN)], ModelFormat] = Field(min_length=1)

    def formats_for(self, engine: str) -> list[str]:
        return [k for k, f in self.formats.items() if f.engine == engine]


class Catalog(Strict):
    default: str
    models: dict[Annotated[str, Field(pattern=NAME_PATTERN)], ModelEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _default_exists(self) -> Catalog:
        if self.default not in self.models:
            raise ValueError(f"default {self.default!r} is not a model in this catalog")
        return self

    def model(self, name: str) -> ModelEntry:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models))
            raise DgxReadyError(f"unknown model {name!r}; the catalog has: {known}") from None

    def format(self, name: str, fmt: str) -> ModelFormat:
        entry = self.model(name)
        try:
            return entry.formats[fmt]
        except KeyError:
            known = ", ".join(entry.formats)
            raise DgxReadyError(f"model {name!r} has no format {fmt!r}; it has: {known}") from None


def load_catalog(path: Path = CATALOG_PATH) -> Catalog:
    return load_yaml(path, Catalog)
