"""`python -m bench.storage_cli FOLDER`: bench.storage's jobs (the ones bench.micro runs) on
FOLDER's filesystem, printed as one JSON object; provisioning records it for the model store."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from bench.storage import MiB, run_storage


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.storage_cli", description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--size-mib", type=int, default=256, help="test file size (bench.micro: 1024)")
    parser.add_argument("--rand-seconds", type=float, default=1.0, help="each random-read job (bench.micro: 3)")
    parser.add_argument("--queue-depth", type=int, default=16, help="the higher random-read depth")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run_storage(args.folder, size=args.size_mib * MiB, rand_seconds=args.rand_seconds,
                         high_qd=args.queue_depth)
    json.dump(asdict(result), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
