"""bench.storage against fio with the same job parameters: psync (one outstanding I/O per
job), direct=1, sequential write and read at 1 MiB over one file, random 4 KiB reads with 1 job
and with N jobs (our N threads). Needs `apt-get install fio`."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.accuracy import Comparison, report
from bench.storage import rand_read, seq_read, seq_write
from dgxready.settings import load_settings

MiB = 1 << 20


def fio(name: str, path: Path, rw: str, bs: str, size: int, jobs: int = 1,
        seconds: float | None = None) -> dict:
    cmd = ["fio", f"--name={name}", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
           f"--size={size}", "--ioengine=psync", "--direct=1", f"--numjobs={jobs}",
           "--group_reporting", "--output-format=json"]
    if rw == "write":
        cmd += ["--end_fsync=1", "--fallocate=native"]
    if seconds:
        cmd += ["--time_based", f"--runtime={seconds}", "--ramp_time=0"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    job = out["jobs"][0]
    side = job["write"] if rw == "write" else job["read"]
    return {"mbps": side["bw_bytes"] / 1e6, "iops": side["iops"]}


def compare(folder: Path, size: int, seconds: float, qd: int, rounds: int = 3) -> list[Comparison]:
    """Each job runs `rounds` times per tool, alternating which goes first; best of each compared."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".dgxready-accuracy-{os.getpid()}.bin"
    jobs = [
        ("seq write 1M MB/s", "mbps", lambda: seq_write(path, size, seconds=seconds).bandwidth_mbps,
         lambda: fio("seqwrite", path, "write", "1M", size, 1, seconds)),
        ("seq read 1M MB/s", "mbps", lambda: seq_read(path, size, seconds=seconds).bandwidth_mbps,
         lambda: fio("seqread", path, "read", "1M", size, 1, seconds)),
        ("rand read 4k QD1 IOPS", "iops", lambda: rand_read(path, size, 1, seconds).iops,
         lambda: fio("randread1", path, "randread", "4k", size, 1, seconds)),
        (f"rand read 4k QD{qd} IOPS", "iops", lambda: rand_read(path, size, qd, seconds).iops,
         lambda: fio(f"randread{qd}", path, "randread", "4k", size, qd, seconds)),
    ]
    rows = []
    try:
        for metric, key, ours_fn, fio_fn in jobs:
            ours, ref = 0.0, 0.0
            for r in range(rounds):
                # Alternate who goes first, so neither tool always reads a cache the other warmed.
                if r % 2:
                    ref = max(ref, fio_fn()[key])
                    ours = max(ours, ours_fn())
                else:
                    ours = max(ours, ours_fn())
                    ref = max(ref, fio_fn()[key])
            rows.append(Comparison(metric, ours, ref, "fio", 0.15))
    finally:
        path.unlink(missing_ok=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=None, help="folder to test (default: model store)")
    parser.add_argument("--size-mib", type=int, default=1024, help="test file size in MiB")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each job (time based)")
    parser.add_argument("--qd", type=int, default=16, help="the higher queue depth (threads/jobs)")
    args = parser.parse_args()
    if not shutil.which("fio"):
        print("fio is not installed: apt-get install fio", file=sys.stderr)
        return 2
    folder = args.dir or load_settings().models_dir
    return report(f"storage on {folder}: dgxready vs fio",
                  compare(folder, args.size_mib * MiB, args.seconds, args.qd))


if __name__ == "__main__":
    sys.exit(main())
