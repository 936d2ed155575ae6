"""`invoke provision --host dgx` and `invoke provision.check`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from invoke import Collection, task
from invoke.exceptions import Exit
from rich.table import Table

from dgxready.cli import out, user_errors
from dgxready.settings import REPO_ROOT
from provision import lab
from provision.inventory import Inventory, load_inventory, select
from provision.keys import fetch_keys
from provision.run import RunRecord
from provision.run import provision as run_provision

INVENTORY_HELP = "inventory YAML (default: ./inventory.yaml)"


def targets_for(host: str, inventory: str | None):
    path = Path(inventory) if inventory else REPO_ROOT / "inventory.yaml"
    inv = load_inventory(path) if path.exists() else Inventory()
    return select(inv, host, path.name)


def print_record(record: RunRecord, path: Path) -> int:
    timing = Table(title="steps")
    for col in ("host", "step", "status", "seconds", "detail"):
        timing.add_column(col)
    colour = {"ok": "green", "changed": "yellow", "would change": "cyan", "failed": "red",
              "skipped": "dim", "undone": "magenta"}
    for r in record.results:
        detail = "\n".join(f"• {c}" for c in r.changes) if r.status == "would change" else r.detail
        status = f"[{colour.get(r.status, 'white')}]{r.status}"
        timing.add_row(r.host, r.step, status, f"{r.seconds:.1f}", detail)
    out.print(timing)
    failed = 0
    for h in record.hosts:
        c = record.counts(h)
        failed += c["failed"] > 0
        out.print(f"{h:<20} ok={c['ok']} changed={c['changed']} failed={c['failed']} skipped={c['skipped']}"
                  + (f" would-change={c['would change']}" if record.dry_run else "")
                  + (f" undone={c['undone']}" if c["undone"] else ""))
    for r in record.results:
        if r.status == "failed":
            out.print(f"[red]FAILED[/] {r.host} at {r.step}: {r.detail}")
    out.print(f"run record: {path}")
    return failed


@task(default=True, help={
    "host": "a host, a group, a comma-separated list, or an ~/.ssh/config alias",
    "inventory": INVENTORY_HELP,
    "dry_run": "read the real facts and report what would change; change nothing",
    "only": "run just this step",
    "from_": "start at this step (to resume after a failure)",
    "undo": "undo this step where it has an undo",
    "yes": "do not ask before changing hosts",
})
@user_errors
def provision(c, host, inventory=None, dry_run=False, only=None, from_=None, undo=None, yes=False):
    """Provision hosts over SSH, idempotently: facts, check, apply, verify, per step."""
    targets = targets_for(host, inventory)
    if not dry_run and not yes and not undo:
        if not sys.stdin.isatty():
            raise Exit("error: not a terminal: pass --yes to change hosts without asking", code=2)
        answer = input(f"provision {', '.join(t.name for t in targets)}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise Exit("aborted", code=1)
    record, path = run_provision(targets, only=only, start=from_, undo=undo, dry_run=dry_run)
    if print_record(record, path):
        raise Exit(code=1)


@task(help={"host": "a host, a group, a comma-separated list, or an ssh alias",
            "inventory": INVENTORY_HELP, "json": "print the checks as JSON"})
@user_errors
def check(c, host, inventory=None, json_=False):
    """DeepOps-style validation: facts and verify only, one line per check; exit 0 pass, 1 fail."""
    targets = targets_for(host, inventory)
    record, path = run_provision(targets, dry_run=True)
    lines = [{"host": r.host, "check": r.step, "pass": r.status in ("ok", "skipped"),
              "status": r.status, "detail": r.detail} for r in record.results]
    if json_:
        print(json.dumps({"checks": lines, "failed": [x for x in lines if not x["pass"]]}, indent=2))
    else:
        for x in lines:
            out.print(f"[{'green' if x['pass'] else 'red'}]{'PASS' if x['pass'] else 'FAIL'}[/] "
                      f"{x['host']} {x['check']}: {x['detail']}")
    if any(not x["pass"] for x in lines):
        raise Exit(code=1)


@task(help={"host": "one host from the inventory", "inventory": INVENTORY_HELP,
            "output": "where to write the keys (mode 600; default: <state dir>/keys/<host>-agent-keys.yaml)"})
@user_errors
def keys(c, host, inventory=None, output=None):
    """Fetch the agent keys generated on a provisioned host (never printed)."""
    targets = targets_for(host, inventory)
    if len(targets) != 1:
        raise Exit(f"error: --host {host!r} selects {len(targets)} hosts; name one", code=2)
    path = fetch_keys(targets[0], Path(output) if output else None)
    out.print(f"agent keys of {targets[0].name} in {path} (mode 600)")


@task(name="lab-up", help={"count": "how many test hosts", "inventory": "inventory file to write (lab.yaml)"})
@user_errors
def lab_up(c, count=2, inventory="lab.yaml"):
    """Start disposable Debian test hosts (root, debootstrap, zstd) and write their inventory."""
    require_lab()
    lab.up(int(count), Path(inventory))


@task(name="lab-down", help={"inventory": "the inventory lab-up wrote"})
@user_errors
def lab_down(c, inventory="lab.yaml"):
    """Stop the test hosts lab-up started and delete them."""
    lab.down(Path(inventory))


def require_lab() -> None:
    why = lab.available()
    if why:
        raise Exit(f"error: test hosts cannot run here: {why}", code=1)


ns = Collection("provision")
ns.add_task(provision, default=True)
for t in (check, keys, lab_up, lab_down):
    ns.add_task(t)
