"""`invoke repro.env`: one JSON document that says what this machine runs, so that two runs can be
told apart by more than their results. Built on bench/environment.py: `toolkit` is the very capture
every baseline holds; the other parts add what a reproduction needs besides (see the model).
`diff_documents` lists what differs between two captures, by nested path, leaving out what moves
on its own between two captures of one machine (the time, free memory, GPU temperature)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from rich.console import Console

from bench.environment import (
    Environment,
    LlamaCppFacts,
    ModelFileChecksum,
    NvmlFacts,
    VllmFacts,
    capture_environment,
    installed_packages,
    llama_cpp_facts,
    lock_sha256,
    model_checksums,
    nvml_facts,
    redacted_env,
    vllm_facts,
)
from bench.hw import GpuReport, HostFacts, gpu_reports, host_facts
from bench.report import now_stamp
from dgxready.errors import DgxReadyError
from dgxready.progress import make_console
from dgxready.settings import Settings, load_settings
from repro.documents import Doc, DocumentKind

SCHEMA_ID = "dgxready-repro-environment/1"
# Paths (dot-joined, list items as [*]) that differ between two captures of one unchanged machine.
VOLATILE_PATHS = ("created_at", "host.memory_available_bytes", "gpus[*].memory_free_bytes",
                  "gpus[*].temperature_c")


class PythonFacts(Doc):
    version: str
    implementation: str
    executable: str
    lock_sha256: str | None = Field(description="sha256 of uv.lock; None outside a checkout")
    packages: dict[str, str] = Field(description="every installed distribution: name -> version")


class Engines(Doc):
    vllm: VllmFacts
    llama_cpp: LlamaCppFacts


class EnvironmentDoc(Doc):
    schema_id: str = Field(SCHEMA_ID, alias="schema")
    created_at: str
    host: HostFacts = Field(description="OS, kernel, architecture, CPU, memory, DGX OS release")
    python: PythonFacts
    nvml: NvmlFacts
    gpus: list[GpuReport] = Field(description="empty where NVML finds no GPU")
    engines: Engines
    models: list[ModelFileChecksum] = Field(description="the catalog's files and their sha256")
    env: dict[str, str] = Field(description="CUDA_, NCCL_, OMP_, VLLM_, HF_ variables; "
                                            "credential-like names redacted")
    toolkit: Environment = Field(description="bench.environment's capture, as in every baseline")


ENVIRONMENT = DocumentKind(EnvironmentDoc, SCHEMA_ID, "environment-v1.schema.json")


def python_facts() -> PythonFacts:
    return PythonFacts(version=platform.python_version(), implementation=platform.python_implementation(),
                       executable=sys.executable, lock_sha256=lock_sha256(), packages=installed_packages())


def capture_document(settings: Settings | None = None) -> EnvironmentDoc:
    settings = settings or load_settings()
    return EnvironmentDoc(
        created_at=now_stamp(), host=host_facts(), python=python_facts(), nvml=nvml_facts(),
        gpus=gpu_reports(),
        engines=Engines(vllm=vllm_facts(settings.serve.vllm_image), llama_cpp=llama_cpp_facts(settings)),
        models=model_checksums(settings), env=redacted_env(dict(os.environ)), toolkit=capture_environment())


def write_environment(path: Path, settings: Settings | None = None) -> EnvironmentDoc:
    doc = capture_document(settings)
    ENVIRONMENT.write(doc, path)
    return doc


@dataclass(frozen=True)
class Difference:
    path: str
    before: object
    after: object

    def __str__(self) -> str:
        return f"{self.path}: {_shown(self.before)} -> {_shown(self.after)}"


MISSING = object()


def _shown(value: object) -> str:
    return "(absent)" if value is MISSING else repr(value)


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    """Leaves by path: `a.b`, `a.list[0].c`. An empty dict or list has no leaves, so that
    `env: {}` against `env: {"HF_HOME": ...}` differs by `env.HF_HOME` alone."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items()
                for k, v in flatten(item, f"{prefix}.{key}" if prefix else str(key)).items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flatten(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


def _pattern(path: str) -> str:
    return "".join(f"[*]{part.split(']', 1)[1]}" if "]" in part else part for part in path.split("["))


def volatile(path: str) -> bool:
    return _pattern(path) in VOLATILE_PATHS


def diff_documents(before: dict, after: dict) -> list[Difference]:
    a, b = flatten(before), flatten(after)
    return [Difference(path, a.get(path, MISSING), b.get(path, MISSING))
            for path in sorted(a.keys() | b.keys())
            if not volatile(path) and a.get(path, MISSING) != b.get(path, MISSING)]


def diff_files(before: Path, after: Path) -> list[Difference]:
    """Both files are checked against the schema first; an error names the file and the field."""
    return diff_documents(ENVIRONMENT.dump(ENVIRONMENT.load(before)), ENVIRONMENT.dump(ENVIRONMENT.load(after)))


def print_differences(differences: list[Difference], before: Path, after: Path, out: Console) -> int:
    """0 when the captures agree (volatile fields aside), 1 when they differ."""
    if not differences:
        out.print(f"{before} and {after}: no differences (ignoring {', '.join(VOLATILE_PATHS)})")
        return 0
    out.print(f"{len(differences)} difference(s), {before} -> {after}:")
    for d in differences:
        out.print(f"  {d}", markup=False, highlight=False)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Capture this machine's environment as JSON, or diff two.")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (default: stdout)")
    parser.add_argument("--diff", nargs=2, type=Path, metavar=("A", "B"),
                        help="print what differs between two captures; exit 0 same, 1 different")
    args = parser.parse_args(argv)
    out = make_console()
    try:
        if args.diff:
            return print_differences(diff_files(*args.diff), *args.diff, out)
        emit(capture_document(), args.out, out)
    except DgxReadyError as exc:
        out.print(f"[red]error:[/] {exc}")
        return 2
    return 0


def emit(doc: EnvironmentDoc, path: Path | None, out: Console) -> None:
    if path is None:
        sys.stdout.write(json.dumps(ENVIRONMENT.dump(doc), indent=2) + "\n")
        return
    ENVIRONMENT.write(doc, path)
    out.print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
