"""Backend choice. NVML and vLLM cannot run here, so GPU facts and the vLLM install are
simulated by passing them in; the choice logic and the commands built are the real ones."""
from pathlib import Path

import pytest

from dgxready.errors import DgxReadyError
from model.backend import VllmInstall, choose_backend
from model.gpu import GpuFacts
from model.serve import vllm_command

GB10 = GpuFacts(0, "NVIDIA GB10", (12, 1), None, None, True)
IMAGE = "nvcr.io/nvidia/vllm:25.10-py3"


def test_no_gpu_means_llamacpp_with_the_reason():
    choice = choose_backend("auto", IMAGE, gpus=[], probe_vllm=False)
    assert choice.backend == "llamacpp" and choice.reason == "no NVIDIA GPU found through NVML"


def test_gpu_without_vllm_falls_back_and_says_why():
    choice = choose_backend("auto", IMAGE, gpus=[GB10], probe_vllm=False)
    assert choice.backend == "llamacpp"
    assert "NVIDIA GB10 found, but no `vllm` on PATH and no local image" in choice.reason


def test_gpu_with_vllm_container_picks_vllm_and_keeps_the_entrypoint():
    choice = choose_backend("auto", IMAGE, gpus=[GB10], vllm=VllmInstall("container", IMAGE))
    assert choice.backend == "vllm"
    cmd = vllm_command(choice, Path("/models/m/fp8"), "mistral", "127.0.0.1", 8000,
                       ["--max-num-seqs", "10"], True, ())
    assert cmd[:6] == ["docker", "run", "--rm", "--gpus", "all", "--ipc=host"]
    assert "--entrypoint" not in cmd
    assert cmd[cmd.index(IMAGE) + 1:cmd.index(IMAGE) + 3] == ["vllm", "serve"]
    assert ["--tokenizer-mode", "mistral"] == cmd[-2:]


def test_forcing_vllm_without_a_gpu_is_an_error():
    with pytest.raises(DgxReadyError, match="no NVIDIA GPU"):
        choose_backend("vllm", IMAGE, gpus=[], probe_vllm=False)
    with pytest.raises(DgxReadyError, match="choose auto, vllm or llamacpp"):
        choose_backend("tgi", IMAGE, gpus=[], probe_vllm=False)
