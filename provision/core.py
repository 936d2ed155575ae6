"""Hosts, facts and the step runner. A fact is a command plus a parser, read once per host and run
and dropped after an apply; a step compares facts with the desired state and returns typed
changes, then acts only on those (pyinfra's facts/operations split, Ansible's result states)."""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from fabric import Connection
from invoke.exceptions import UnexpectedExit

from dgxready.errors import DgxReadyError
from provision.inventory import HostVars, Target

T = TypeVar("T")


class StepFailed(DgxReadyError):
    pass


def q(*args: object) -> str:
    """Every argument shell-quoted; nothing from the inventory reaches a shell unquoted."""
    return " ".join(shlex.quote(str(a)) for a in args)


@dataclass(frozen=True)
class Fact(Generic[T]):
    """A command run on the host and a parser of its exit code and output. Subclasses are frozen
    dataclasses, so a fact with its arguments is its own cache key."""

    def command(self) -> str:
        raise NotImplementedError

    def process(self, code: int, stdout: str) -> T:
        raise NotImplementedError


@dataclass
class Host:
    """A connection plus the host's variables; all remote work goes through `sh`, all reading
    through `fact`. With no connection, only facts given up front can be read (fixture tests)."""
    target: Target
    conn: Connection | None
    sudo_password: str | None = None
    log: list[str] = field(default_factory=list)
    cache: dict[Fact, Any] = field(default_factory=dict)

    @classmethod
    def offline(cls, target: Target, facts: dict[Fact, Any]) -> Host:
        return cls(target, None, cache=dict(facts))

    @property
    def vars(self) -> HostVars:
        return self.target.entry.vars

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def address(self) -> str:
        return self.target.entry.address

    def fact(self, fact: Fact[T]) -> T:
        if fact not in self.cache:
            if self.conn is None:
                raise KeyError(f"{self.name}: fact {fact!r} was not given to the offline host")
            code, out, _ = self.sh(fact.command(), check=False)
            self.cache[fact] = fact.process(code, out)
        return self.cache[fact]

    def forget_facts(self) -> None:
        self.cache.clear()

    def sh(self, script: str, check: bool = True) -> tuple[int, str, str]:
        """Run a `bash -euo pipefail` script (as root through sudo when the user is not root)."""
        if self.conn is None:
            raise StepFailed(f"{self.name}: offline host cannot run: {script[:120]}")
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


class Change(Protocol):
    """One thing a step would do; steps define them as frozen dataclasses."""

    def describe(self) -> str: ...


@dataclass(frozen=True)
class Changes:
    """What a step would do; empty means the host is already as it should be."""
    items: tuple[Change, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.items)

    def __iter__(self):
        return iter(self.items)

    def of(self, kind: type[T]) -> list[T]:
        return [c for c in self.items if isinstance(c, kind)]

    def describe(self) -> str:
        return "; ".join(c.describe() for c in self.items)


def changes(*items: Change | None) -> Changes:
    return Changes(tuple(i for i in items if i is not None))


class Step:
    """Defaults for every step: never skipped, no undo, and verified when a fresh check finds
    nothing left to do."""
    name: ClassVar[str]
    needs_converged: ClassVar[bool] = False

    def skip_reason(self, host: Host) -> str | None:
        return None

    def check(self, host: Host) -> Changes:
        raise NotImplementedError

    def apply(self, host: Host, todo: Changes) -> str:
        raise NotImplementedError

    def verify(self, host: Host) -> None:
        left = self.check(host)
        if left:
            raise StepFailed(f"{host.name}: {self.name}: still to do after apply: {left.describe()}")

    def undo(self, host: Host) -> str | None:
        return None


@dataclass
class StepResult:
    host: str
    step: str
    status: str
    seconds: float
    detail: str = ""
    stdout_tail: str = ""
    stderr_tail: str = ""
    changes: list[str] = field(default_factory=list)


def run_step(step: Step, host: Host, dry_run: bool) -> StepResult:
    started = time.monotonic()

    def result(status: str, detail: str, todo: Changes = Changes(), **kw) -> StepResult:
        return StepResult(host.name, step.name, status, time.monotonic() - started, detail,
                          changes=[c.describe() for c in todo], **kw)

    try:
        reason = step.skip_reason(host)
        if reason:
            return result("skipped", reason)
        todo = step.check(host)
        if not todo:
            return result("ok", "no change")
        if dry_run:
            return result("would change", todo.describe(), todo)
        how = step.apply(host, todo)
        host.forget_facts()
        step.verify(host)
        return result("changed", todo.describe() + (f" ({how})" if how else ""), todo)
    except StepFailed as exc:
        text = str(exc)
        return result("failed", text.splitlines()[0][:300], stderr_tail=text[-2000:])
    except (OSError, EOFError) as exc:
        return result("failed", f"{host.name}: connection: {exc}")
    except Exception as exc:  # noqa: BLE001 - a bug in one step must not stop other hosts
        return result("failed", f"{host.name}: {exc.__class__.__name__}: {exc}"[:300])
