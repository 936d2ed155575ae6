"""The model's files, pulled and verified on the controller, shipped, re-hashed on the host."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.catalog import ModelFormat
from model.plan import KvShape
from provision.core import Changes, Host, Step, changes, q
from provision.facts import Sha256s
from provision.steps.base import upload_file


@dataclass(frozen=True)
class ModelFile:
    local: Path
    rel: str
    sha256: str


@dataclass(frozen=True)
class ModelFiles:
    """One format of one model, as the controller's store holds it; `entry` is what the engine
    is pointed at (the GGUF, or the directory of a vLLM format)."""
    model: str
    fmt: str
    files: tuple[ModelFile, ...]
    spec: ModelFormat
    shape: KvShape

    @property
    def entry_rel(self) -> str:
        return self.spec.entry_file.name

    def remote_dir(self, prefix: str) -> str:
        return f"{prefix}/models/{self.model}/{self.fmt}"


@dataclass(frozen=True)
class ShipModelFiles:
    files: tuple[ModelFile, ...]

    def describe(self) -> str:
        names = ", ".join(f"{f.rel} (sha256 {f.sha256[:12]}…)" for f in self.files)
        return f"ship {names}"


class ModelStep(Step):
    name = "model"

    def __init__(self, formats: dict[str, ModelFiles]):
        self.formats = formats

    def files_for(self, host: Host) -> ModelFiles:
        return self.formats[host_engine(host, self.formats)]

    def check(self, host: Host) -> Changes:
        fmt = self.files_for(host)
        base = fmt.remote_dir(host.vars.prefix)
        found = host.fact(Sha256s(tuple(f"{base}/{f.rel}" for f in fmt.files)))
        stale = tuple(f for f in fmt.files if found.get(f"{base}/{f.rel}") != f.sha256)
        return changes(ShipModelFiles(stale) if stale else None)

    def apply(self, host: Host, todo: Changes) -> str:
        base = self.files_for(host).remote_dir(host.vars.prefix)
        for ship in todo.of(ShipModelFiles):
            for f in ship.files:
                upload_file(host, f.local, f"{base}/{f.rel}", sha256=f.sha256)
        return "verified on the host"

    def undo(self, host: Host) -> str | None:
        base = self.files_for(host).remote_dir(host.vars.prefix)
        host.sh(f"rm -rf {q(base)}")
        return f"removed {base}"


def host_engine(host: Host, available: dict[str, ModelFiles]) -> str:
    """vLLM on NVIDIA profiles when the model has a vLLM format, llama-server otherwise."""
    if host.vars.profile != "cpu-only" and "vllm" in available:
        return "vllm"
    return "llamacpp"
