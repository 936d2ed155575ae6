"""Steps and the runner. A step reads facts, checks them against the desired state, and only
then applies, verifies, or undoes (pyinfra's facts/operations split, Ansible's result states)."""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fabric import Connection
from invoke.exceptions import UnexpectedExit

from dgxready.errors import DgxReadyError
from provision.inventory import Target


class StepFailed(DgxReadyError):
    pass


def q(*args: object) -> str:
    """Every argument shell-quoted; nothing from the inventory reaches a shell unquoted."""
    return " ".join(shlex.quote(str(a)) for a in args)


@dataclass
class Host:
    """A connection plus the host's variables; all remote work goes through `sh`."""
    target: Target
    conn: Connection
    sudo_password: str | None = None
    log: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    @property
    def vars(self):
        return self.target.entry.vars

    @property
    def name(self) -> str:
        return self.target.name

    def sh(self, script: str, check: bool = True, stdin: str | None = None) -> tuple[int, str, str]:
        """Run a `bash -euo pipefail` script (as root through sudo when the user is not root)."""
        cmd = f"bash -euo pipefail -c {shlex.quote(script)}"
        self.log.append(script)
        try:
            if self.target.entry.sudo and self.target.entry.user != "root":
                r = self.conn.sudo(cmd, hide=True, warn=not check, password=self.sudo_password, in_stream=False)
            else:
                r = self.conn.run(cmd, hide=True, warn=not check, in_stream=False)
        except UnexpectedExit as exc:
            res = exc.result
            raise StepFailed(f"exit {res.exited}: {script[:200]}\n{res.stderr[-1500:]}") from None
        return r.exited, r.stdout, r.stderr

    def ok(self, script: str) -> bool:
        return self.sh(script, check=False)[0] == 0

    def put(self, local: Path, remote: str) -> None:
        self.conn.put(str(local), remote)


@dataclass(frozen=True)
class Change:
    """What a step would do; empty means the host is already as it should be."""
    items: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.items)

    def describe(self) -> str:
        return "; ".join(self.items)


class Step(Protocol):
    name: str

    def skip_reason(self, host: Host) -> str | None: ...
    def check(self, host: Host) -> Change: ...
    def apply(self, host: Host, change: Change) -> str: ...
    def verify(self, host: Host) -> None: ...
    def undo(self, host: Host) -> str | None: ...


@dataclass
class StepResult:
    host: str
    step: str
    status: str
    seconds: float
    detail: str = ""
    stdout_tail: str = ""
    stderr_tail: str = ""


def run_step(step: Step, host: Host, dry_run: bool) -> StepResult:
    started = time.monotonic()
    elapsed = lambda: time.monotonic() - started  # noqa: E731
    try:
        reason = step.skip_reason(host)
        if reason:
            return StepResult(host.name, step.name, "skipped", elapsed(), reason)
        change = step.check(host)
        if not change:
            return StepResult(host.name, step.name, "ok", elapsed(), "no change")
        if dry_run:
            return StepResult(host.name, step.name, "would change", elapsed(), change.describe())
        how = step.apply(host, change)
        step.verify(host)
        return StepResult(host.name, step.name, "changed", elapsed(),
                          change.describe() + (f" ({how})" if how else ""))
    except StepFailed as exc:
        text = str(exc)
        return StepResult(host.name, step.name, "failed", elapsed(), text.splitlines()[0][:300],
                          stderr_tail=text[-2000:])
    except (OSError, EOFError) as exc:
        return StepResult(host.name, step.name, "failed", elapsed(), f"{host.name}: connection: {exc}")
    except Exception as exc:  # noqa: BLE001 - a bug in one step must not stop other hosts
        return StepResult(host.name, step.name, "failed", elapsed(),
                          f"{host.name}: {exc.__class__.__name__}: {exc}"[:300])
