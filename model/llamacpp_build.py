"""Build llama-server, llama-quantize and llama-bench from the llama.cpp sources that the
pinned llama-cpp-python sdist vendors, cached per version, flags and CPU."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dgxready.errors import DgxReadyError
from dgxready.files import atomic_write_json
from dgxready.progress import console, elapsed_text, step_progress
from dgxready.settings import LLAMA_CPP_PYTHON_SDIST_SHA256, Settings, load_settings
from model import sdist

TARGETS = ("llama-server", "llama-quantize", "llama-bench")
BASE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    # ON by default: it would fetch the web UI from a model hub during the build.
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)
# ggml's AMX kernels crash on Sapphire-Rapids-class CPUs (SIGSEGV at their first ldtilecfg, seen
# on a 2-core Xeon VM; ggml-org/llama.cpp#20824, unfixed), and GGML_NATIVE turns them on
# wherever the CPU has AMX. GCC and clang honour an explicit -mno-amx-* whatever its place
# beside -march=native.
X86_NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
X86_FLAGS = (f"-DCMAKE_C_FLAGS={X86_NO_AMX}", f"-DCMAKE_CXX_FLAGS={X86_NO_AMX}")
CMAKE_PERCENT = re.compile(r"\[\s*(\d+)%\]")
NINJA_COUNT = re.compile(r"\[(\d+)/(\d+)\]")


class BuildError(DgxReadyError):
    pass


@dataclass(frozen=True)
class BuildSpec:
    sdist_version: str
    machine: str
    cpu_fingerprint: str
    cuda_architectures: str | None = None
    extra_flags: tuple[str, ...] = field(default_factory=tuple)

    def cmake_flags(self) -> list[str]:
        flags = list(BASE_FLAGS)
        if self.machine in ("x86_64", "AMD64"):
            flags += X86_FLAGS
        if self.cuda_architectures:
            flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={self.cuda_architectures}"]
        return flags + list(self.extra_flags)

    @property
    def key(self) -> str:
        variant = f"cuda{self.cuda_architectures}" if self.cuda_architectures else "cpu"
        flags_hash = hashlib.sha256(
            "\0".join(self.cmake_flags() + [self.cpu_fingerprint]).encode()
        ).hexdigest()[:10]
        return f"{self.sdist_version}-{self.machine}-{variant}-{flags_hash}"


@dataclass(frozen=True)
class LlamaCppBuild:
    root: Path
    spec: BuildSpec
    llama_cpp_commit: str | None
    seconds: float

    def binary(self, name: str) -> Path:
        return self.root / "bin" / name


def cpu_fingerprint() -> str:
    """GGML_NATIVE compiles for this CPU, so a build must not be reused on another one."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    flags = re.search(r"^(flags|Features)\s*:\s*(.*)$", info, re.M)
    model = re.search(r"^(model name|CPU part)\s*:\s*(.*)$", info, re.M)
    text = f"{model.group(2) if model else ''}|{flags.group(2) if flags else ''}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cuda_architecture(major: int, minor: int) -> str:
    # Blackwell consumer parts (GB10 is 12.1) need the arch-specific "a" target; NVIDIA's
    # DGX Spark playbook builds with 121a-real.
    suffix = "a-real" if major >= 12 else "-real"
    return f"{major}{minor}{suffix}"


def detect_cuda_architectures() -> str | None:
    from model.gpu import gpu_facts

    if not shutil.which("nvcc") and not Path("/usr/local/cuda/bin/nvcc").exists():
        return None
    gpus = gpu_facts()
    if not gpus:
        return None
    caps = sorted({cuda_architecture(*g.compute_capability) for g in gpus if g.compute_capability})
    return ";".join(caps) or None


def build_spec(settings: Settings) -> BuildSpec:
    cfg = settings.llamacpp
    if cfg.cuda == "off":
        archs = None
    elif cfg.cuda_architectures:
        archs = cfg.cuda_architectures
    else:
        archs = detect_cuda_architectures()
        if cfg.cuda == "on" and not archs:
            raise BuildError("llamacpp.cuda is 'on' but no nvcc or no NVIDIA GPU was found")
    return BuildSpec(
        sdist_version=cfg.python_sdist_version,
        machine=platform.machine(),
        cpu_fingerprint=cpu_fingerprint(),
        cuda_architectures=archs,
    )


def ninja_program() -> Path | None:
    """The `ninja` wheel beside this Python (a dependency), else one on PATH."""
    beside = Path(sys.executable).parent / "ninja"
    if beside.exists():
        return beside
    found = shutil.which("ninja")
    return Path(found) if found else None


def generator_flags(ninja: Path | None) -> list[str]:
    """Ninja schedules every object of every target at once, where make's generator waits for
    each library before compiling the objects of the targets that link it: on the 2-core VM the
    build took 5 min 44 s with ninja and 6 min 14 s with make. No compiler flag changes."""
    return ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []


def builds_root(settings: Settings) -> Path:
    return settings.cache_dir / "llama.cpp"


def load_build(settings: Settings, spec: BuildSpec | None = None) -> LlamaCppBuild | None:
    spec = spec or build_spec(settings)
    root = builds_root(settings) / spec.key
    stamp = root / "build.json"
    if not stamp.exists() or not all((root / "bin" / t).exists() for t in TARGETS):
        return None
    data = json.loads(stamp.read_text())
    return LlamaCppBuild(root, spec, data.get("llama_cpp_commit"), data.get("seconds", 0.0))


