"""Answers cached by (kind, normalised query, parameters, knowledge version): a write anywhere
bumps the version, and the first lookup that sees the new version drops every older entry
(counted as invalidations), so a stale answer is never served."""
from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

SPACE_RE = re.compile(r"\s+")


def normalised_text(query: str) -> str:
    """A free-text question: case and spacing do not change the answer."""
    return SPACE_RE.sub(" ", query).strip().lower()


def normalised_sparql(query: str) -> str:
    """A SPARQL query: spacing does not change it (case may: IRIs and literals keep theirs)."""
    return SPACE_RE.sub(" ", query).strip()


@dataclass(frozen=True)
class CacheKey:
    kind: str
    query: str
    params: Hashable


class VersionedCache:
    def __init__(self, max_entries: int = 1024, on_event: Callable[[str, int], None] | None = None):
        self.max_entries = max_entries
        self.on_event = on_event or (lambda event, count: None)
        self.version = 0
        self.entries: OrderedDict[CacheKey, Any] = OrderedDict()
        self.lock = threading.Lock()

    def _advance(self, version: int) -> None:
        if version <= self.version:
            return
        dropped = len(self.entries)
        self.entries.clear()
        self.version = version
        if dropped:
            self.on_event("invalidation", dropped)

    def get(self, key: CacheKey, version: int) -> Any | None:
        with self.lock:
            self._advance(version)
            if version != self.version or key not in self.entries:
                self.on_event("miss", 1)
                return None
            self.entries.move_to_end(key)
            self.on_event("hit", 1)
            return self.entries[key]

    def put(self, key: CacheKey, version: int, value: Any) -> None:
        """Kept only when `version` is still the newest seen: an answer computed while a write
        landed is not cached under a version it may not reflect."""
        with self.lock:
            self._advance(version)
            if version != self.version:
                return
            self.entries[key] = value
            self.entries.move_to_end(key)
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)
