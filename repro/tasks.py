"""Invoke tasks for reproducibility and the phase gate: thin shells over repro.environment and
repro.gate. `repro/run.sh` is the reproduction run itself."""
from __future__ import annotations

import sys
from pathlib import Path

from invoke import Collection, task
from invoke.exceptions import Exit

from dgxready.cli import out as console
from dgxready.cli import user_errors
from dgxready.settings import load_settings
from repro.environment import capture_document, diff_files, emit, print_differences
from repro.gate import default_inputs, gate_json, print_gate, run_gate


@task(iterable=["diff"], help={
    "out": "write the environment JSON here (default: print it)",
    "diff": "a capture to compare; give it twice (--diff A --diff B): prints what differs, by path; "
            "exit 0 same, 1 different",
})
@user_errors
def env(c, out=None, diff=None):
    """This machine's environment as one schema-checked JSON document (repro/schema/), or a diff of two."""
    if diff:
        if len(diff) != 2:
            raise Exit(f"error: --diff takes two files (--diff A --diff B), got {len(diff)}", 2)
        before, after = (Path(p) for p in diff)
        code = print_differences(diff_files(before, after), before, after, console)
        if code:
            raise Exit(code=code)
        return
    emit(capture_document(), Path(out) if out else None, console)


@task(help={
    "json": "print the status report (orchestrator, phase, workstreams with dates, blockers) as JSON",
    "profile": "auto (dgx-spark on a DGX Spark, else generic), dgx-spark or generic",
    "baselines_dir": "where bench.all writes baselines (default bench/baselines); this host's folder is read",
    "repro_dir": "where repro/run.sh records its runs (default <state dir>/repro)",
})
@user_errors
def gate(c, json=False, profile="auto", baselines_dir=None, repro_dir=None):
    """Phase gate: WS-01 hardware baseline, WS-02 reproducibility, WS-03 benchmarks; exit 0 PASSED, 1 FAILED."""
    inputs = default_inputs(load_settings(), profile, Path(baselines_dir) if baselines_dir else None,
                            Path(repro_dir) if repro_dir else None)
    status = run_gate(inputs)
    if json:
        sys.stdout.write(gate_json(status) + "\n")
    else:
        print_gate(status, console)
    if not status.passed:
        raise Exit(code=1)


ns = Collection("repro")
ns.add_task(env)
