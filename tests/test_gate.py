"""`invoke gate`: FAILED with a reason per workstream on an empty state (a fresh clone), PASSED with a
schema-valid baseline and a reproduced repro run, and each workstream blocked by its own defect.

What is synthetic: the baseline's figures come from bench/benchmarks/noise.py (synthetic_baseline:
a generic host without a GPU, STREAM, storage, network, a serving sweep, a capacity search), since
a real bench.all takes many minutes here; the repro run's ten answers are made-up texts with their
true sha256. Real: the environment JSON (this machine's capture), and every file is written and
read by the kit's own schema-checked writers and loaders."""
import dataclasses
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from bench.benchmarks.noise import synthetic_baseline
from bench.hw import GpuReport, HostFacts
from bench.report import write_baseline
from bench.runner import safe_name
from dgxready.settings import REPO_ROOT
from repro.environment import capture_document
from repro.gate import GATE_STATUS, GateInputs, detect_profile, run_gate
from repro.run import (
    PROMPTS,
    RECORD_FILE,
    RUN_RECORD,
    SAMPLING,
    Generation,
    Pass,
    RunRecord,
    compared,
    new_run_folder,
    run_folders,
    text_sha256,
    write_folder,
    write_reference,
)

HOST = platform.node()


def gate_cli(inputs: GateInputs, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", "gate", "--profile", inputs.profile,
                           "--baselines-dir", str(inputs.baselines_dir), "--repro-dir", str(inputs.repro_dir),
                           *extra], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "400"})


@pytest.fixture
def inputs(tmp_path) -> GateInputs:
    return GateInputs(tmp_path / "baselines", HOST, tmp_path / "repro", "generic")


@pytest.fixture(scope="module")
def environment():
    return capture_document()


def answers(variant: str = "") -> list[Generation]:
    """SYNTHETIC answers: made-up texts, their true hashes."""
    return [Generation(prompt_id=pid, prompt=prompt, text=f"answer to {pid}{variant}", completion_tokens=5,
                       finish_reason="stop", sha256=text_sha256(f"answer to {pid}{variant}"))
            for pid, prompt in PROMPTS]


def record(generations: list[Generation], created_at: str) -> RunRecord:
    return RunRecord(created_at=created_at, model="smollm2-135m", format="gguf-q4_1", backend="llamacpp",
                     server_command=["llama-server", "-np", "1"], sampling=SAMPLING,
                     environment_sha256="0" * 64, generations=generations, verdict="reference", seconds=1.0)


def record_runs(inputs: GateInputs, environment, later: list[Generation]) -> None:
    """A reference as repro/run.sh records it, then a later run compared with it."""
    first = Pass(record(answers(), "2025-01-01T00:00:00Z"), environment)
    write_folder(new_run_folder(inputs.repro_dir, first.record.created_at), first)
    reference = write_reference(inputs.repro_dir, first)
    run = compared(Pass(record(later, "2025-01-01T00:01:00Z"), environment), reference.record)
    write_folder(new_run_folder(inputs.repro_dir, run.record.created_at), run)


def write_synthetic_baseline(inputs: GateInputs, **changes) -> None:
    baseline = synthetic_baseline(np.random.default_rng(7))
    micro = baseline.micro.model_copy(update=changes) if changes else baseline.micro
    write_baseline(baseline.model_copy(update={"micro": micro}), inputs.baselines_dir / safe_name(HOST))


@pytest.fixture
def passing(inputs, environment) -> GateInputs:
    write_synthetic_baseline(inputs)
    record_runs(inputs, environment, answers())
    return inputs


def reasons(inputs: GateInputs) -> dict[str, str]:
    return {ws.id: ws.reason for ws in run_gate(inputs).workstreams if not ws.passed}


def test_on_an_empty_state_the_gate_fails_each_workstream_with_what_to_run(inputs):
    done = gate_cli(inputs)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines] == [
        "❌ WS-01 Hardware baselines", "❌ WS-02 Reproducibility", "❌ WS-03 Benchmarks", "Phase Gate"]
    assert "run `invoke bench.all`" in lines[0] and "run `invoke bench.all`" in lines[2]
    assert "run repro/run.sh" in lines[1]
    assert lines[-1] == "Phase Gate: FAILED"


def test_with_a_valid_baseline_and_a_reproduced_run_the_gate_passes(passing):
    done = gate_cli(passing)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [ln[:7] for ln in lines[:3]] == ["✅ WS-01", "✅ WS-02", "✅ WS-03"]
    assert "throughput" in lines[2] and "STREAM" in lines[2] and "storage" in lines[2]
    assert "no GPU (NVML found none)" in lines[2]
    assert lines[-1] == "Phase Gate: PASSED"


