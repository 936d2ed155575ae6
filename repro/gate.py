"""`invoke gate`: the foundation phase gate, from what the kit has recorded on this host.

WS-01 hardware baselines: a schema-valid baseline of this host under bench/baselines/<host>/ whose
recorded host and GPU facts pass the profile's checks (bench/hw.py's check_profile, run again on
the recorded facts, so the verdict does not rest on the file's own `profile_passed`).
WS-02 reproducibility: the newest repro run's record and environment JSON are schema-valid and the
environment file is the one the record hashed; its answers' hashes equal the reference's.
WS-03 benchmarks: one valid baseline holds throughput (a serving level with output tokens per
second), memory bandwidth (STREAM), storage I/O and GPU telemetry, and exports to JSON that
passes the schema again.

GPU telemetry: every baseline records NVML's answer in `hardware.gpus` (bench.hw). A GPU there is
telemetry present. An empty list is NVML finding no GPU, which bench.hw counts as a valid result;
the gate counts it as the telemetry of a GPU-less host on the generic profile, and as missing on
dgx-spark, where a GB10 must answer.

The profile is dgx-spark on a host with /etc/dgx-release or a GB10 that NVML sees, generic
otherwise, unless given."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field
from rich.console import Console

from bench.hw import GpuReport, HostFacts, check_profile, gpu_reports, host_facts
from bench.report import Baseline, load_baseline, now_stamp, validate_document
from bench.runner import BASELINES, safe_name
from dgxready.errors import DgxReadyError
from dgxready.settings import REPO_ROOT, Settings
from repro.documents import Doc, DocumentKind
from repro.run import RunFolder, compare, load_folder, load_reference, run_folders

SCHEMA_ID = "dgxready-gate-status/1"
ORCHESTRATOR = "dgxready gate"
PHASE = "foundation"
PROFILES = ("auto", "dgx-spark", "generic")


class WorkstreamStatus(Doc):
    id: str
    name: str
    status: Literal["complete", "blocked"]
    reason: str
    evidence: str | None = Field(description="the file or folder the verdict rests on")
    completed_at: str | None = Field(description="when the evidence was recorded; None while blocked")
    checked_at: str

    @property
    def passed(self) -> bool:
        return self.status == "complete"


class Blocker(Doc):
    workstream: str
    reason: str


class Phase(Doc):
    name: str
    gate: Literal["PASSED", "FAILED"]
    profile: str
    checked_at: str


class GateStatus(Doc):
    schema_id: str = Field(SCHEMA_ID, alias="schema")
    orchestrator: str
    phase: Phase
    workstreams: list[WorkstreamStatus]
    blockers: list[Blocker]

    @property
    def passed(self) -> bool:
        return self.phase.gate == "PASSED"


GATE_STATUS = DocumentKind(GateStatus, SCHEMA_ID, "gate-status-v1.schema.json")


@dataclass(frozen=True)
class GateInputs:
    baselines_dir: Path
    host: str
    repro_dir: Path
    profile: str


@dataclass(frozen=True)
class Verdict:
    """A workstream's outcome before it is dated: passed, why, and on what evidence."""
    passed: bool
    reason: str
    evidence: Path | None = None
    recorded_at: str | None = None


@dataclass(frozen=True)
class Workstream:
    id: str
    name: str
    judge: Callable[[GateInputs], Verdict]


def detect_profile(host: HostFacts, gpus: list[GpuReport]) -> str:
    spark = host.dgx_os_release is not None or any("GB10" in g.name for g in gpus)
    return "dgx-spark" if spark else "generic"


def default_inputs(settings: Settings, profile: str = "auto", baselines_dir: Path | None = None,
                   repro_dir: Path | None = None) -> GateInputs:
    if profile not in PROFILES:
        raise DgxReadyError(f"--profile {profile!r}: choose {', '.join(PROFILES)}")
    host = host_facts()
    if profile == "auto":
        profile = detect_profile(host, gpu_reports())
    return GateInputs(baselines_dir or BASELINES, host.hostname, repro_dir or settings.state_dir / "repro",
                      profile)


def shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


@dataclass(frozen=True)
class LoadedBaselines:
    """This host's baselines, newest first: those that load, and the first error of those that don't."""
    folder: Path
    valid: list[tuple[Path, Baseline]]
    first_error: str | None


def host_baselines(inputs: GateInputs) -> LoadedBaselines:
    folder = inputs.baselines_dir / safe_name(inputs.host)
    valid, first_error = [], None
    for path in sorted(folder.glob("*.json"), reverse=True):
        try:
            valid.append((path, load_baseline(path)))
        except DgxReadyError as exc:
            first_error = first_error or str(exc)
    return LoadedBaselines(folder, valid, first_error)


def no_baseline(found: LoadedBaselines) -> Verdict:
    if found.first_error:
        return Verdict(False, f"no schema-valid baseline in {shown(found.folder)}/: {found.first_error}")
    return Verdict(False, f"no baseline in {shown(found.folder)}/: run `invoke bench.all`")


def hardware_baseline(inputs: GateInputs) -> Verdict:
    found = host_baselines(inputs)
    if not found.valid:
        return no_baseline(found)
    path, baseline = found.valid[0]
    checks = check_profile(inputs.profile, baseline.hardware.host, baseline.hardware.gpus)
    failed = [f"{c.name} ({c.detail})" for c in checks if not c.passed]
    if failed:
        return Verdict(False, f"{shown(path)}: {inputs.profile} checks failed: {'; '.join(failed)}", path)
    return Verdict(True, f"{shown(path)}: schema-valid, {len(checks)} {inputs.profile} check(s) passed",
                   path, baseline.created_at)


