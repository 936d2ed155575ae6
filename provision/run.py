"""Provision hosts in parallel: one host's failure stops no other. Prints Ansible-style counts
and a timing table, and keeps a JSON run record (updated after every step)."""
from __future__ import annotations

import getpass
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fabric import Connection

from dgxready.errors import DgxReadyError
from dgxready.files import atomic_write_json
from dgxready.settings import Settings, load_settings
from model.catalog import load_catalog
from provision.artifacts import controller_artifacts
from provision.core import Host, Step, StepResult, run_step
from provision.inventory import Target
from provision.steps import all_steps


@dataclass
class RunRecord:
    started_at: str
    hosts: list[str]
    dry_run: bool
    mode: str
    results: list[StepResult] = field(default_factory=list)
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, res: StepResult, path: Path) -> None:
        with self.lock:
            self.results.append(res)
            self.save(path)

    def save(self, path: Path) -> None:
        data = {"started_at": self.started_at, "hosts": self.hosts, "dry_run": self.dry_run,
                "mode": self.mode, "finished": self.finished, "results": [asdict(r) for r in self.results]}
        atomic_write_json(path, data)

    def counts(self, host: str) -> dict[str, int]:
        out = {"ok": 0, "changed": 0, "would change": 0, "failed": 0, "skipped": 0, "undone": 0}
        for r in self.results:
            if r.host == host:
                out[r.status] = out.get(r.status, 0) + 1
        return out


def engines_for(targets: list[Target], model: str) -> dict[str, str | None]:
    """The engine each host serves with, and the format asked for it (one per engine and run)."""
    entry = load_catalog().model(model)
    has_vllm = bool(entry.formats_for("vllm"))
    chosen: dict[str, str | None] = {}
    for t in targets:
        engine = "vllm" if has_vllm and t.entry.vars.profile != "cpu-only" else "llamacpp"
        fmt = t.entry.vars.model_format
        if fmt is not None and fmt not in entry.formats_for(engine):
            raise DgxReadyError(f"{t.name}: vars.model_format: {model} has no {engine} format {fmt!r}; "
                                f"it has {', '.join(entry.formats_for(engine))}")
        if chosen.get(engine, fmt) != fmt:
            raise DgxReadyError(f"{t.name}: vars.model_format: one {engine} format per run, please: "
                                f"{chosen[engine]} and {fmt}")
        chosen[engine] = fmt
    return chosen


def steps_for(targets: list[Target], model: str, settings: Settings) -> list[Step]:
    art = controller_artifacts(settings, model, engines_for(targets, model))
    return all_steps(art.llama, art.formats, art.app, art.pins, settings.serve.vllm_image, art.repro)


def select_steps(steps: list[Step], only: str | None, start: str | None) -> list[Step]:
    names = [s.name for s in steps]
    for flag, value in (("--only", only), ("--from", start)):
        if value and value not in names:
            raise DgxReadyError(f"{flag} {value!r}: steps are {', '.join(names)}")
    if only:
        return [s for s in steps if s.name == only]
    if start:
        return steps[names.index(start):]
    return steps


def connect(target: Target) -> Connection:
    e = target.entry
    kwargs = {"timeout": 10, "banner_timeout": 10, "auth_timeout": 10}
    if e.key:
        kwargs |= {"key_filename": str(Path(e.key).expanduser()), "look_for_keys": False,
                   "allow_agent": False}
    if e.address == target.name and not e.key:
        return Connection(target.name, connect_kwargs=kwargs)
    return Connection(e.address, user=e.user, port=e.port, connect_kwargs=kwargs)


def provision_host(target: Target, steps: list[Step], dry_run: bool, undo: bool, record: RunRecord,
                   record_path: Path, sudo_password: str | None) -> None:
    try:
        conn = connect(target)
        conn.open()
    except Exception as exc:  # noqa: BLE001 - every connection failure is this host's failure
        record.add(StepResult(target.name, "connect", "failed", 0.0,
                              f"{target.name} ({target.entry.address}:{target.entry.port}): cannot connect: "
                              f"{exc.__class__.__name__}: {exc}"), record_path)
        return
    host = Host(target, conn, sudo_password)
    pending = False
    try:
        for step in steps:
            if undo:
                started = time.monotonic()
                try:
                    what = step.undo(host)
                    res = StepResult(target.name, step.name, "undone" if what else "skipped",
                                     time.monotonic() - started, what or "this step has no undo")
                except Exception as exc:  # noqa: BLE001
                    res = StepResult(target.name, step.name, "failed", time.monotonic() - started, str(exc))
            elif dry_run and step.needs_converged and pending:
                res = StepResult(target.name, step.name, "skipped", 0.0,
                                 "checks the finished stack: runs once the changes above are applied")
            else:
                res = run_step(step, host, dry_run)
            record.add(res, record_path)
            pending = pending or res.status == "would change"
            if res.status == "failed" and not dry_run:
                break
    finally:
        conn.close()


def sudo_password_for(targets: list[Target], ask: bool) -> str | None:
    needs = [t for t in targets if t.entry.sudo and t.entry.user != "root"]
    if not needs:
        return None
    if os.environ.get("DGXREADY_SUDO_PASSWORD"):
        return os.environ["DGXREADY_SUDO_PASSWORD"]
    if not ask:
        return None
    return getpass.getpass(f"sudo password for {', '.join(t.name for t in needs)}: ")


def provision(targets: list[Target], only: str | None = None, start: str | None = None,
              undo: str | None = None, dry_run: bool = False, settings: Settings | None = None,
              ask_sudo: bool = True, steps: list[Step] | None = None) -> tuple[RunRecord, Path]:
    settings = settings or load_settings()
    models = {t.entry.vars.model for t in targets}
    if len(models) != 1:
        raise DgxReadyError(f"one model per run, please: the hosts ask for {', '.join(sorted(models))}")
    if steps is None:
        steps = steps_for(targets, models.pop(), settings)
    chosen = select_steps(steps, undo or only, None if undo else start)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    record = RunRecord(stamp, [t.name for t in targets], dry_run, "undo" if undo else "apply")
    path = settings.state_dir / "provision" / f"{stamp}-{os.getpid()}.json"
    record.save(path)
    password = sudo_password_for(targets, ask_sudo)
    with ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:
        list(pool.map(lambda t: provision_host(t, chosen, dry_run, bool(undo), record, path, password),
                      targets))
    record.finished = True
    record.save(path)
    return record, path
