"""`invoke backup.run`, `backup.restore`, `backup.verify`, `backup.snapshots`, `backup.drill`."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from invoke import Collection, task
from invoke.exceptions import Exit
from rich.markup import escape
from rich.table import Table

from agents.config import load_config
from agents.service import DEFAULT_CONFIG
from agents.tasks import backend_for
from backup.config import Resolved, load_backup_config, resolve
from backup.drill import DrillOptions, print_report, run_drill
from backup.ops import record_run, restic_for, restore_snapshot, run_backup, verify_snapshot
from dgxready.cli import out, user_errors
from dgxready.settings import load_settings

CONFIG_HELP = "backup YAML (default: $DGXREADY_BACKUP_CONFIG, else ./backup.yaml, else the defaults)"


def say(text: str) -> None:
    out.print(escape(text), highlight=False)


def resolved_config(config: str | None) -> Resolved:
    return resolve(load_backup_config(Path(config) if config else None))


def records_dir() -> Path:
    return load_settings().state_dir / "backup"


@task(help={"config": CONFIG_HELP,
            "forget": "then apply the retention policy (restic forget --prune with the keep-* counts)"})
@user_errors
def run(c, config=None, forget=False):
    """Capture the databases (SQLite backup API) and files into staging, snapshot them with restic."""
    resolved = resolved_config(config)
    restic = restic_for(resolved)
    result = run_backup(resolved, restic, bool(forget), say)
    for line in result.skipped:
        say(f"skipped {line}")
    path = record_run(records_dir() / "runs", "backup", asdict(result), restic.creds)
    say(f"snapshot {result.snapshot}: {result.files} files, {result.bytes / 1e6:.1f} MB "
        f"({result.added_bytes / 1e6:.1f} MB new) in {result.seconds:.1f} s; record {path}")


@task(help={"config": CONFIG_HELP, "snapshot": "snapshot id (a prefix will do) or 'latest'",
            "target": "restore under this folder instead of over the original paths"})
@user_errors
def restore(c, snapshot="latest", config=None, target=None):
    """restic check, restore into staging, verify sha256 and integrity_check, then swap into place."""
    resolved = resolved_config(config)
    restic = restic_for(resolved)
    result = restore_snapshot(resolved, restic, snapshot, Path(target) if target else None, say)
    path = record_run(records_dir() / "runs", "restore", asdict(result), restic.creds)
    say(f"restored snapshot {result.snapshot}: {result.files} files to {result.target} in "
        f"{result.seconds:.1f} s; record {path}")


@task(help={"config": CONFIG_HELP, "snapshot": "snapshot id (a prefix will do) or 'latest'",
            "read_data": "restic check --read-data: read and decrypt every pack, not only the structure"})
@user_errors
def verify(c, snapshot="latest", config=None, read_data=False):
    """restic check, then restore the snapshot into staging and check it against its manifest."""
    resolved = resolved_config(config)
    restic = restic_for(resolved)
    result = verify_snapshot(resolved, restic, snapshot, bool(read_data), say)
    title = f"snapshot {result.snapshot}: {result.files} files, {result.bytes / 1e6:.1f} MB verified"
    table = Table(title=title)
    table.add_column("database")
    table.add_column("integrity_check")
    for db, check in result.databases.items():
        table.add_row(db, check)
    out.print(table)


@task(help={"config": CONFIG_HELP, "json": "print the snapshots as JSON"})
@user_errors
def snapshots(c, config=None, json_=False):
    """The repository's dgxready snapshots, oldest first."""
    resolved = resolved_config(config)
    snaps = restic_for(resolved).snapshots()
    if json_:
        print(json.dumps([asdict(s) for s in snaps], indent=2))
        return
    table = Table(title=f"{len(snaps)} snapshots")
    for col in ("id", "time", "host"):
        table.add_column(col)
    for s in snaps:
        table.add_row(s.short_id, s.time[:19], s.hostname)
    out.print(table)


@task(help={"config": CONFIG_HELP,
            "mux_config": "multiplexer YAML whose backends serve the drill (default agents/multiplexer.yaml; "
                          "the default model is started when none answers)",
            "workdir": "drill folder (default: a new one under <cache dir>/backup-drill)",
            "agents": "agents sending turns and tool calls during the backup",
            "output": "report JSON (default: <state dir>/backup/drills/<timestamp>.json)",
            "keep": "keep the drill folder (its scratch repository and password) afterwards"})
@user_errors
def drill(c, config=None, mux_config=None, workdir=None, agents=4, output=None, keep=False):
    """Disaster-recovery drill on a scratch copy: back up under traffic, destroy, restore, verify, RTO/RPO."""
    backup_config = load_backup_config(Path(config) if config else None)
    mux = load_config(Path(mux_config) if mux_config else DEFAULT_CONFIG)
    options = DrillOptions(agents=int(agents), workdir=Path(workdir) if workdir else None,
                           output=Path(output) if output else None, keep=bool(keep))
    with backend_for(mux, max(2, int(agents))) as live:
        report, path = run_drill(backup_config, live.backends, options, say)
    print_report(out, report, path)
    if not report["passed"]:
        raise Exit(code=1)


ns = Collection("backup")
for t in (run, restore, verify, snapshots, drill):
    ns.add_task(t)
