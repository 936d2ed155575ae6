"""repro/run.sh against the real llama-server and the default model: the first run records the
reference and reproduces it on a fresh server with identical hashes; a later run against a tampered
reference exits 1 naming the prompt whose hash differs."""
import json
import subprocess

import pytest

from dgxready.settings import REPO_ROOT
from repro.run import PROMPTS, RECORD_FILE, REFERENCE_DIR, RUN_RECORD, load_folder, run_folders

pytestmark = pytest.mark.server
RUN_SH = REPO_ROOT / "repro" / "run.sh"


def run_sh(out_dir) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(RUN_SH), "--out", str(out_dir)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=500)


def test_two_runs_give_identical_hashes_and_a_tampered_reference_is_reported_naming_the_prompt(
        isolated, llama_build, tmp_path):
    out_dir = tmp_path / "repro"
    first = run_sh(out_dir)
    assert first.returncode == 0, first.stdout + first.stderr
    reference, reproduction = (load_folder(p).record for p in run_folders(out_dir))
    assert (reference.verdict, reproduction.verdict) == ("reference", "reproduced")
    assert reference.server_command[reference.server_command.index("-np") + 1] == "1"
    hashes = [g.sha256 for g in reference.generations]
    assert len(hashes) == len(PROMPTS) == 10 and hashes == [g.sha256 for g in reproduction.generations]
    assert all(g.completion_tokens > 0 for g in reference.generations)

    record_path = out_dir / REFERENCE_DIR / RECORD_FILE
    doc = json.loads(record_path.read_text())
    doc["generations"][4]["sha256"] = "0" * 64
    RUN_RECORD.check(doc, "tampered reference")
    record_path.write_text(json.dumps(doc))
    second = run_sh(out_dir)
    assert second.returncode == 1, second.stdout + second.stderr
    named = [ln for ln in second.stdout.splitlines() if ln.strip().startswith("prompt ")]
    assert len(named) == 1 and f"prompt {PROMPTS[4][0]!r}" in named[0]
    assert load_folder(run_folders(out_dir)[-1]).record.verdict == "differs"
