"""The staging folder restic snapshots: every SQLite database captured with SQLite's backup API
(a consistent copy while the multiplexer keeps writing; never the live file), every other file
copied, and MANIFEST.json naming each one with its original path, size, sha256 and, for a
database, the result of `PRAGMA integrity_check`. The same manifest checks a restored tree."""
from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from backup.config import Resolved
from backup.restic import BackupError

MANIFEST = "MANIFEST.json"
DATA = "data"
SQLITE_MAGIC = b"SQLite format 3\x00"
SIDE_FILES = ("-wal", "-shm", "-journal")
CHUNK = 1 << 20
PRIVATE_DIR = 0o700


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    staged: str
    kind: Literal["sqlite", "file"]
    size: int
    sha256: str
    mode: int
    integrity: str | None = None


class Skipped(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    reason: str


class Manifest(BaseModel):
    """What a snapshot holds; read back from a restored tree, so it is validated like a config."""
    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = 1
    created_at: str
    hostname: str
    entries: list[Entry]
    skipped: list[Skipped]

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries)

    def databases(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == "sqlite"]


def staged_name(path: Path) -> str:
    return f"{DATA}/{str(path.resolve()).lstrip('/')}"


def is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def integrity(path: Path) -> str:
    """`PRAGMA integrity_check` of a captured or restored copy, opened read-only."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("PRAGMA integrity_check").fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        return f"error: {exc}"
    return "; ".join(str(r[0]) for r in rows)[:500]


def capture_sqlite(source: Path, dest: Path) -> None:
    """A consistent copy with the backup API (one step: one read transaction), then made a
    self-contained file (rollback journal), so the copy needs no -wal beside it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    src = sqlite3.connect(source, timeout=30)
    try:
        out = sqlite3.connect(dest)
        try:
            src.backup(out, pages=-1)
            out.execute("PRAGMA journal_mode=DELETE")
        finally:
            out.close()
    finally:
        src.close()


def copy_file(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)


class Capture:
    """Builds one staging tree: databases first, then the paths."""

    def __init__(self, resolved: Resolved, root: Path):
        self.resolved = resolved
        self.root = root
        self.entries: list[Entry] = []
        self.skipped: list[Skipped] = []
        self.seen: set[Path] = set()
        self.databases = {p.resolve() for p in resolved.databases.values()}
        self.avoid = {resolved.staging_dir.resolve(), resolved.cache_dir.resolve()}

    def add(self, source: Path, kind: Literal["sqlite", "file"]) -> None:
        source = source.resolve()
        if source in self.seen:
            return
        self.seen.add(source)
        staged = staged_name(source)
        dest = self.root / staged
        try:
            mode = source.stat().st_mode & 0o7777
            (capture_sqlite if kind == "sqlite" else copy_file)(source, dest)
        except (OSError, sqlite3.Error) as exc:
            if isinstance(exc, OSError) and exc.errno == 28:
                raise BackupError(f"staging {self.root}: no space left on device while copying "
                                  f"{source}") from None
            self.skipped.append(Skipped(path=str(source), reason=f"unreadable: {exc}"))
            return
        check = integrity(dest) if kind == "sqlite" else None
        if check is not None and check != "ok":
            raise BackupError(f"{source}: integrity_check of the captured copy says: {check}")
        self.entries.append(Entry(path=str(source), staged=staged, kind=kind, size=dest.stat().st_size,
                                  sha256=sha256_of(dest), mode=mode, integrity=check))

    def excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for pattern in self.resolved.config.exclude)

    def side_file_of_database(self, path: Path) -> bool:
        for suffix in SIDE_FILES:
            if path.name.endswith(suffix):
                main = path.with_name(path.name[:-len(suffix)])
                return main.resolve() in self.databases or is_sqlite(main)
        return False

    def files_under(self, folder: Path) -> Iterator[Path]:
        for top, dirs, files in os.walk(folder):
            here = Path(top)
            dirs[:] = sorted(d for d in dirs if not self.excluded(d) and (here / d).resolve() not in self.avoid)
            for name in sorted(files):
                if not self.excluded(name):
                    yield here / name

    def add_path(self, path: Path) -> None:
        if path.is_symlink() and not path.exists():
            self.skipped.append(Skipped(path=str(path), reason="dangling symlink"))
            return
        if not path.exists():
            self.skipped.append(Skipped(path=str(path), reason="absent"))
            return
        for file in (self.files_under(path) if path.is_dir() else [path]):
            if file.is_symlink() or not file.is_file():
                self.skipped.append(Skipped(path=str(file), reason="not a regular file"))
            elif file.resolve() in self.databases or self.side_file_of_database(file):
                continue
            else:
                self.add(file, "sqlite" if is_sqlite(file) else "file")

    def run(self) -> Manifest:
        for name, path in sorted(self.resolved.databases.items()):
            if path.exists():
                self.add(path, "sqlite")
            else:
                self.skipped.append(Skipped(path=str(path), reason=f"database {name} absent"))
        for path in self.resolved.paths:
            self.add_path(path)
        return Manifest(created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        hostname=socket.gethostname(), entries=self.entries, skipped=self.skipped)


def fresh_private_dir(path: Path) -> Path:
    """Staging holds copies of keys: owner-only, and emptied before use."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=PRIVATE_DIR)
    os.chmod(path, PRIVATE_DIR)
    return path


def capture(resolved: Resolved, root: Path) -> Manifest:
    fresh_private_dir(root)
    manifest = Capture(resolved, root).run()
    (root / MANIFEST).write_text(manifest.model_dump_json(indent=2))
    return manifest


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    try:
        return Manifest.model_validate_json(path.read_text())
    except OSError as exc:
        raise BackupError(f"{path}: the snapshot has no readable manifest: {exc.strerror}") from None
    except ValidationError as exc:
        raise BackupError(f"{path}: not a valid manifest: {exc.errors()[0]['msg']}") from None


def verify_tree(root: Path, manifest: Manifest) -> list[str]:
    """Every entry of a restored tree present with its size and sha256, every database passing
    integrity_check; the problems found, empty when the tree is whole."""
    return verify_files(manifest, lambda e: root / e.staged)


def verify_files(manifest: Manifest, locate: Callable[[Entry], Path]) -> list[str]:
    problems = []
    for e in manifest.entries:
        path = locate(e)
        if not path.is_file():
            problems.append(f"{e.path}: missing at {path}")
            continue
        if path.stat().st_size != e.size or sha256_of(path) != e.sha256:
            problems.append(f"{e.path}: sha256 at {path} differs from the manifest")
            continue
        if e.kind == "sqlite" and (check := integrity(path)) != "ok":
            problems.append(f"{e.path}: integrity_check: {check}")
    return problems
