"""Storage I/O on a folder's filesystem: sequential write and read at 1 MiB, random 4 KiB reads
at queue depth 1 and at a higher depth (one process per outstanding I/O, like fio's psync with
numjobs; processes, because threads would serialise on the GIL). O_DIRECT where the filesystem
allows it; otherwise the result is labelled buffered. The file is preallocated, as fio does."""
from __future__ import annotations

import errno
import mmap
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

MiB = 1 << 20
PAGE = 4096


@dataclass(frozen=True)
class IoResult:
    name: str
    block_bytes: int
    queue_depth: int
    mode: str
    bandwidth_mbps: float
    iops: float
    clat_p50_us: float
    clat_p99_us: float
    seconds: float


@dataclass(frozen=True)
class StorageResult:
    path: str
    file_bytes: int
    mode: str
    jobs: list[IoResult]


def open_direct(path: Path, flags: int) -> tuple[int, str]:
    try:
        return os.open(path, flags | getattr(os, "O_DIRECT", 0)), "direct"
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return os.open(path, flags), "buffered"


def _result(name, block, qd, mode, lat, seconds) -> IoResult:
    lat_us = np.asarray(lat) * 1e6
    return IoResult(name, block, qd, mode, len(lat) * block / seconds / 1e6, len(lat) / seconds,
                    float(np.percentile(lat_us, 50)), float(np.percentile(lat_us, 99)), seconds)


def _sequential(fd: int, size: int, block: int, seconds: float | None,
                write: bool) -> tuple[list[float], float]:
    """One pass over the file, or passes until `seconds` have gone by (fio's time_based)."""
    buf = mmap.mmap(-1, block)
    if write:
        buf.write(os.urandom(block))
    op = os.pwritev if write else os.preadv
    lat, clock = [], time.perf_counter
    started = clock()
    deadline = started + seconds if seconds else None
    offset = 0
    while True:
        t = clock()
        op(fd, [buf], offset)
        lat.append(clock() - t)
        offset += block
        if offset >= size:
            if deadline is None:
                break
            offset = 0
        if deadline is not None and t >= deadline:
            break
    if write:
        os.fsync(fd)
    return lat, clock() - started


def seq_write(path: Path, size: int, block: int = MiB, seconds: float | None = None) -> IoResult:
    fd, mode = open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:
            pass
        lat, elapsed = _sequential(fd, size, block, seconds, write=True)
    finally:
        os.close(fd)
    return _result("seq_write_1m", block, 1, mode, lat, elapsed)


def seq_read(path: Path, size: int, block: int = MiB, seconds: float | None = None) -> IoResult:
    fd, mode = open_direct(path, os.O_RDONLY)
    try:
        lat, elapsed = _sequential(fd, size, block, seconds, write=False)
    finally:
        os.close(fd)
    return _result("seq_read_1m", block, 1, mode, lat, elapsed)


def _rand_job(path: str, size: int, block: int, seconds: float, seed: str,
              start_at: float) -> tuple[str, list[float]]:
    fd, mode = open_direct(Path(path), os.O_RDONLY)
    buf = mmap.mmap(-1, block)
    offsets = (np.random.default_rng(abs(hash(seed)) % 2**32)
               .integers(0, size // block, 1 << 20) * block).tolist()
    lat = []
    append, preadv, clock = lat.append, os.preadv, time.perf_counter
    while clock() < start_at:
        time.sleep(0.001)
    deadline = start_at + seconds
    try:
        for offset in offsets:
            t = clock()
            if t >= deadline:
                break
            preadv(fd, [buf], offset)
            append(clock() - t)
    finally:
        os.close(fd)
    return mode, lat


def rand_read(path: Path, size: int, queue_depth: int, seconds: float, block: int = PAGE,
              seed: int = 0) -> IoResult:
    start_at = time.perf_counter() + 0.3
    if queue_depth == 1:
        parts = [_rand_job(str(path), size, block, seconds, f"{seed}:0", start_at)]
    else:
        with ProcessPoolExecutor(queue_depth, mp_context=get_context("fork")) as pool:
            start_at = time.perf_counter() + 0.5
            futures = [pool.submit(_rand_job, str(path), size, block, seconds, f"{seed}:{j}",
                                   start_at) for j in range(queue_depth)]
            parts = [f.result() for f in futures]
    lats = [x for _, lat in parts for x in lat]
    mode = "direct" if all(m == "direct" for m, _ in parts) else "buffered"
    return _result(f"rand_read_4k_qd{queue_depth}", block, queue_depth, mode, lats, seconds)


def run_storage(folder: Path, size: int = 1024 * MiB, rand_seconds: float = 3.0,
                high_qd: int = 16, seq_seconds: float | None = None) -> StorageResult:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".dgxready-io-{os.getpid()}.bin"
    try:
        jobs = [seq_write(path, size, seconds=seq_seconds), seq_read(path, size, seconds=seq_seconds),
                rand_read(path, size, 1, rand_seconds), rand_read(path, size, high_qd, rand_seconds)]
    finally:
        path.unlink(missing_ok=True)
    mode = "direct" if all(j.mode == "direct" for j in jobs) else "buffered"
    return StorageResult(str(folder), size, mode, jobs)
