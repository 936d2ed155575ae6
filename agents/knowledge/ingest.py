"""Files into the knowledge store: Markdown, text and JSON as documents, Turtle into the ontology;
a folder brings every such file under it."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from agents.knowledge.service import KnowledgeService
from agents.knowledge.types import Author, KnowledgeError

DOCUMENT_SUFFIXES = (".md", ".markdown", ".txt", ".text", ".json")
ONTOLOGY_SUFFIXES = (".ttl",)


@dataclass(frozen=True)
class Ingested:
    path: Path
    source: str
    kind: str
    version: int
    items: int
    changed: bool
    seconds: float


def ingest_targets(paths: Iterable[Path]) -> list[Path]:
    wanted = DOCUMENT_SUFFIXES + ONTOLOGY_SUFFIXES
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in wanted)
        elif path.is_file():
            files.append(path)
        else:
            raise KnowledgeError(f"{path}: no such file or folder")
    return files


def source_name(path: Path) -> str:
    """The path relative to the working folder when it lies under it: what results cite."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path.resolve())


def ingest_file(service: KnowledgeService, path: Path, author: Author, scope: str) -> Ingested:
    started = time.perf_counter()
    source = source_name(path)
    before = service.version()
    if path.suffix.lower() in ONTOLOGY_SUFFIXES:
        asserted = service.load_ontology_file(path, author)
        return Ingested(path, source, "ontology", asserted.version, asserted.triples, asserted.version > before,
                        time.perf_counter() - started)
    stored = service.add_file(path, author, scope, source=source)
    return Ingested(path, source, "document", stored.version, stored.chunks, stored.version > before,
                    time.perf_counter() - started)


def ingest_paths(service: KnowledgeService, paths: Iterable[Path], author: Author, scope: str,
                 on_file: Callable[[int, int, Ingested], None]) -> list[Ingested]:
    files = ingest_targets(paths)
    done = []
    for n, path in enumerate(files, start=1):
        done.append(ingest_file(service, path, author, scope))
        on_file(n, len(files), done[-1])
    return done
