"""Which engine serves here: vLLM on a CUDA GPU with vLLM installed (or its container), else
llama.cpp's native llama-server."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Literal

from dgxready.errors import DgxReadyError
from model.gpu import GpuFacts, gpu_facts

Backend = Literal["vllm", "llamacpp"]
# llama-server (cpp-httplib) and vLLM (uvicorn) close a connection idle for 5 s, and a request sent
# on one as it closes fails: clients of an engine let idle connections go first.
ENGINE_CLIENT_KEEPALIVE_S = 4.0


@dataclass(frozen=True)
class VllmInstall:
    kind: Literal["venv", "container"]
    location: str


@dataclass(frozen=True)
class BackendChoice:
    backend: Backend
    reason: str
    vllm: VllmInstall | None = None


def find_vllm(image: str) -> VllmInstall | None:
    exe = shutil.which("vllm")
    if exe:
        return VllmInstall("venv", exe)
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "image", "inspect", image],
                               capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return VllmInstall("container", image)
    return None


def choose_backend(requested: str, image: str, gpus: list[GpuFacts] | None = None,
                   vllm: VllmInstall | None = None, probe_vllm: bool = True) -> BackendChoice:
    if requested not in ("auto", "vllm", "llamacpp"):
        raise DgxReadyError(f"--backend {requested!r}: choose auto, vllm or llamacpp")
    if requested == "llamacpp":
        return BackendChoice("llamacpp", "asked for with --backend llamacpp")
    gpus = gpu_facts() if gpus is None else gpus
    if vllm is None and probe_vllm:
        vllm = find_vllm(image)
    if requested == "vllm":
        if not gpus:
            raise DgxReadyError("--backend vllm: no NVIDIA GPU found through NVML")
        if not vllm:
            raise DgxReadyError(f"--backend vllm: no `vllm` on PATH and no local image {image}")
        return BackendChoice("vllm", "asked for with --backend vllm", vllm)
    if not gpus:
        return BackendChoice("llamacpp", "no NVIDIA GPU found through NVML")
    if not vllm:
        return BackendChoice("llamacpp", f"{gpus[0].name} found, but no `vllm` on PATH and no "
                                         f"local image {image}")
    return BackendChoice("vllm", f"{gpus[0].name} found and vLLM is installed ({vllm.kind}: "
                                 f"{vllm.location})", vllm)
