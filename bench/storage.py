"""Storage I/O on a folder's filesystem: sequential write and read at 1 MiB, random 4 KiB reads
at queue depth 1 and at a higher depth (one thread per outstanding I/O, like fio's psync with
numjobs). O_DIRECT where the filesystem allows it; otherwise the result is labelled buffered."""
from __future__ import annotations

import errno
import mmap
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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


def seq_write(path: Path, size: int, block: int = MiB) -> IoResult:
    fd, mode = open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    buf = mmap.mmap(-1, block)
    buf.write(os.urandom(block))
    lat = []
    try:
        started = time.perf_counter()
        for offset in range(0, size, block):
            t = time.perf_counter()
            os.pwritev(fd, [buf], offset)
            lat.append(time.perf_counter() - t)
        os.fsync(fd)
        seconds = time.perf_counter() - started
    finally:
        os.close(fd)
    return _result("seq_write_1m", block, 1, mode, lat, seconds)


def seq_read(path: Path, size: int, block: int = MiB) -> IoResult:
    fd, mode = open_direct(path, os.O_RDONLY)
    buf = mmap.mmap(-1, block)
    lat = []
    try:
        started = time.perf_counter()
        for offset in range(0, size, block):
            t = time.perf_counter()
            os.preadv(fd, [buf], offset)
            lat.append(time.perf_counter() - t)
        seconds = time.perf_counter() - started
    finally:
        os.close(fd)
    return _result("seq_read_1m", block, 1, mode, lat, seconds)


def rand_read(path: Path, size: int, queue_depth: int, seconds: float, block: int = PAGE,
              seed: int = 0) -> IoResult:
    fd, mode = open_direct(path, os.O_RDONLY)
    blocks = size // block
    deadline = time.perf_counter() + seconds

    def job(j: int) -> list[float]:
        rng = random.Random(f"{seed}:{j}")
        buf = mmap.mmap(-1, block)
        lat = []
        while time.perf_counter() < deadline:
            offset = rng.randrange(blocks) * block
            t = time.perf_counter()
            os.preadv(fd, [buf], offset)
            lat.append(time.perf_counter() - t)
        return lat

    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(queue_depth) as pool:
            lats = [x for part in pool.map(job, range(queue_depth)) for x in part]
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
    return _result(f"rand_read_4k_qd{queue_depth}", block, queue_depth, mode, lats, elapsed)


def run_storage(folder: Path, size: int = 1024 * MiB, rand_seconds: float = 3.0,
                high_qd: int = 16) -> StorageResult:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".dgxready-io-{os.getpid()}.bin"
    try:
        jobs = [seq_write(path, size), seq_read(path, size),
                rand_read(path, size, 1, rand_seconds), rand_read(path, size, high_qd, rand_seconds)]
    finally:
        path.unlink(missing_ok=True)
    mode = "direct" if all(j.mode == "direct" for j in jobs) else "buffered"
    return StorageResult(str(folder), size, mode, jobs)
