"""STREAM copy (numpy, 1 thread) against mbw's DUMB copy loop (the same kernel as STREAM's
`c[j] = a[j]`) on arrays of the same size. mbw counts each copied byte once; STREAM counts the
read and the write, so mbw's MiB/s is doubled before comparing. Needs `apt-get install mbw`."""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

from bench.accuracy import Comparison, report
from bench.hw import last_level_cache
from bench.stream import array_elements, run_stream


def mbw_best_mib_s(array_mib: int, runs: int, method: int = 1) -> float:
    out = subprocess.run(["mbw", "-q", "-n", str(runs), f"-t{method}", str(array_mib)],
                         capture_output=True, text=True, check=True).stdout
    rates = [float(m) for m in re.findall(r"^\d+\s.*Copy:\s+([\d.]+) MiB/s", out, re.M)]
    return max(rates)


def compare(runs: int = 7) -> list[Comparison]:
    elements = array_elements(last_level_cache())
    array_mib = elements * 8 // 2**20
    ours = run_stream(None, threads=1, repetitions=runs, elements=elements).best_gbps["copy"]
    mbw = mbw_best_mib_s(array_mib, runs) * 2**20 * 2 / 1e9
    return [Comparison(f"copy GB/s (1 thread, {array_mib} MiB arrays)", ours, mbw, "mbw -t1", 0.10)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7, help="best of this many runs, both tools")
    args = parser.parse_args()
    if not shutil.which("mbw"):
        print("mbw is not installed: apt-get install mbw", file=sys.stderr)
        return 2
    return report("memory bandwidth: dgxready STREAM vs mbw", compare(args.runs))


if __name__ == "__main__":
    sys.exit(main())
