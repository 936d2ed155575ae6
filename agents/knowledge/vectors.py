"""The vector side of retrieval, kept in memory by each process and brought up to the store's
version before every search: exact numpy search while the store is small (past 20,000 rows
pruned by a sketch of the rows' main directions, with the full scan's answer), a usearch HNSW index
(saved beside the database, by version, so a restart only applies what changed since) once the
live chunks reach `ann_threshold`. Vectors are L2-normalised, so inner product is cosine."""
from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from usearch.index import Index

from agents.knowledge.types import VectorBatch

SAVED_RE = re.compile(r"^v(\d+)\.usearch$")


@dataclass(frozen=True)
class VectorSettings:
    ann_threshold: int = 200_000
    connectivity: int = 16
    expansion_add: int = 128
    expansion_search: int = 256
    ann_dtype: str = "f16"
    threads: int = 2
    index_dir: Path | None = None


def normalised(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return (rows / np.where(norms == 0, 1, norms)).astype(np.float32)


def as_matrix(blobs: list[bytes], dim: int) -> np.ndarray:
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim)


@dataclass(frozen=True)
class SketchSettings:
    """`dim` principal directions, fitted on up to `sample` rows once there are `from_rows`, and
    fitted again when the rows have grown `refit_growth` times since."""
    dim: int = 64
    from_rows: int = 20_000
    sample: int = 20_000
    refit_growth: float = 4.0
    # float32 rounding in the sketch's products, far above it for unit vectors
    margin: float = 1e-4
    # beyond this share of the rows, gathering the candidates costs more than scanning them all
    most_read: float = 0.25


def principal_basis(rows: np.ndarray, dim: int) -> np.ndarray:
    """The `dim` directions of most energy in `rows` (orthonormal columns)."""
    gram = rows.T.astype(np.float64) @ rows.astype(np.float64)
    _, vectors = np.linalg.eigh(gram)
    return np.ascontiguousarray(vectors[:, ::-1][:, :dim], dtype=np.float32)


class Sketch:
    """Each row's coordinates in a small orthonormal basis B and the norm of what B misses.
    Since q.x = (qB).(xB) + q'.x' and |q'.x'| <= |q'| |x'| (the parts outside B), the sketch bounds
    every row's score from a scan of `dim` columns instead of all of them: a row whose upper bound
    is below the k-th best lower bound cannot be in the top k, and is never read in full. The
    answer is the full scan's; a basis that fits the rows badly only leaves more rows to read."""

    def __init__(self, basis: np.ndarray, capacity: int):
        self.basis = basis
        self.coords = np.zeros((capacity, basis.shape[1]), dtype=np.float32)
        self.residual = np.zeros(capacity, dtype=np.float32)

    def set_rows(self, start: int, rows: np.ndarray, block: int = 50_000) -> None:
        for at in range(0, len(rows), block):
            part = rows[at:at + block]
            coords = part @ self.basis
            self.coords[start + at:start + at + len(part)] = coords
            outside = part - coords @ self.basis.T
            self.residual[start + at:start + at + len(part)] = np.linalg.norm(outside, axis=1)

    def move(self, src: int, dst: int) -> None:
        self.coords[dst], self.residual[dst] = self.coords[src], self.residual[src]

    def grown(self, capacity: int, count: int) -> Sketch:
        bigger = Sketch(self.basis, capacity)
        bigger.coords[:count], bigger.residual[:count] = self.coords[:count], self.residual[:count]
        return bigger

    def candidates(self, query: np.ndarray, count: int, k: int, margin: float) -> np.ndarray:
        """The rows whose score could be among the k best, in row order."""
        q = query @ self.basis
        outside = float(np.linalg.norm(query - self.basis @ q))
        approx = self.coords[:count] @ q
        slack = self.residual[:count] * outside + margin * float(np.linalg.norm(query))
        lower = approx - slack
        kth_lower = np.partition(lower, count - k)[count - k]
        return np.flatnonzero(approx + slack >= kth_lower)


class ExactVectors:
    """Rows in a growing float32 matrix; a removed row is swapped with the last one. Past
    `sketch.from_rows` rows a search reads the sketch first and then only the rows that could
    rank (see Sketch)."""

    def __init__(self, dim: int, sketch: SketchSettings | None = None):
        self.dim = dim
        self.ids = np.zeros(0, dtype=np.int64)
        self.matrix = np.zeros((0, dim), dtype=np.float32)
        self.count = 0
        self.row_of: dict[int, int] = {}
        self.sketch_settings = sketch or SketchSettings()
        self.sketch: Sketch | None = None
        self.sketch_fitted_at = 0

    def __len__(self) -> int:
        return self.count

    def _reserve(self, extra: int) -> None:
        needed = self.count + extra
        if needed <= len(self.ids):
            return
        capacity = max(needed, 2 * len(self.ids), 1024)
        ids = np.zeros(capacity, dtype=np.int64)
        matrix = np.zeros((capacity, self.dim), dtype=np.float32)
        ids[:self.count], matrix[:self.count] = self.ids[:self.count], self.matrix[:self.count]
        self.ids, self.matrix = ids, matrix
        if self.sketch is not None:
            self.sketch = self.sketch.grown(capacity, self.count)

    def add(self, ids: np.ndarray, rows: np.ndarray) -> None:
        self._reserve(len(ids))
        start = self.count
        self.ids[start:start + len(ids)] = ids
        self.matrix[start:start + len(ids)] = rows
        if self.sketch is not None:
            self.sketch.set_rows(start, self.matrix[start:start + len(ids)])
        self.row_of.update((int(i), start + n) for n, i in enumerate(ids))
        self.count += len(ids)

    def remove(self, ids: list[int]) -> None:
        for chunk in ids:
            row = self.row_of.pop(chunk, None)
            if row is None:
                continue
            last = self.count - 1
            if row != last:
                moved = int(self.ids[last])
                self.ids[row], self.matrix[row] = moved, self.matrix[last]
                if self.sketch is not None:
                    self.sketch.move(last, row)
                self.row_of[moved] = row
            self.count = last

    def fit_sketch(self) -> Sketch | None:
        """The sketch, fitted first where there are enough rows and none fits them yet."""
        s = self.sketch_settings
        if self.count < max(s.from_rows, 2 * s.dim) or s.dim >= self.dim:
            return None
        if self.sketch is None or self.count >= s.refit_growth * self.sketch_fitted_at:
            step = max(1, self.count // s.sample)
            sketch = Sketch(principal_basis(self.matrix[:self.count:step], s.dim), len(self.ids))
            sketch.set_rows(0, self.matrix[:self.count])
            self.sketch, self.sketch_fitted_at = sketch, self.count
        return self.sketch

    def _candidates(self, query: np.ndarray, k: int) -> np.ndarray | None:
        """The rows the sketch could not rule out; None to scan them all."""
        sketch = self.fit_sketch()
        if sketch is None:
            return None
        rows = sketch.candidates(query, self.count, k, self.sketch_settings.margin)
        return rows if len(rows) <= self.sketch_settings.most_read * self.count else None

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        if self.count == 0:
            return []
        k = min(k, self.count)
        rows = self._candidates(query, k)
        scores = self.matrix[rows] @ query if rows is not None else self.matrix[:self.count] @ query
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top])]
        found = rows[top] if rows is not None else top
        return [(int(self.ids[i]), float(s)) for i, s in zip(found, scores[top], strict=True)]