def reproducibility(inputs: GateInputs) -> Verdict:
    runs = run_folders(inputs.repro_dir)
    if not runs:
        return Verdict(False, f"no repro run in {inputs.repro_dir}/runs/: run repro/run.sh")
    try:
        newest = load_folder(runs[-1])
        reference = load_reference(inputs.repro_dir)
    except DgxReadyError as exc:
        return Verdict(False, str(exc), runs[-1])
    return reproduced(newest, reference)


def reproduced(newest: RunFolder, reference: RunFolder | None) -> Verdict:
    if reference is None:
        return Verdict(False, f"{newest.path}: no reference to compare with: run repro/run.sh", newest.path)
    if newest.record.verdict == "reference":
        return Verdict(False, f"{newest.path}: the reference alone, not reproduced yet: run repro/run.sh again",
                       newest.path)
    mismatches = compare(reference.record, newest.record.generations).mismatches
    if mismatches:
        named = "; ".join(m.describe() for m in mismatches)
        return Verdict(False, f"{newest.path}: {len(mismatches)} answer(s) differ from the reference: {named}",
                       newest.path)
    return Verdict(True, f"{newest.path}: environment JSON valid, all {len(newest.record.generations)} "
                         f"hashes equal the reference's of {reference.record.created_at}",
                   newest.path, newest.record.created_at)


def throughput(baseline: Baseline) -> str | None:
    levels = [lv for lv in (baseline.serving.levels if baseline.serving else [])
              if lv.metrics.output_throughput > 0]
    if not levels:
        return None
    best = max(levels, key=lambda lv: lv.metrics.output_throughput)
    return f"throughput {best.metrics.output_throughput:.1f} output tok/s (best of {len(levels)} level(s))"


def memory(baseline: Baseline) -> str | None:
    stream = baseline.micro.stream
    if not stream or not stream.best_gbps:
        return None
    op, gbps = stream.best_op
    return f"memory STREAM {op} {gbps:.1f} GB/s"


def storage(baseline: Baseline) -> str | None:
    io = baseline.micro.storage
    return f"I/O {len(io.jobs)} storage job(s)" if io and io.jobs else None


def gpu_telemetry(baseline: Baseline, profile: str) -> str | None:
    gpus = baseline.hardware.gpus
    if gpus:
        return "GPU telemetry " + ", ".join(g.name for g in gpus) + " (NVML)"
    return "GPU telemetry: no GPU (NVML found none)" if profile == "generic" else None


def exported(baseline: Baseline) -> str | None:
    """The JSON export passes the schema again (a NaN, for one, would not)."""
    try:
        validate_document(json.loads(baseline.model_dump_json(by_alias=True)), "export")
    except DgxReadyError:
        return None
    return "exports to schema-valid JSON"


def results_present(baseline: Baseline, profile: str) -> dict[str, str | None]:
    return {"throughput": throughput(baseline), "memory": memory(baseline), "I/O": storage(baseline),
            "GPU telemetry": gpu_telemetry(baseline, profile), "JSON export": exported(baseline)}


def benchmark_results(inputs: GateInputs) -> Verdict:
    found = host_baselines(inputs)
    if not found.valid:
        return no_baseline(found)
    for path, baseline in found.valid:
        parts = results_present(baseline, inputs.profile)
        if all(parts.values()):
            return Verdict(True, f"{shown(path)}: " + "; ".join(filter(None, parts.values())), path,
                           baseline.created_at)
    path, baseline = found.valid[0]
    missing = [name for name, part in results_present(baseline, inputs.profile).items() if not part]
    return Verdict(False, f"{shown(path)} (the newest) lacks {', '.join(missing)}, and no other baseline here "
                          "holds them all: run `invoke bench.all`", path)


WORKSTREAMS = (
    Workstream("WS-01", "Hardware baselines", hardware_baseline),
    Workstream("WS-02", "Reproducibility", reproducibility),
    Workstream("WS-03", "Benchmarks", benchmark_results),
)


def workstream_status(ws: Workstream, verdict: Verdict, checked_at: str) -> WorkstreamStatus:
    evidence = shown(verdict.evidence) if verdict.evidence else None
    return WorkstreamStatus(id=ws.id, name=ws.name, status="complete" if verdict.passed else "blocked",
                            reason=verdict.reason, evidence=evidence,
                            completed_at=verdict.recorded_at if verdict.passed else None, checked_at=checked_at)


def run_gate(inputs: GateInputs) -> GateStatus:
    checked_at = now_stamp()
    statuses = [workstream_status(ws, ws.judge(inputs), checked_at) for ws in WORKSTREAMS]
    blockers = [Blocker(workstream=s.id, reason=s.reason) for s in statuses if not s.passed]
    phase = Phase(name=PHASE, gate="FAILED" if blockers else "PASSED", profile=inputs.profile,
                  checked_at=checked_at)
    return GateStatus(orchestrator=ORCHESTRATOR, phase=phase, workstreams=statuses, blockers=blockers)


def print_gate(status: GateStatus, out: Console) -> None:
    for ws in status.workstreams:
        mark = "✅" if ws.passed else "❌"
        out.print(f"{mark} {ws.id} {ws.name}: {ws.reason}", markup=False, highlight=False)
    out.print(f"Phase Gate: {status.phase.gate}", markup=False, highlight=False)


def gate_json(status: GateStatus) -> str:
    return json.dumps(GATE_STATUS.dump(status), indent=2)
