"""The engines' software: llama.cpp's binaries (shipped or built on the host) and vLLM's image."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from model.llamacpp_build import BASE_FLAGS, TARGETS, cuda_architecture
from provision.core import Changes, Host, Step, StepFailed, changes, q
from provision.facts import DockerImage, FileText, Machine, NvidiaSmi, Runs, Sha256s
from provision.steps.base import apt_install, upload_file


@dataclass(frozen=True)
class LlamaBuild:
    """The controller's llama.cpp build and the sdist it came from."""
    bin_dir: Path
    machine: str
    sdist: Path | None


@dataclass(frozen=True)
class ShipBinaries:
    names: tuple[str, ...]
    machine: str

    def describe(self) -> str:
        return f"ship {', '.join(self.names)} (the controller's {self.machine} build)"


@dataclass(frozen=True)
class BuildOnHost:
    sdist: str

    def describe(self) -> str:
        return f"build llama.cpp from {self.sdist} on the host"


def bin_dir(host: Host) -> str:
    return f"{host.vars.prefix}/bin"


class LlamaCpp(Step):
    """Ship the controller's build when the host has the same architecture (as a fleet ships
    build artefacts), or build on the host from the same pinned sdist when it does not, or when
    the host's vars say `llamacpp: build`."""
    name = "llama.cpp"

    def __init__(self, build: LlamaBuild):
        self.build = build
        self.digests = {b: hashlib.sha256((build.bin_dir / b).read_bytes()).hexdigest() for b in TARGETS}

    def mode(self, host: Host) -> str:
        if host.vars.llamacpp == "auto":
            return "ship" if host.fact(Machine()) == self.build.machine else "build"
        return host.vars.llamacpp

    def stamp(self, host: Host) -> str:
        return f"{bin_dir(host)}/.llama-build"

    def check(self, host: Host) -> Changes:
        paths = tuple(f"{bin_dir(host)}/{b}" for b in TARGETS)
        found = host.fact(Sha256s(paths))
        if self.mode(host) == "build":
            want = self.build.sdist.name if self.build.sdist else "(no sdist on the controller)"
            have = (host.fact(FileText(self.stamp(host))) or "").strip()
            return changes(None if have == want and len(found) == len(paths) else BuildOnHost(want))
        stale = tuple(b for b, p in zip(TARGETS, paths, strict=True) if found.get(p) != self.digests[b])
        return changes(ShipBinaries(stale, self.build.machine) if stale else None)

    def apply(self, host: Host, todo: Changes) -> str:
        for ship in todo.of(ShipBinaries):
            for b in ship.names:
                upload_file(host, self.build.bin_dir / b, f"{bin_dir(host)}/{b}", "0755", self.digests[b])
            return f"shipped the controller's {self.build.machine} build"
        return self.build_on_host(host)

    def build_on_host(self, host: Host) -> str:
        sdist = self.build.sdist
        if not sdist:
            raise StepFailed(f"{host.name}: no llama-cpp-python sdist on the controller to build from")
        src = f"{host.vars.prefix}/src"
        if not host.ok("command -v cmake >/dev/null && command -v g++ >/dev/null"):
            apt_install(host, ("cmake", "build-essential"))
        upload_file(host, sdist, f"{src}/{sdist.name}")
        cuda = self.cuda_flags(host)
        vendored = q(sdist.name.removesuffix(".tar.gz") + "/vendor/llama.cpp")
        host.sh(f"cd {q(src)} && rm -rf llama.cpp build && mkdir llama.cpp && "
                f"tar -xzf {q(sdist.name)} -C llama.cpp --strip-components=3 {vendored} && "
                f"export PATH=$PATH:/usr/local/cuda/bin && "
                f"cmake -S llama.cpp -B build {q(*BASE_FLAGS, *cuda)} >/dev/null && "
                f"cmake --build build --target {q(*TARGETS)} -j \"$(nproc)\" >/dev/null")
        for b in TARGETS:
            partial = f"{bin_dir(host)}/.{b}.partial"
            host.sh(f"install -m 0755 {q(src + '/build/bin/' + b)} {q(partial)} && "
                    f"mv -f {q(partial)} {q(bin_dir(host) + '/' + b)}")
        host.sh(f"printf %s {q(sdist.name)} > {q(self.stamp(host))}")
        return "built on the host" + (" with CUDA" if cuda else "")

    def cuda_flags(self, host: Host) -> tuple[str, ...]:
        smi = host.fact(NvidiaSmi())
        cc = smi.gpus[0].compute_capability if smi.answered else None
        if cc is None or not host.ok("command -v nvcc >/dev/null || test -x /usr/local/cuda/bin/nvcc"):
            return ()
        return ("-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architecture(*cc)}")

    def verify(self, host: Host) -> None:
        super().verify(host)
        if not host.fact(Runs((f"{bin_dir(host)}/llama-server", "--version"))):
            raise StepFailed(f"{host.name}: llama-server does not run there")

    def undo(self, host: Host) -> str | None:
        host.sh(f"rm -f {q(*(bin_dir(host) + '/' + b for b in TARGETS))} {q(self.stamp(host))}")
        return "removed the llama.cpp binaries"


@dataclass(frozen=True)
class PullImage:
    image: str

    def describe(self) -> str:
        return f"docker pull {self.image}"


class VllmImage(Step):
    name = "vllm"

    def __init__(self, image: str):
        self.image = image

    def skip_reason(self, host: Host) -> str | None:
        if host.vars.profile == "cpu-only":
            return "profile cpu-only: llama.cpp serves instead"
        if host.vars.vllm == "venv":
            return f"vllm: venv in the inventory: {host.vars.prefix}/vllm-venv is used, not the image"
        return None

    def check(self, host: Host) -> Changes:
        return changes(None if host.fact(DockerImage(self.image)) else PullImage(self.image))

    def apply(self, host: Host, todo: Changes) -> str:
        host.sh(f"docker pull {q(self.image)} >/dev/null")
        return ""
