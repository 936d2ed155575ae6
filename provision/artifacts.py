"""What the controller prepares once per run and ships to every host: its llama.cpp build, the
model's verified files for each engine the hosts need, the toolkit's code, and the pins."""
from __future__ import annotations

import gzip
import hashlib
import io
import platform
import tarfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from dgxready.settings import REPO_ROOT, Settings
from model.catalog import load_catalog
from model.llamacpp_build import build_llamacpp
from model.plan import kv_shape
from model.pull import pull, store_for
from provision.steps.engine import LlamaBuild
from provision.steps.modelfiles import ModelFile, ModelFiles
from provision.steps.system import AppBundle

# What the multiplexer imports at run time on the host; pinned to the controller's versions.
HOST_PYTHON_PACKAGES = ("aiohttp", "httptools", "orjson", "prometheus-client", "pydantic", "pyyaml", "rich",
                        "python-json-logger", "starlette", "uvicorn", "uvloop", "httpx", "numpy",
                        "nvidia-ml-py", "rdflib", "owlrl", "usearch", "sniffio")
# model and monitoring: the exporter and the alert webhook the monitoring step runs.
APP_PACKAGES = ("dgxready", "agents", "bench", "model", "monitoring", "backup")


@dataclass(frozen=True)
class Artifacts:
    llama: LlamaBuild
    formats: dict[str, ModelFiles]
    app: AppBundle
    pins: tuple[str, ...]


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


def app_bundle(cache: Path) -> AppBundle:
    """The toolkit's runtime packages as a reproducible tarball (sorted, no times or owners), so
    an unchanged tree gives the same digest and the hosts see no change."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for package in APP_PACKAGES:
            for path in sorted((REPO_ROOT / package).rglob("*")):
                rel = path.relative_to(REPO_ROOT)
                if path.is_dir() or "__pycache__" in rel.parts or "benchmarks" in rel.parts:
                    continue
                info = tarfile.TarInfo(str(rel))
                data = path.read_bytes()
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
    data = gzip.compress(buf.getvalue(), mtime=0)
    digest = hashlib.sha256(data).hexdigest()
    out = cache / f"app-{digest[:16]}.tar.gz"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        tmp.write_bytes(data)
        tmp.replace(out)
    return AppBundle(out, digest)


def controller_artifacts(settings: Settings, model: str, engines: dict[str, str | None]) -> Artifacts:
    """`engines`: each engine the hosts need, with the format they ask for (None: the first)."""
    build = build_llamacpp(settings)
    sdist = settings.downloads_dir / f"llama_cpp_python-{settings.llamacpp.python_sdist_version}.tar.gz"
    llama = LlamaBuild(build.root / "bin", platform.machine(), sdist if sdist.exists() else None)
    formats = {engine: model_files(model, engine, settings, fmt) for engine, fmt in sorted(engines.items())}
    return Artifacts(llama, formats, app_bundle(settings.cache_dir / "provision"), host_pins())
