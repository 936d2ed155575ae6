"""Environment capture, after PyTorch's and vLLM's collect_env: versions, compilers, the
llama.cpp build, relevant env vars (never secrets), nvidia-smi where present."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pynvml

import dgxready
from dgxready.files import sha256_file
from dgxready.settings import REPO_ROOT, Settings, load_settings
from model.catalog import load_catalog
from model.llamacpp_build import load_build
from model.store import FileState, ModelStore

ENV_PREFIXES = ("TORCH", "NCCL", "CUDA", "CUBLAS", "CUDNN", "OMP_", "MKL_", "NVIDIA", "VLLM",
                "LLAMA", "GGML", "DGXREADY", "HF_HUB_OFFLINE")
SECRET_WORDS = ("secret", "token", "api", "access", "password", "key", "auth")
PACKAGES = ("numpy", "httpx", "invoke", "fabric", "nvidia-ml-py", "huggingface-hub", "openai",
            "matplotlib", "pydantic", "torch", "vllm", "cupy")


@dataclass(frozen=True)
class Environment:
    kit_version: str
    git_sha: str | None
    python: str
    platform: str
    libc: str
    packages: dict[str, str]
    compilers: dict[str, str]
    llama_cpp_build: str | None
    llama_cpp_commit: str | None
    env: dict[str, str] = field(default_factory=dict)
    nvidia_smi: str | None = None


def _first_line(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None


def git_sha(root: Path = REPO_ROOT) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def safe_env(environ: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(environ.items())
            if k.startswith(ENV_PREFIXES) and not any(w in k.lower() for w in SECRET_WORDS)}


def capture_environment() -> Environment:
    """Call it after the llama.cpp build a run uses, or the build is recorded as missing."""
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    build = load_build(load_settings())
    smi = None
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        smi = out.stdout.strip() or out.stderr.strip()
    return Environment(
        kit_version=dgxready.__version__, git_sha=git_sha(), python=platform.python_version(),
        platform=platform.platform(), libc=" ".join(platform.libc_ver()), packages=packages,
        compilers={k: v for k, v in {"gcc": _first_line(["gcc", "--version"]),
                                     "cmake": _first_line(["cmake", "--version"]),
                                     "nvcc": _first_line(["nvcc", "--version"])}.items() if v},
        llama_cpp_build=build.spec.key if build else None,
        llama_cpp_commit=build.llama_cpp_commit if build else None,
        env=safe_env(dict(os.environ)), nvidia_smi=smi,
    )


# The fuller capture behind `invoke repro.env` (repro/environment.py): the same sources as above,
# and what a reproduction needs besides: every installed distribution, the lock file's hash,
# NVML, the engines and the models' checksums. Variables with these prefixes are kept with their
# names, their values redacted where the name looks like a credential.
REPRO_ENV_PREFIXES = ("CUDA_", "NCCL_", "OMP_", "VLLM_", "HF_")
REDACTED_WORDS = ("token", "secret", "password", "key", "auth")
REDACTED = "<redacted>"
LOCK_FILE = REPO_ROOT / "uv.lock"


def redacted_env(environ: dict[str, str], prefixes: tuple[str, ...] = REPRO_ENV_PREFIXES) -> dict[str, str]:
    """The variables with `prefixes`; a value whose name holds token, secret, password, key or auth
    (any case) is replaced by REDACTED, so the record says it was set without saying what to."""
    return {k: REDACTED if any(w in k.lower() for w in REDACTED_WORDS) else v
            for k, v in sorted(environ.items()) if k.startswith(prefixes)}


def installed_packages() -> dict[str, str]:
    """Every distribution importable from this interpreter, by normalized name."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[name.lower().replace("_", "-")] = dist.version
    return dict(sorted(found.items()))


def lock_sha256(path: Path = LOCK_FILE) -> str | None:
    return sha256_file(path) if path.is_file() else None


@dataclass(frozen=True)
class NvmlFacts:
    """What NVML says about the driver; `available` False with the reason where it cannot start
    (no driver, no library): a host without a GPU records that, not an error."""
    available: bool
    detail: str
    nvml_version: str | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None


def _decoded(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_facts(nv=pynvml) -> NvmlFacts:
    try:
        nv.nvmlInit()
    except nv.NVMLError as exc:
        return NvmlFacts(False, f"NVML did not start: {exc}")
    try:
        cuda = nv.nvmlSystemGetCudaDriverVersion()
        return NvmlFacts(True, f"{nv.nvmlDeviceGetCount()} GPU(s)", _decoded(nv.nvmlSystemGetNVMLVersion()),
                         _decoded(nv.nvmlSystemGetDriverVersion()), f"{cuda // 1000}.{cuda % 1000 // 10}")
    except nv.NVMLError as exc:
        return NvmlFacts(True, f"NVML started, a query failed: {exc}")
    finally:
        nv.nvmlShutdown()


@dataclass(frozen=True)
class VllmFacts:
    """vLLM as `model.serve` would find it: importable here, a `vllm` on PATH, or neither."""
    version: str | None
    executable: str | None
    container_image: str


def vllm_facts(container_image: str) -> VllmFacts:
    try:
        version = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        version = None
    return VllmFacts(version, shutil.which("vllm"), container_image)


@dataclass(frozen=True)
class LlamaCppFacts:
    """The llama.cpp build this machine serves with: the sdist it came from, the binary's own
    version line, the vendored commit and the CMake flags (from the build's manifest)."""
    built: bool
    sdist_version: str
    build_key: str | None = None
    server_version: str | None = None
    commit: str | None = None
    cmake_flags: list[str] = field(default_factory=list)
    cuda_architectures: str | None = None


def llama_cpp_facts(settings: Settings) -> LlamaCppFacts:
    build = load_build(settings)
    if build is None:
        return LlamaCppFacts(False, settings.llamacpp.python_sdist_version)
    return LlamaCppFacts(True, build.spec.sdist_version, build.spec.key,
                         _first_line([str(build.binary("llama-server")), "--version"]),
                         build.llama_cpp_commit, build.spec.cmake_flags(), build.spec.cuda_architectures)


@dataclass(frozen=True)
class ModelFileChecksum:
    """A model file as the catalog pins it, and whether the store holds it at that size (the hash
    is checked when it is served or verified, not here: a 15 GB model would take minutes)."""
    model: str
    format: str
    file: str
    sha256: str
    size: int | None
    in_store: bool


def model_checksums(settings: Settings) -> list[ModelFileChecksum]:
    catalog, store = load_catalog(), ModelStore(settings.models_dir)
    rows = []
    for name, entry in catalog.models.items():
        formats = {**entry.formats, **store.local_formats(name)}
        for fmt, spec in formats.items():
            for f in spec.files:
                check = store.check_file(store.file_path(name, fmt, f), f, hash_it=False)
                rows.append(ModelFileChecksum(name, fmt, f.name, f.sha256, f.size,
                                              check.state is FileState.OK))
    return rows