def require_binary(name: str, settings: Settings | None = None) -> Path:
    settings = settings or load_settings()
    build = load_build(settings)
    if build is None:
        raise DgxReadyError(
            f"{name} is not built for this machine yet: run `invoke model.build-llamacpp`"
        )
    return build.binary(name)


def fetch_sdist(settings: Settings, version: str) -> Path:
    console.print(f"llama-cpp-python {version} sdist (llama.cpp's sources)")
    return sdist.fetch_sdist("llama-cpp-python", version, settings.downloads_dir,
                             LLAMA_CPP_PYTHON_SDIST_SHA256.get(version))


def extract_vendored_source(settings: Settings, sdist: Path, version: str) -> Path:
    src = builds_root(settings) / f"src-{version}"
    if (src / "CMakeLists.txt").exists():
        return src
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    tmp = src.with_name(src.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith(prefix) and len(m.name) > len(prefix):
                m.name = m.name[len(prefix):]
                members.append(m)
        if not members:
            raise BuildError(f"{sdist.name}: no vendor/llama.cpp inside")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp, members=members, **kwargs)
    shutil.rmtree(src, ignore_errors=True)
    os.replace(tmp, src)
    return src


def vendored_commit(sdist: Path, version: str) -> str | None:
    """The sdist keeps llama.cpp's git HEAD only through the submodule's FETCH_HEAD, if at all."""
    with tarfile.open(sdist) as tar:
        for name in (f"llama_cpp_python-{version}/.git/modules/vendor/llama.cpp/HEAD",):
            try:
                fh = tar.extractfile(name)
            except KeyError:
                continue
            if fh:
                return fh.read().decode().strip()[:40]
    return None


def run_logged(cmd: list[str], log: Path, on_line=None) -> None:
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout
        for line in proc.stdout:
            fh.write(line)
            if on_line:
                on_line(line)
        rc = proc.wait()
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise BuildError(f"{cmd[0]} failed (exit {rc}); last lines of {log}:\n{tail}")


def build_llamacpp(settings: Settings | None = None, force: bool = False) -> LlamaCppBuild:
    settings = settings or load_settings()
    spec = build_spec(settings)
    existing = None if force else load_build(settings, spec)
    if existing:
        return existing
    if not shutil.which("cmake"):
        raise BuildError("cmake is not installed (apt-get install cmake build-essential)")
    started = time.monotonic()
    version = spec.sdist_version
    sdist = fetch_sdist(settings, version)
    src = extract_vendored_source(settings, sdist, version)
    root = builds_root(settings)
    ninja = ninja_program()
    build_dir = root / f"build-{spec.key}{'-ninja' if ninja else ''}"
    build_dir.mkdir(parents=True, exist_ok=True)
    log = root / f"build-{spec.key}.log"
    log.write_text("")
    jobs = settings.llamacpp.jobs or os.cpu_count() or 2
    console.print(f"building llama.cpp ({spec.key}) with {jobs} jobs; log: {log}")
    with step_progress() as progress:
        progress.add_task("llama.cpp configure (cmake)", total=None)
        run_logged(["cmake", "-S", str(src), "-B", str(build_dir), *generator_flags(ninja),
                    *spec.cmake_flags()], log)
    compile_with_progress(["cmake", "--build", str(build_dir), "--target", *TARGETS, "-j", str(jobs)],
                          log)
    seconds = time.monotonic() - started
    console.print(f"built llama.cpp in {elapsed_text(seconds)}")
    return install_build(root, spec, build_dir, vendored_commit(sdist, version), seconds)


def compile_with_progress(cmd: list[str], log: Path, label: str = "llama.cpp build") -> None:
    """Run `cmake --build`, showing its progress as a percentage: make's `[ NN%]` lines (each
    target restarts that count) or ninja's `[done/total]`. The percentage only ever rises, and
    stays below 100 until the end."""
    with step_progress(percent=True) as progress:
        task = progress.add_task(label, total=100)
        highest = 0

        def on_line(line: str) -> None:
            nonlocal highest
            if m := CMAKE_PERCENT.match(line):
                percent = int(m.group(1))
            elif m := NINJA_COUNT.match(line):
                percent = 100 * int(m.group(1)) // max(1, int(m.group(2)))
            else:
                return
            highest = max(highest, min(percent, 99))
            progress.update(task, completed=highest)

        run_logged(cmd, log, on_line)
        progress.update(task, completed=100)


def install_build(root: Path, spec: BuildSpec, build_dir: Path, commit: str | None,
                  seconds: float) -> LlamaCppBuild:
    final = root / spec.key
    tmp = root / f"{spec.key}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "bin").mkdir(parents=True)
    for target in TARGETS:
        shutil.copy2(build_dir / "bin" / target, tmp / "bin" / target)
    atomic_write_json(tmp / "build.json", {
        "spec": asdict(spec), "key": spec.key, "cmake_flags": spec.cmake_flags(),
        "llama_cpp_commit": commit, "seconds": round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return LlamaCppBuild(final, spec, commit, seconds)
