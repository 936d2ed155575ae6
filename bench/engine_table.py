"""The engine's own decode step by batch and context: llama.cpp's llama-bench processing a short
prompt in micro-batches of B tokens, which runs the same matrix products as a decode step of B
streams (`-ub B`), at context 0 and at `depth` (`-d`), where attention over the earlier tokens
adds its cost. bench.predict's `measured` profile reads it: on a CPU the per-stream cost of a
step falls as the batch grows, which concurrency 1 and 2 of a sweep alone cannot show."""
from __future__ import annotations

import json
import math
import statistics
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field

from dgxready.errors import DgxReadyError

BATCHES = (1, 2, 4, 8, 16, 32, 64)
DEPTH = 512
PROMPT_TOKENS = 64
TIMEOUT_S = 600
ENGINE_PASSES = 3
SMOOTHING_NEIGHBOURS = 1


@dataclass(frozen=True)
class EnginePoint:
    batch: Annotated[int, Field(ge=1)]
    depth: Annotated[int, Field(ge=0)]
    tokens_per_s: Annotated[float, Field(gt=0)]
    stddev_tokens_per_s: Annotated[float, Field(ge=0)]

    @property
    def step_s(self) -> float:
        """One step of `batch` streams."""
        return self.batch / self.tokens_per_s


@dataclass(frozen=True)
class EngineTable:
    model_file: str
    threads: Annotated[int, Field(ge=1)]
    prompt_tokens: Annotated[int, Field(ge=1)]
    points: Annotated[list[EnginePoint], Field(min_length=1)]

    def point(self, batch: int, depth: int) -> EnginePoint | None:
        return next((p for p in self.points if p.batch == batch and p.depth == depth), None)

    @property
    def depths(self) -> list[int]:
        return sorted({p.depth for p in self.points})

    @property
    def batches(self) -> list[int]:
        """The batches measured at every depth."""
        return sorted(b for b in {p.batch for p in self.points}
                      if all(self.point(b, d) for d in self.depths))


def bench_command(binary: Path, model: Path, batches: tuple[int, ...] = BATCHES, depth: int = DEPTH,
                  repetitions: int = 3) -> list[str]:
    tokens = max(PROMPT_TOKENS, max(batches))
    return [str(binary), "-m", str(model), "-p", str(tokens), "-n", "0", "-b", str(tokens),
            "-ub", ",".join(map(str, batches)), "-d", f"0,{depth}", "-r", str(repetitions), "-o", "json"]


def typical_rate(row: dict) -> float:
    """The median of a test's repetitions, where llama-bench lists them: on a shared host one
    repetition that lost its cores pulls the mean down by a third (batch 8 at context 512 once
    averaged 104 tok/s, stddev 67, between neighbours of 197 and 227), which the model then reads
    as a slower step at that batch."""
    samples = row.get("samples_ts")
    return float(statistics.median(samples)) if samples else float(row["avg_ts"])


def parse_table(text: str, source: str) -> EngineTable:
    """llama-bench's `-o json`: one object per (ubatch, depth) test."""
    try:
        rows = json.loads(text)
        points = [EnginePoint(int(r["n_ubatch"]), int(r["n_depth"]), typical_rate(r),
                              float(r["stddev_ts"])) for r in rows]
        first = rows[0]
        table = EngineTable(str(first["model_filename"]), int(first["n_threads"]), int(first["n_prompt"]),
                            points)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise DgxReadyError(f"{source}: not llama-bench's JSON output ({type(exc).__name__}: {exc})") from None
    if not table.batches or 1 not in table.batches or any(p.tokens_per_s <= 0 for p in points):
        raise DgxReadyError(f"{source}: no batch-1 test, or a test with no tokens per second")
    return table


def merged(tables: list[EngineTable]) -> EngineTable:
    """One table from passes of the same tests: each point the median of its passes, its spread
    their standard deviation."""
    first = tables[0]
    keys = [(p.batch, p.depth) for p in first.points]
    rates = {k: [t.point(*k).tokens_per_s for t in tables if t.point(*k)] for k in keys}
    return EngineTable(first.model_file, first.threads, first.prompt_tokens,
                       [EnginePoint(b, d, float(statistics.median(rates[b, d])),
                                    statistics.stdev(rates[b, d]) if len(rates[b, d]) > 1 else 0.0)
                        for b, d in keys])


def smoothed(table: EngineTable, neighbours: int = SMOOTHING_NEIGHBOURS) -> EngineTable:
    """The table with each point's per-stream step read off a line fitted in log-log (log step per
    stream against log batch) through it and its `neighbours` batches on each side, at the same
    depth; with one neighbour, a batch between two others gets the geometric mean of the three
    per-stream steps, and the first and last batches keep their own. A point of three passes
    still moves 10-25% between runs on the 2-core VM (batch 2 at context 0: 10.9 ms in one run,
    13.4 ms in the next), and calibration divides the server's steps at 1 and 2 streams by the
    engine's, so one such point tilted every prediction. A line through three points follows a
    GPU table's bend from memory- to compute-bound (within 17% at a sharp corner), where one power
    law over all batches would flatten it."""
    points = []
    for depth in table.depths:
        row = sorted((p for p in table.points if p.depth == depth), key=lambda p: p.batch)
        x = np.log2([p.batch for p in row])
        y = -np.log([p.tokens_per_s for p in row])
        for i, point in enumerate(row):
            lo, hi = max(0, i - neighbours), min(len(row), i + neighbours + 1)
            if hi - lo < 2:
                points.append(point)
                continue
            slope, intercept = np.polyfit(x[lo:hi], y[lo:hi], 1)
            points.append(replace(point, tokens_per_s=math.exp(-(intercept + slope * x[i]))))
    return replace(table, points=points)


def run_engine_table(binary: Path, model: Path, batches: tuple[int, ...] = BATCHES, depth: int = DEPTH,
                     passes: int = ENGINE_PASSES) -> EngineTable:
    """`passes` runs over every batch of one repetition each, so that a batch's samples lie a pass
    apart (20-30 s on the 2-core VM) instead of back to back: a noisy spell on a shared host once
    slowed every repetition of batches 16-64 by 40% (the sweep's own steps at 16 agents were as
    in other runs), and the prediction erred +24% at 16 agents."""
    cmd = bench_command(binary, model, batches, depth, repetitions=1)
    return merged([parse_table(run_bench(cmd, binary), binary.name) for _ in range(passes)])


def run_bench(cmd: list[str], binary: Path) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise DgxReadyError(f"{binary.name}: no result within {TIMEOUT_S} s") from None
    except OSError as exc:
        raise DgxReadyError(f"{binary}: cannot run: {exc.strerror}") from None
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-3:])
        raise DgxReadyError(f"{binary.name} exited {done.returncode}: {tail[:300]}")
    return done.stdout