class AnnVectors:
    """A usearch HNSW index over the same rows, keyed by chunk id."""

    def __init__(self, dim: int, settings: VectorSettings, index: Index | None = None):
        self.settings = settings
        self.index = index or Index(ndim=dim, metric="ip", dtype=settings.ann_dtype,
                                    connectivity=settings.connectivity,
                                    expansion_add=settings.expansion_add,
                                    expansion_search=settings.expansion_search)

    def __len__(self) -> int:
        return len(self.index)

    def add(self, ids: np.ndarray, rows: np.ndarray) -> None:
        keys = ids.astype(np.uint64)
        fresh = ~np.asarray(self.index.contains(keys), dtype=bool).reshape(-1) if len(self.index) else \
            np.ones(len(keys), dtype=bool)
        if fresh.any():
            self.index.add(keys[fresh], rows[fresh], threads=self.settings.threads)

    def remove(self, ids: list[int]) -> None:
        if ids:
            self.index.remove(np.asarray(ids, dtype=np.uint64))

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        if len(self.index) == 0:
            return []
        found = self.index.search(query, k)
        return [(int(key), 1.0 - float(dist)) for key, dist in zip(found.keys, found.distances, strict=True)]

    @property
    def memory_bytes(self) -> int:
        return int(self.index.memory_usage)


def saved_indexes(directory: Path | None) -> list[tuple[int, Path]]:
    if directory is None or not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := SAVED_RE.match(p.name))]
    return sorted(found)


class VectorIndex:
    """Exact search until `ann_threshold` live rows, then the ANN index; `version` says which
    knowledge version the rows reflect."""

    def __init__(self, dim: int, settings: VectorSettings | None = None):
        self.dim = dim
        self.settings = settings or VectorSettings()
        self.version = 0
        self.lock = threading.Lock()
        self.rows: ExactVectors | AnnVectors = ExactVectors(dim)
        self._load_saved()

    @property
    def mode(self) -> str:
        return "ann" if isinstance(self.rows, AnnVectors) else "exact"

    def __len__(self) -> int:
        return len(self.rows)

    def _load_saved(self) -> None:
        saved = saved_indexes(self.settings.index_dir)
        if not saved:
            return
        version, path = saved[-1]
        index = Index.restore(str(path))
        if index is None or index.ndim != self.dim:
            return
        index.expansion_search = self.settings.expansion_search
        self.rows, self.version = AnnVectors(self.dim, self.settings, index), version

    def apply(self, batch: VectorBatch) -> None:
        """One page of changes; `batch.version` is the version they bring the rows up to."""
        if batch.added_ids:
            self.rows.add(np.asarray(batch.added_ids, dtype=np.int64), as_matrix(batch.added, self.dim))
        self.rows.remove(batch.removed_ids)
        self.version = batch.version

    def settle(self) -> None:
        """After the last page of a sync: the exact rows' sketch is fitted if it is due, so that no
        search pays for it; past the threshold, exact search gives way to the ANN
        index, which is saved as of this version."""
        if self.mode == "exact" and len(self.rows) >= self.settings.ann_threshold:
            self.rows = self.build_ann(self.rows)
            self.save()
        elif isinstance(self.rows, ExactVectors):
            self.rows.fit_sketch()

    def build_ann(self, exact: ExactVectors) -> AnnVectors:
        ann = AnnVectors(self.dim, self.settings)
        ann.add(exact.ids[:exact.count], exact.matrix[:exact.count])
        return ann

    def save(self) -> Path | None:
        """The ANN index under index_dir as v<version>.usearch (older files removed)."""
        directory = self.settings.index_dir
        if directory is None or not isinstance(self.rows, AnnVectors):
            return None
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"v{self.version}.usearch"
        temp = directory / f".{path.name}.{os.getpid()}.tmp"
        self.rows.index.save(str(temp))
        os.replace(temp, path)
        for version, old in saved_indexes(directory):
            if version < self.version:
                old.unlink(missing_ok=True)
        return path

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        return self.rows.search(normalised(query.astype(np.float32)), k)
