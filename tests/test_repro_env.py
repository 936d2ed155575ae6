"""`invoke repro.env`: the environment document, its schema, redaction and the diff between two captures."""
import json
import os
import platform
import subprocess
import sys
from types import SimpleNamespace

import pytest

from bench.environment import LOCK_FILE, REDACTED, nvml_facts, redacted_env
from dgxready.files import sha256_file
from dgxready.settings import REPO_ROOT
from model.catalog import load_catalog
from repro.environment import ENVIRONMENT, capture_document, diff_documents
from repro.schemas import KINDS


def invoke(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=120)


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    path = tmp_path_factory.mktemp("env") / "a.json"
    ENVIRONMENT.write(capture_document(), path)
    return path


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.schema_file)
def test_each_committed_repro_schema_is_the_one_its_model_generates(kind):
    assert kind.committed_schema() == kind.generated_schema(), "run `python -m repro.schemas`"


def test_repro_env_writes_a_schema_valid_capture_with_credential_values_redacted(tmp_path):
    out = tmp_path / "env.json"
    secrets = {"HF_TOKEN": "hf-secret-1", "VLLM_API_KEY": "vllm-secret-2", "NCCL_IB_Auth": "nccl-secret-3"}
    done = invoke("repro.env", "--out", str(out),
                  env={**secrets, "HF_HOME": "/srv/hf", "CUDA_VISIBLE_DEVICES": "0", "TORCH_X": "1"})
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert not [v for v in secrets.values() if v in text]
    doc = ENVIRONMENT.load(out)
    assert {k: doc.env[k] for k in secrets} == dict.fromkeys(secrets, REDACTED)
    assert doc.env["HF_HOME"] == "/srv/hf" and doc.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert "TORCH_X" not in doc.env and "PATH" not in doc.env
    assert doc.host.architecture == platform.machine() and doc.host.kernel == platform.release()
    assert doc.python.lock_sha256 == sha256_file(LOCK_FILE)
    assert doc.python.packages["pydantic"] == doc.toolkit.packages["pydantic"]


def test_the_capture_records_nvml_the_engines_and_the_catalogs_checksums(capture):
    doc = ENVIRONMENT.load(capture)
    # NVML either started (and then says how many GPUs) or the document says why not; never silent.
    assert doc.nvml.available == doc.nvml.detail.endswith("GPU(s)")
    assert doc.nvml.available or (doc.gpus == [] and doc.nvml.detail.startswith("NVML did not start"))
    llama = doc.engines.llama_cpp
    assert llama.sdist_version == "0.3.36"
    assert not llama.built or (llama.commit == doc.toolkit.llama_cpp_commit
                               and "-DGGML_NATIVE=ON" in llama.cmake_flags)
    catalog = load_catalog()
    default_files = {f.file: f.sha256 for f in doc.models if f.model == catalog.default}
    expected = {f.name: f.sha256 for fmt in catalog.models[catalog.default].formats.values() for f in fmt.files}
    assert default_files == expected


def test_nvml_that_cannot_start_is_recorded_with_its_reason_and_one_that_starts_with_its_versions():
    class NVMLError(Exception):
        pass

    def fail():
        raise NVMLError("Driver Not Loaded")

    absent = SimpleNamespace(NVMLError=NVMLError, nvmlInit=fail)
    assert nvml_facts(absent).available is False and "Driver Not Loaded" in nvml_facts(absent).detail
    present = SimpleNamespace(NVMLError=NVMLError, nvmlInit=lambda: None, nvmlShutdown=lambda: None,
                              nvmlSystemGetCudaDriverVersion=lambda: 13000, nvmlDeviceGetCount=lambda: 1,
                              nvmlSystemGetNVMLVersion=lambda: b"13.580.95",
                              nvmlSystemGetDriverVersion=lambda: "580.95")
    facts = nvml_facts(present)
    assert (facts.available, facts.detail, facts.nvml_version, facts.driver_version,
            facts.cuda_driver_version) == (True, "1 GPU(s)", "13.580.95", "580.95", "13.0")


def test_only_the_listed_prefixes_are_kept_and_any_credential_like_name_is_redacted_in_any_case():
    env = {"OMP_NUM_THREADS": "2", "HF_Hub_Token": "t", "CUDA_PASSWORD_FILE": "p", "NCCL_SOCKET_IFNAME": "eth0",
           "VLLM_SECRET": "s", "HF_AUTHOR": "a", "PATH": "/bin", "AWS_SECRET_ACCESS_KEY": "x", "MY_CUDA_X": "y"}
    assert redacted_env(env) == {"CUDA_PASSWORD_FILE": REDACTED, "HF_AUTHOR": REDACTED,
                                 "HF_Hub_Token": REDACTED, "NCCL_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "2",
                                 "VLLM_SECRET": REDACTED}


def test_diff_exits_0_for_one_capture_and_1_naming_the_nested_paths_that_changed(capture, tmp_path):
    doc = json.loads(capture.read_text())
    doc["created_at"] = "2000-01-01T00:00:00Z"                       # volatile: not a difference
    doc["host"]["memory_available_bytes"] += 4096                    # volatile too
    doc["engines"]["llama_cpp"]["commit"] = "f" * 40
    doc["env"]["HF_HOME"] = "/elsewhere"
    changed = tmp_path / "b.json"
    changed.write_text(json.dumps(doc))
    same = invoke("repro.env", "--diff", str(capture), "--diff", str(capture))
    assert same.returncode == 0 and "no differences" in same.stdout
    differs = invoke("repro.env", "--diff", str(capture), "--diff", str(changed))
    assert differs.returncode == 1
    lines = [ln.strip().split(":")[0] for ln in differs.stdout.splitlines()[1:]]
    assert lines == ["engines.llama_cpp.commit", "env.HF_HOME"]
    module = subprocess.run([sys.executable, "-m", "repro.environment", "--diff", str(capture), str(changed)],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert module.returncode == 1 and "engines.llama_cpp.commit" in module.stdout


def test_diff_lists_keys_present_on_one_side_only_and_list_items_by_index():
    before = {"gpus": [], "env": {}, "models": [{"sha256": "a"}]}
    after = {"gpus": [{"name": "GB10"}], "env": {"HF_HOME": "/h"}, "models": [{"sha256": "b"}]}
    assert [str(d) for d in diff_documents(before, after)] == [
        "env.HF_HOME: (absent) -> '/h'", "gpus[0].name: (absent) -> 'GB10'", "models[0].sha256: 'a' -> 'b'"]


def test_a_capture_that_breaks_the_schema_is_refused_naming_the_file_and_the_field(capture, tmp_path):
    doc = json.loads(capture.read_text())
    doc["host"]["logical_cpus"] = "two"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(doc))
    done = invoke("repro.env", "--diff", str(capture), "--diff", str(broken))
    assert done.returncode == 1
    assert str(broken) in done.stderr and "$.host.logical_cpus" in done.stderr
