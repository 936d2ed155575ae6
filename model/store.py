"""The model store: verified files only, with partial downloads and quarantine kept apart."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from dgxready.errors import DgxReadyError
from dgxready.files import atomic_write_json, sha256_file
from dgxready.progress import byte_progress
from model.catalog import FileSpec, ModelFormat


class FileState(str, Enum):
    OK = "ok"
    MISSING = "missing"
    MISMATCH = "mismatch"


@dataclass(frozen=True)
class FileCheck:
    name: str
    state: FileState
    expected_sha256: str
    found_sha256: str | None = None
    expected_size: int | None = None
    found_size: int | None = None
    quarantined_to: Path | None = None

    def describe(self) -> str:
        if self.state is FileState.OK:
            return f"{self.name}: ok"
        if self.state is FileState.MISSING:
            return f"{self.name}: missing"
        text = (f"{self.name}: expected sha256 {self.expected_sha256} size {self.expected_size}, "
                f"found sha256 {self.found_sha256} size {self.found_size}")
        if self.quarantined_to:
            text += f"; quarantined to {self.quarantined_to}"
        return text


class ModelNotReady(DgxReadyError):
    """The model's files are missing or failed verification; it will not be served."""


@dataclass(frozen=True)
class ModelStore:
    root: Path

    def format_dir(self, model: str, fmt: str) -> Path:
        return self.root / model / fmt

    def file_path(self, model: str, fmt: str, spec: FileSpec) -> Path:
        return self.format_dir(model, fmt) / spec.name

    def partial_dir(self, model: str, fmt: str) -> Path:
        return self.root / ".partial" / model / fmt

    def quarantine(self, path: Path, model: str, fmt: str) -> Path:
        dest_dir = self.root / ".quarantine" / model / fmt
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{path.name}"
        os.replace(path, dest)
        return dest

    def check_file(self, path: Path, spec: FileSpec, hash_it: bool = True) -> FileCheck:
        if not path.is_file():
            return FileCheck(spec.name, FileState.MISSING, spec.sha256, expected_size=spec.size)
        size = path.stat().st_size
        if spec.size is not None and size != spec.size:
            return FileCheck(spec.name, FileState.MISMATCH, spec.sha256, None, spec.size, size)
        if not hash_it:
            return FileCheck(spec.name, FileState.OK, spec.sha256, None, spec.size, size)
        with byte_progress() as progress:
            task = progress.add_task(f"sha256 {spec.name}", total=size)
            digest = sha256_file(path, lambda n: progress.advance(task, n))
        state = FileState.OK if digest == spec.sha256 else FileState.MISMATCH
        return FileCheck(spec.name, state, spec.sha256, digest, spec.size, size)

    def verify(self, model: str, fmt: str, spec: ModelFormat) -> list[FileCheck]:
        """Hash every file; a mismatching one is moved to quarantine so it can never be served."""
        checks = []
        for f in spec.files:
            path = self.file_path(model, fmt, f)
            check = self.check_file(path, f)
            if check.state is FileState.MISMATCH:
                check = FileCheck(**{**check.__dict__, "quarantined_to": self.quarantine(path, model, fmt)})
            checks.append(check)
        return checks

    def require_verified(self, model: str, fmt: str, spec: ModelFormat) -> Path:
        checks = self.verify(model, fmt, spec)
        bad = [c for c in checks if c.state is not FileState.OK]
        if bad:
            details = "\n  ".join(c.describe() for c in bad)
            raise ModelNotReady(
                f"{model} ({fmt}) is not ready to serve:\n  {details}\n"
                f"run `invoke model.pull {model} --format {fmt}`"
            )
        return self.file_path(model, fmt, spec.entry_file)

    def presence(self, model: str, fmt: str, spec: ModelFormat) -> tuple[int, int]:
        """(files present with the right size, files expected); cheap, no hashing."""
        present = sum(
            self.check_file(self.file_path(model, fmt, f), f, hash_it=False).state is FileState.OK
            for f in spec.files
        )
        return present, len(spec.files)

    def local_formats_path(self, model: str) -> Path:
        return self.root / model / "local-formats.json"

    def local_formats(self, model: str) -> dict[str, ModelFormat]:
        """Formats made on this machine (by model.quantize), pinned by the hash they had then."""
        path = self.local_formats_path(model)
        if not path.exists():
            return {}
        try:
            raw = json.loads(path.read_text())
            return {k: ModelFormat.model_validate(v) for k, v in raw.items()}
        except (ValueError, TypeError) as exc:
            raise DgxReadyError(f"{path}: not a valid local format list: {exc}") from exc

    def add_local_format(self, model: str, fmt: str, spec: ModelFormat) -> None:
        formats = self.local_formats(model) | {fmt: spec}
        atomic_write_json(self.local_formats_path(model),
                          {k: v.model_dump(mode="json", exclude_none=True) for k, v in formats.items()})
