"""Storage I/O on a folder's filesystem: sequential write and read at 1 MiB, random 4 KiB reads
at queue depth 1 and at a higher depth (one process per outstanding I/O, like fio's psync with
numjobs; processes, because threads would serialise on the GIL). O_DIRECT where the filesystem
allows it; otherwise the result is labelled buffered. The file is preallocated, as fio does."""
from __future__ import annotations

import errno
import mmap
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

MiB = 1 << 20
PAGE = 4096
WINDOWS = 10


@dataclass(frozen=True)
class IoResult:
    """`iops_samples` is the IOPS of each of WINDOWS equal slices of the job's time, so that two
    runs can be compared against the job's own spread (None in older baselines)."""
    name: str
    block_bytes: int
    queue_depth: int
    mode: str
    bandwidth_mbps: float
    iops: float
    clat_p50_us: float
    clat_p99_us: float
    seconds: float
    iops_samples: list[float] | None = None


@dataclass(frozen=True)
class JobTimes:
    """Each I/O's latency and its completion time, in seconds from the job's start, and when
    the job's first I/O went out."""
    latencies_s: list[float]
    done_at_s: list[float]
    began_at_s: float = 0.0

    def since(self, start_s: float) -> JobTimes:
        """The I/Os completed from `start_s` on, timed from it."""
        kept = [(lat, done - start_s) for lat, done in zip(self.latencies_s, self.done_at_s, strict=True)
                if done >= start_s]
        return JobTimes([lat for lat, _ in kept], [done for _, done in kept], 0.0)


def merged(parts: list[JobTimes], seconds: float) -> tuple[JobTimes, float]:
    """All jobs' I/Os over the time every job was running: a job that a loaded machine forked
    late would otherwise leave the first windows short of I/Os, and the IOPS low."""
    everyone_from = max(p.began_at_s for p in parts)
    if everyone_from >= seconds:
        everyone_from = 0.0
    times = JobTimes([x for p in parts for x in p.latencies_s], [x for p in parts for x in p.done_at_s])
    return times.since(everyone_from), seconds - everyone_from


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


def iops_per_window(done_at_s: list[float], seconds: float, windows: int = WINDOWS) -> list[float]:
    counts, _ = np.histogram(done_at_s, bins=windows, range=(0.0, seconds))
    return (counts / (seconds / windows)).tolist()


def _result(name, block, qd, mode, times: JobTimes, seconds) -> IoResult:
    lat_us = np.asarray(times.latencies_s) * 1e6
    ops = len(times.latencies_s)
    return IoResult(name, block, qd, mode, ops * block / seconds / 1e6, ops / seconds,
                    float(np.percentile(lat_us, 50)), float(np.percentile(lat_us, 99)), seconds,
                    iops_per_window(times.done_at_s, seconds))


def _sequential(fd: int, size: int, block: int, seconds: float | None,
                write: bool) -> tuple[JobTimes, float]:
    """One pass over the file, or passes until `seconds` have gone by (fio's time_based)."""
    buf = mmap.mmap(-1, block)
    if write:
        buf.write(os.urandom(block))
    op = os.pwritev if write else os.preadv
    lat, done, clock = [], [], time.perf_counter
    started = clock()
    deadline = started + seconds if seconds else None
    offset = 0
    while True:
        t = clock()
        op(fd, [buf], offset)
        end = clock()
        lat.append(end - t)
        done.append(end - started)
        offset += block
        if offset >= size:
            if deadline is None:
                break
            offset = 0
        if deadline is not None and t >= deadline:
            break
    if write:
        os.fsync(fd)
    return JobTimes(lat, done), clock() - started


def seq_write(path: Path, size: int, block: int = MiB, seconds: float | None = None) -> IoResult:
    fd, mode = open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:
            pass
        times, elapsed = _sequential(fd, size, block, seconds, write=True)
    finally:
        os.close(fd)
    return _result("seq_write_1m", block, 1, mode, times, elapsed)


def seq_read(path: Path, size: int, block: int = MiB, seconds: float | None = None) -> IoResult:
    fd, mode = open_direct(path, os.O_RDONLY)
    try:
        times, elapsed = _sequential(fd, size, block, seconds, write=False)
    finally:
        os.close(fd)
    return _result("seq_read_1m", block, 1, mode, times, elapsed)


def random_offsets(seed: str, size: int, block: int, batch: int = 4096) -> Iterator[int]:
    """Block-aligned offsets, drawn a batch at a time so that a job starts at once."""
    rng = np.random.default_rng(abs(hash(seed)) % 2**32)
    while True:
        yield from (rng.integers(0, size // block, batch) * block).tolist()


def _rand_job(path: str, size: int, block: int, seconds: float, seed: str,
              start_at: float) -> tuple[str, JobTimes]:
    fd, mode = open_direct(Path(path), os.O_RDONLY)
    buf = mmap.mmap(-1, block)
    offsets = random_offsets(seed, size, block)
    lat, done = [], []
    append, done_at, preadv, clock = lat.append, done.append, os.preadv, time.perf_counter
    while clock() < start_at:
        time.sleep(0.001)
    began = clock() - start_at
    deadline = start_at + seconds
    try:
        for offset in offsets:
            t = clock()
            if t >= deadline:
                break
            preadv(fd, [buf], offset)
            end = clock()
            append(end - t)
            done_at(end - start_at)
    finally:
        os.close(fd)
    return mode, JobTimes(lat, done, began)


def _pause(seconds: float) -> None:
    time.sleep(seconds)


def rand_read(path: Path, size: int, queue_depth: int, seconds: float, block: int = PAGE,
              seed: int = 0) -> IoResult:
    start_at = time.perf_counter() + 0.3
    if queue_depth == 1:
        parts = [_rand_job(str(path), size, block, seconds, f"{seed}:0", start_at)]
    else:
        with ProcessPoolExecutor(queue_depth, mp_context=get_context("fork")) as pool:
            list(pool.map(_pause, [0.05] * queue_depth))   # fork every worker before the clock starts
            start_at = time.perf_counter() + 0.5
            futures = [pool.submit(_rand_job, str(path), size, block, seconds, f"{seed}:{j}",
                                   start_at) for j in range(queue_depth)]
            parts = [f.result() for f in futures]
    times, span = merged([t for _, t in parts], seconds)
    mode = "direct" if all(m == "direct" for m, _ in parts) else "buffered"
    return _result(f"rand_read_4k_qd{queue_depth}", block, queue_depth, mode, times, span)


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
