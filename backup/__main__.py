"""`python -m backup run|verify|snapshots|schedule --config FILE`: what the hosts run (the
`dgxready-backup` unit its timer starts, or the `schedule` loop where PID 1 is not systemd),
without invoke. Exit 0 on success, 1 with the error on stderr."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from backup.config import Resolved, load_backup_config, resolve
from backup.ops import record_run, restic_for, run_backup, verify_snapshot
from dgxready.errors import DgxReadyError
from dgxready.settings import load_settings


def say(text: str) -> None:
    print(text, flush=True)


def backup_once(resolved: Resolved, forget: bool) -> None:
    restic = restic_for(resolved)
    result = run_backup(resolved, restic, forget, say)
    path = record_run(load_settings().state_dir / "backup" / "runs", "backup", asdict(result), restic.creds)
    say(f"snapshot {result.snapshot}: {result.files} files, {result.bytes / 1e6:.1f} MB in "
        f"{result.seconds:.1f} s; record {path}")


def seconds_to_next(minutes: int, now: float) -> float:
    """Until the next wall-clock multiple of the interval, as OnCalendar would fire."""
    period = minutes * 60
    return period - (now % period)


def schedule(resolved: Resolved) -> None:
    """The timer where PID 1 is not systemd: a backup at every multiple of the interval; a
    failed one is reported and the loop goes on."""
    minutes = resolved.config.schedule_minutes
    while True:
        time.sleep(seconds_to_next(minutes, time.time()))
        try:
            backup_once(resolved, forget=True)
        except DgxReadyError as exc:
            print(f"backup failed: {exc}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backup", description=__doc__)
    parser.add_argument("action", choices=("run", "verify", "snapshots", "schedule"), help="what to do")
    parser.add_argument("--config", type=Path,
                        help="backup YAML (default: $DGXREADY_BACKUP_CONFIG or the defaults)")
    parser.add_argument("--forget", action="store_true", help="with run: then apply the retention policy")
    parser.add_argument("--snapshot", default="latest", help="with verify: snapshot id or 'latest'")
    args = parser.parse_args(argv)
    try:
        resolved = resolve(load_backup_config(args.config))
        if args.action == "run":
            backup_once(resolved, args.forget)
        elif args.action == "verify":
            result = verify_snapshot(resolved, restic_for(resolved), args.snapshot, False, say)
            say(json.dumps(asdict(result)))
        elif args.action == "snapshots":
            say(json.dumps([asdict(s) for s in restic_for(resolved).snapshots()]))
        else:
            schedule(resolved)
    except DgxReadyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