def test_the_json_report_has_the_status_report_shape_with_dates(passing, inputs):
    done = gate_cli(passing, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    GATE_STATUS.check(report, "gate --json")
    assert report["orchestrator"] and report["phase"]["gate"] == "PASSED" and report["blockers"] == []
    assert [(w["id"], w["status"], w["completed_at"]) for w in report["workstreams"]] == [
        ("WS-01", "complete", "2025-01-01T00:00:00Z"), ("WS-02", "complete", "2025-01-01T00:01:00Z"),
        ("WS-03", "complete", "2025-01-01T00:00:00Z")]
    empty = gate_cli(dataclasses.replace(inputs, baselines_dir=inputs.baselines_dir / "none",
                                         repro_dir=inputs.repro_dir / "none"), "--json")
    blocked = json.loads(empty.stdout)
    assert empty.returncode == 1 and blocked["phase"]["gate"] == "FAILED"
    assert [b["workstream"] for b in blocked["blockers"]] == ["WS-01", "WS-02", "WS-03"]
    assert all(w["completed_at"] is None for w in blocked["workstreams"])


def test_an_answer_that_changed_blocks_reproducibility_naming_the_prompt(inputs, environment):
    write_synthetic_baseline(inputs)
    later = answers()
    later[3] = later[3].model_copy(update={"text": "another answer", "sha256": text_sha256("another answer")})
    record_runs(inputs, environment, later)
    assert list(reasons(inputs)) == ["WS-02"]
    assert f"prompt {PROMPTS[3][0]!r}" in reasons(inputs)["WS-02"]


def test_a_verdict_edited_by_hand_does_not_pass_the_gate(inputs, environment):
    """The gate compares the hashes itself rather than trusting the record's verdict."""
    write_synthetic_baseline(inputs)
    record_runs(inputs, environment, answers(variant=" (changed)"))
    newest = run_folders(inputs.repro_dir)[-1] / RECORD_FILE
    doc = json.loads(newest.read_text())
    doc["verdict"], doc["comparison"]["mismatches"] = "reproduced", []
    RUN_RECORD.check(doc, str(newest))
    newest.write_text(json.dumps(doc))
    assert "10 answer(s) differ" in reasons(inputs)["WS-02"]


def test_an_environment_file_changed_after_the_run_blocks_reproducibility_naming_it(passing):
    env_file = run_folders(passing.repro_dir)[-1] / "environment.json"
    doc = json.loads(env_file.read_text())
    doc["env"]["HF_HOME"] = "/changed"
    env_file.write_text(json.dumps(doc, indent=2))
    assert str(env_file) in reasons(passing)["WS-02"]


def test_a_reference_without_its_reproduction_is_not_enough(inputs, environment):
    first = Pass(record(answers(), "2025-01-01T00:00:00Z"), environment)
    write_folder(new_run_folder(inputs.repro_dir, first.record.created_at), first)
    write_reference(inputs.repro_dir, first)
    assert "not reproduced yet" in reasons(inputs)["WS-02"]


def test_on_the_dgx_spark_profile_a_host_without_gb10_fails_hardware_and_gpu_telemetry(passing):
    found = reasons(dataclasses.replace(passing, profile="dgx-spark"))
    assert list(found) == ["WS-01", "WS-03"]
    assert "GPU is GB10 (no GPU)" in found["WS-01"] and "architecture aarch64" in found["WS-01"]
    assert "GPU telemetry" in found["WS-03"]


def test_a_baseline_without_storage_results_blocks_benchmarks_naming_io(inputs, environment):
    write_synthetic_baseline(inputs, storage=None)
    record_runs(inputs, environment, answers())
    assert list(reasons(inputs)) == ["WS-03"]
    assert "lacks I/O" in reasons(inputs)["WS-03"]


def test_a_baseline_that_is_not_json_is_named(inputs):
    folder = inputs.baselines_dir / safe_name(HOST)
    folder.mkdir(parents=True)
    (folder / "20250101T000000Z.json").write_text('{"schema": "dgxready-bench-baseline/2", ')
    assert "20250101T000000Z.json: not JSON" in reasons(inputs)["WS-01"]


def test_the_profile_is_dgx_spark_on_a_dgx_os_host_or_with_a_gb10_and_generic_otherwise():
    host = HostFacts("h", "cpu", "aarch64", 20, 128 << 30, 120 << 30, None, "6.11", "DGX OS", None)
    assert detect_profile(host, []) == "generic"
    assert detect_profile(dataclasses.replace(host, dgx_os_release="7.2.3"), []) == "dgx-spark"
    assert detect_profile(host, [GpuReport(0, "NVIDIA GB10")]) == "dgx-spark"
