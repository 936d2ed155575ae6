"""Documents cut into chunks: Markdown by its headings (each chunk keeps its heading path), plain
text by paragraphs, JSON by its top-level keys or items; any piece longer than `max_chars` is cut
further at paragraph, then line, then word boundaries."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from agents.knowledge.types import ChunkText, KnowledgeError

HEADING_RE = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
FENCE_RE = re.compile(r"^\s*(```|~~~)")
KINDS = {".md": "markdown", ".markdown": "markdown", ".txt": "text", ".text": "text", ".json": "json"}


@dataclass(frozen=True)
class ChunkLimits:
    max_chars: int = 1500
    max_document_bytes: int = 2 << 20
    max_chunks: int = 5000


def kind_of(source: str) -> str:
    suffix = source[source.rfind("."):].lower() if "." in source else ""
    return KINDS.get(suffix, "text")


def split_long(text: str, max_chars: int) -> list[str]:
    """`text` in pieces of at most `max_chars`, cut at the coarsest boundary that fits."""
    text = text.strip()
    if len(text) <= max_chars:
        return [text] if text else []
    for separator in ("\n\n", "\n", " "):
        parts = text.split(separator)
        if len(parts) > 1:
            return pack(parts, separator, max_chars)
    return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]


def pack(parts: list[str], separator: str, max_chars: int) -> list[str]:
    pieces: list[str] = []
    current = ""
    for part in parts:
        joined = f"{current}{separator}{part}" if current else part
        if len(joined) <= max_chars:
            current = joined
            continue
        if current:
            pieces.append(current)
        if len(part) > max_chars:
            pieces.extend(split_long(part, max_chars))
            current = ""
        else:
            current = part
    if current.strip():
        pieces.append(current)
    return [p.strip() for p in pieces if p.strip()]


def markdown_sections(text: str) -> list[tuple[str, str]]:
    """(heading path, body) per section; headings inside code fences are body."""
    path: list[tuple[int, str]] = []
    sections: list[tuple[str, str]] = []
    body: list[str] = []
    fenced = False

    def close() -> None:
        sections.append((" > ".join(title for _, title in path), "\n".join(body)))

    for line in text.splitlines():
        if FENCE_RE.match(line):
            fenced = not fenced
        match = None if fenced else HEADING_RE.match(line)
        if match is None:
            body.append(line)
            continue
        close()
        level = len(match.group(1))
        path = [(lvl, title) for lvl, title in path if lvl < level] + [(level, match.group(2))]
        body = [line]
    close()
    return [(heading, b) for heading, b in sections if b.strip()]


def json_sections(text: str, source: str) -> list[tuple[str, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KnowledgeError(f"{source}: not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if isinstance(data, dict):
        return [(str(key), f"{key}: {json.dumps(value, ensure_ascii=False, indent=1)}")
                for key, value in data.items()]
    if isinstance(data, list):
        return [(f"[{i}]", json.dumps(item, ensure_ascii=False, indent=1)) for i, item in enumerate(data)]
    return [("", json.dumps(data, ensure_ascii=False))]


def sections_of(text: str, kind: str, source: str) -> list[tuple[str, str]]:
    if kind == "markdown":
        return markdown_sections(text)
    if kind == "json":
        return json_sections(text, source)
    return [("", text)]


def chunk_document(text: str, kind: str, source: str, limits: ChunkLimits) -> tuple[ChunkText, ...]:
    """The chunks of one document, refused whole when it is over the size or chunk limit."""
    size = len(text.encode())
    if size > limits.max_document_bytes:
        raise KnowledgeError(f"{source}: {size} bytes is over the limit of {limits.max_document_bytes} "
                             "(knowledge.max_document_bytes); split it into smaller documents")
    chunks = tuple(ChunkText(heading, piece) for heading, body in sections_of(text, kind, source)
                   for piece in split_long(body, limits.max_chars))
    if len(chunks) > limits.max_chunks:
        raise KnowledgeError(f"{source}: {len(chunks)} chunks is over the limit of {limits.max_chunks} "
                             "(knowledge.max_chunks)")
    if not chunks:
        raise KnowledgeError(f"{source}: no text to store")
    return chunks
