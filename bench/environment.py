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

import dgxready
from dgxready.settings import REPO_ROOT, load_settings
from model.llamacpp_build import load_build

ENV_PREFIXES = ("TORCH", "NCCL", "CUDA", "CUBLAS", "CUDNN", "OMP_", "MKL_", "NVIDIA", "VLLM",
                "LLAMA", "GGML", "DGXREADY", "HF_HUB_OFFLINE")
SECRET_WORDS = ("secret", "token", "api", "access", "password", "key")
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
