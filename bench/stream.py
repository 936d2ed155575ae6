"""STREAM (copy, scale, add, triad) with numpy, threaded over array slices. numpy releases the
GIL in these kernels, so T threads stream T slices at once. Triad runs in cache-sized blocks so
that its temporary stays in cache and the traffic is STREAM's 3 x 8 bytes per element."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

BLOCK = 1 << 16
BYTES_PER_ELEMENT = {"copy": 16, "scale": 16, "add": 24, "triad": 24}


@dataclass(frozen=True)
class StreamResult:
    """`best_gbps` is STREAM's figure, the best repetition; `gbps_samples` every repetition, in
    order, so that two runs can be compared against their own spread (None in older baselines)."""
    array_bytes: int
    threads: int
    repetitions: int
    best_gbps: dict[str, float]
    last_level_cache_bytes: int | None
    gbps_samples: dict[str, list[float]] | None = None

    @property
    def best_op(self) -> tuple[str, float]:
        return max(self.best_gbps.items(), key=lambda kv: kv[1])


def _triad(a, b, c, q, tmp):
    for s in range(0, len(a), BLOCK):
        e = min(s + BLOCK, len(a))
        np.multiply(c[s:e], q, out=tmp[: e - s])
        np.add(b[s:e], tmp[: e - s], out=a[s:e])


def _kernel(op, a, b, c, q, tmp):
    if op == "copy":
        np.copyto(c, a)
    elif op == "scale":
        np.multiply(c, q, out=b)
    elif op == "add":
        np.add(a, b, out=c)
    else:
        _triad(a, b, c, q, tmp)


def array_elements(llc_bytes: int | None, minimum_bytes: int = 64 << 20) -> int:
    """Each array at least 4x the last-level cache (STREAM's rule), and never tiny."""
    return max(4 * (llc_bytes or 0), minimum_bytes) // 8


def run_stream(llc_bytes: int | None, threads: int | None = None, repetitions: int = 10,
               elements: int | None = None) -> StreamResult:
    threads = threads or os.cpu_count() or 1
    n = elements or array_elements(llc_bytes)
    a, b, c = np.full(n, 1.0), np.full(n, 2.0), np.zeros(n)
    q = 3.0
    bounds = np.linspace(0, n, threads + 1, dtype=np.int64)
    slices = [(int(bounds[i]), int(bounds[i + 1])) for i in range(threads)]
    scratch = [np.empty(BLOCK) for _ in range(threads)]
    samples: dict[str, list[float]] = {op: [] for op in BYTES_PER_ELEMENT}
    with ThreadPoolExecutor(threads) as pool:
        # One untimed pass first, as STREAM ignores its first iteration: it pays the page faults.
        for rep in range(repetitions + 1):
            for op in BYTES_PER_ELEMENT:
                started = time.perf_counter()
                list(pool.map(lambda i, op=op: _kernel(op, a[slice(*slices[i])], b[slice(*slices[i])],
                                                       c[slice(*slices[i])], q, scratch[i]),
                              range(threads)))
                seconds = time.perf_counter() - started
                if rep:
                    samples[op].append(BYTES_PER_ELEMENT[op] * n / seconds / 1e9)
    best = {op: max(values) for op, values in samples.items()}
    return StreamResult(n * 8, threads, repetitions, best, llc_bytes, samples)
