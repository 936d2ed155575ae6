"""Provisioning bars, on disposable Debian test hosts (root, debootstrap and zstd needed), with
the whole stack (engine, multiplexer, validate):
- the idempotent re-run of the whole step list takes <= 10% of the first run;
- two hosts in parallel take <= 1.5x the wall time of one host."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console

from provision import lab
from provision.inventory import load_inventory, select
from provision.run import provision


def timed_run(inv: Path, spec: str) -> tuple[float, dict]:
    started = time.perf_counter()
    record, _ = provision(select(load_inventory(inv), spec))
    seconds = time.perf_counter() - started
    bad = [r for r in record.results if r.status == "failed"]
    if bad:
        raise SystemExit(f"provisioning failed: {bad[0].host} {bad[0].step}: {bad[0].detail}")
    return seconds, {h: record.counts(h) for h in record.hosts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    why = lab.available()
    if why:
        print(f"test hosts unavailable: {why}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="provision-bars-"))
    made = []
    try:
        entries = {}
        for name, address in (("solo", "127.0.0.41"), ("pair-a", "127.0.0.42"), ("pair-b", "127.0.0.43")):
            h = lab.make_host(work / name, name, address)
            h.start()
            made.append(h)
            entries[name] = {"address": address, "key": str(h.key), "vars": lab.lab_vars()}
        inv = work / "inventory.yaml"
        inv.write_text(yaml.safe_dump({"hosts": entries, "groups": {"pair": ["pair-a", "pair-b"]}}))
        first, _ = timed_run(inv, "solo")
        rerun, counts = timed_run(inv, "solo")
        pair, _ = timed_run(inv, "pair")
    finally:
        for h in made:
            h.destroy()
    figures = {"first_run_s": first, "rerun_s": rerun, "rerun_fraction": rerun / first,
               "rerun_changed": counts["solo"]["changed"], "two_hosts_s": pair, "parallel_ratio": pair / first}
    out = Console()
    out.print(f"first run {first:.1f} s; idempotent re-run {rerun:.1f} s = {rerun / first:.1%} of it "
              f"(bar <= 10%), changed={counts['solo']['changed']}")
    out.print(f"two hosts in parallel {pair:.1f} s = {pair / first:.2f}x one host (bar <= 1.5x)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if figures["rerun_fraction"] <= 0.10 and figures["parallel_ratio"] <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
