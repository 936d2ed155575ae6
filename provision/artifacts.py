"""What the controller prepares once per run and ships to every host: its llama.cpp build, the
model's verified files for each engine the hosts need, the toolkit's code, and the pins."""
from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import platform
import subprocess
import tarfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath

from dgxready.settings import REPO_ROOT, Settings
from model.catalog import load_catalog
from model.llamacpp_build import build_llamacpp
from model.plan import kv_shape
from model.pull import pull, store_for
from provision.steps.engine import LlamaBuild
from provision.steps.modelfiles import ModelFile, ModelFiles
from provision.steps.repro_image import ReproContext
from provision.steps.system import AppBundle

# What the multiplexer imports at run time on the host; pinned to the controller's versions.
HOST_PYTHON_PACKAGES = ("aiohttp", "httptools", "orjson", "prometheus-client", "pydantic", "pyyaml", "rich",
                        "python-json-logger", "starlette", "uvicorn", "uvloop", "httpx", "numpy",
                        "nvidia-ml-py", "rdflib", "owlrl", "usearch", "sniffio")
# model and monitoring: the exporter and the alert webhook the monitoring step runs.
APP_PACKAGES = ("dgxready", "agents", "bench", "model", "monitoring", "backup")
# Both Dockerfiles take the same context.
DOCKERIGNORE = "repro/docker/Dockerfile.cpu.dockerignore"


@dataclass(frozen=True)
class Artifacts:
    llama: LlamaBuild
    formats: dict[str, ModelFiles]
    app: AppBundle
    pins: tuple[str, ...]
    repro: ReproContext


def host_pins() -> tuple[str, ...]:
    pins = []
    for name in HOST_PYTHON_PACKAGES:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return tuple(pins)


def model_files(model: str, engine: str, settings: Settings, fmt: str | None = None) -> ModelFiles:
    # pull() hashes what is already in the store, so the files match the catalog's sha256.
    result = pull(model, fmt=fmt, engine=engine, settings=settings)
    catalog = load_catalog()
    spec = catalog.format(model, result.fmt)
    store = store_for(settings)
    files = tuple(ModelFile(store.file_path(model, result.fmt, f), f.name, f.sha256) for f in spec.files)
    entry = store.file_path(model, result.fmt, spec.entry_file)
    return ModelFiles(model, result.fmt, files, spec,
                      kv_shape(entry, catalog.model(model).architecture))


def reproducible_tarball(root: Path, files: list[str], keep_exec: bool = False) -> tuple[bytes, str]:
    """The files (paths relative to `root`) as a gzipped tar with no times or owners, and its
    sha256: the same files give the same bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in files:
            path = root / rel
            data = path.read_bytes()
            info = tarfile.TarInfo(rel)
            executable = keep_exec and path.stat().st_mode & 0o100
            info.size, info.mode, info.mtime = len(data), 0o755 if executable else 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    data = gzip.compress(buf.getvalue(), mtime=0)
    return data, hashlib.sha256(data).hexdigest()


def cached_artifact(cache: Path, name: str, data: bytes) -> Path:
    out = cache / name
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        tmp.write_bytes(data)
        tmp.replace(out)
    return out


def app_bundle(cache: Path) -> AppBundle:
    """The toolkit's runtime packages as a reproducible tarball, so an unchanged tree gives the
    same digest and the hosts see no change."""
    files = [str(path.relative_to(REPO_ROOT)) for package in APP_PACKAGES
             for path in sorted((REPO_ROOT / package).rglob("*"))
             if path.is_file() and not {"__pycache__", "benchmarks"} & set(path.relative_to(REPO_ROOT).parts)]
    data, digest = reproducible_tarball(REPO_ROOT, files)
    return AppBundle(cached_artifact(cache, f"app-{digest[:16]}.tar.gz", data), digest)


def dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / DOCKERIGNORE).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(rel: PurePosixPath, patterns: list[str]) -> bool:
    """A path, or a folder above it, matches a pattern: from the root, or by name for `**/name`."""
    for depth in range(1, len(rel.parts) + 1):
        head = PurePosixPath(*rel.parts[:depth])
        for p in patterns:
            if fnmatch.fnmatch(head.name, p[3:]) if p.startswith("**/") else fnmatch.fnmatch(str(head), p):
                return True
    return False


def checkout_files() -> list[str]:
    """The checkout's tracked files (git), or every file when it is not a git checkout."""
    listed = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "-z"], capture_output=True)
    if listed.returncode == 0 and listed.stdout:
        return sorted(f for f in listed.stdout.decode().split("\0") if f)
    return sorted(str(p.relative_to(REPO_ROOT)) for p in REPO_ROOT.rglob("*") if p.is_file())


def repro_context(cache: Path) -> ReproContext:
    """The Dockerfiles' build context: what .dockerignore lets in, reproducibly packed."""
    patterns = dockerignore_patterns()
    files = [f for f in checkout_files() if not ignored(PurePosixPath(f), patterns)
             and (REPO_ROOT / f).is_file()]
    data, digest = reproducible_tarball(REPO_ROOT, files, keep_exec=True)
    return ReproContext(cached_artifact(cache, f"repro-context-{digest[:16]}.tar.gz", data), digest)


def controller_artifacts(settings: Settings, model: str, engines: dict[str, str | None]) -> Artifacts:
    """`engines`: each engine the hosts need, with the format they ask for (None: the first)."""
    build = build_llamacpp(settings)
    sdist = settings.downloads_dir / f"llama_cpp_python-{settings.llamacpp.python_sdist_version}.tar.gz"
    llama = LlamaBuild(build.root / "bin", platform.machine(), sdist if sdist.exists() else None)
    formats = {engine: model_files(model, engine, settings, fmt) for engine, fmt in sorted(engines.items())}
    cache = settings.cache_dir / "provision"
    return Artifacts(llama, formats, app_bundle(cache), host_pins(), repro_context(cache))
