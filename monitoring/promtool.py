"""promtool and amtool, the checkers that ship with Prometheus and Alertmanager."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from monitoring.stack import binary


@dataclass(frozen=True)
class CheckResult:
    command: list[str]
    ok: bool
    output: str

    def describe(self) -> str:
        return f"{' '.join(self.command)}: {'ok' if self.ok else 'FAILED'}\n{self.output}".rstrip()


def run_check(cmd: list[str], cwd: Path | None = None) -> CheckResult:
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=120)
    return CheckResult(cmd, done.returncode == 0, done.stdout + done.stderr)


def check_config(prometheus_yml: Path) -> CheckResult:
    return run_check([binary("promtool"), "check", "config", str(prometheus_yml)])


def check_rules(rules_yml: Path) -> CheckResult:
    return run_check([binary("promtool"), "check", "rules", str(rules_yml)])


def test_rules(suite_yml: Path) -> CheckResult:
    """Run a `promtool test rules` suite from its own folder (its rule_files are relative to it)."""
    return run_check([binary("promtool"), "test", "rules", suite_yml.name], cwd=suite_yml.parent)


def check_alertmanager_config(alertmanager_yml: Path) -> CheckResult:
    return run_check([binary("amtool"), "check-config", str(alertmanager_yml)])


test_rules.__test__ = False  # not a pytest test, despite its name
