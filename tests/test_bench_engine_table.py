"""The engine's batch table: llama-bench's JSON read into steps, bad output named, the real
llama-bench on the default model, and bench.all measuring it only for a llama.cpp it started."""
import json
from pathlib import Path

import pytest

from bench import runner
from bench.engine_table import EngineTable, bench_command, merged, parse_table, run_engine_table
from dgxready.errors import DgxReadyError
from model.running import running_model

FIXTURE = Path(__file__).parent / "fixtures" / "bench" / "llama-bench-batches.json"


def fixture_table() -> EngineTable:
    """llama-bench on the 2-core VM: SmolLM2-135M Q4_1, batches 1-64, contexts 0 and 512."""
    return parse_table(FIXTURE.read_text(), FIXTURE.name)


def test_llama_bench_output_becomes_a_step_per_batch_and_context():
    table = fixture_table()
    assert table.batches == [1, 2, 4, 8, 16, 32, 64] and table.depths == [0, 512]
    assert table.threads == 2 and table.prompt_tokens == 64
    one, sixteen = table.point(1, 0), table.point(16, 0)
    assert one.step_s == pytest.approx(1 / 115.821, rel=1e-6), "the median of the repetitions"
    assert sixteen.step_s / 16 < 0.5 * one.step_s, "a stream's share of a step falls with the batch"
    assert all(table.point(b, 512).step_s > table.point(b, 0).step_s for b in table.batches)


def test_one_repetition_that_lost_its_cores_does_not_set_a_batchs_step():
    rows = json.loads(FIXTURE.read_text())
    eight = next(r for r in rows if (r["n_ubatch"], r["n_depth"]) == (8, 512))
    fair = parse_table(json.dumps(rows), "t.json").point(8, 512).tokens_per_s
    eight["samples_ts"] = [eight["samples_ts"][0], 0.25 * eight["samples_ts"][1], eight["samples_ts"][2]]
    eight["avg_ts"] = sum(eight["samples_ts"]) / 3
    disturbed = parse_table(json.dumps(rows), "t.json").point(8, 512).tokens_per_s
    assert disturbed == pytest.approx(fair, rel=0.1) and disturbed > 1.2 * eight["avg_ts"]
    del eight["samples_ts"]
    assert parse_table(json.dumps(rows), "t.json").point(8, 512).tokens_per_s == eight["avg_ts"], \
        "an older llama-bench without the repetitions: its mean"


def test_passes_are_merged_point_by_point_so_a_slow_spell_in_one_pass_does_not_set_the_step():
    rows = json.loads(FIXTURE.read_text())
    def slowed(factor: float, batches: set[int]) -> EngineTable:
        return parse_table(json.dumps([{**r, "samples_ts": [x / factor for x in r["samples_ts"]]}
                                       if r["n_ubatch"] in batches else r for r in rows]), "t.json")
    fair = fixture_table()
    table = merged([fair, slowed(1.4, {16, 32, 64}), slowed(1.05, {1, 2, 4, 8, 16, 32, 64})])
    assert table.batches == fair.batches and table.depths == fair.depths
    for p in table.points:
        mine = fair.point(p.batch, p.depth).tokens_per_s
        assert p.tokens_per_s == pytest.approx(mine / 1.05 if p.batch in (16, 32, 64) else mine)
        assert (p.stddev_tokens_per_s > 0.1 * mine) == (p.batch in (16, 32, 64))


def test_every_pass_of_the_real_command_is_one_repetition(tmp_path):
    fake = tmp_path / "llama-bench"
    calls = tmp_path / "calls"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\ncat {FIXTURE}\n")
    fake.chmod(0o755)
    table = run_engine_table(fake, tmp_path / "m.gguf", passes=3)
    assert [line.split(" -r ")[1].split()[0] for line in calls.read_text().splitlines()] == ["1"] * 3
    assert [p.tokens_per_s for p in table.points] == [p.tokens_per_s for p in fixture_table().points]


@pytest.mark.parametrize("text, message", [
    ("", "not llama-bench's JSON"),
    ('[{"n_ubatch": 1, "n_depth": 0, "avg_ts": 100.0', "not llama-bench's JSON"),
    ("[]", "not llama-bench's JSON"),
    ('[{"n_ubatch": 1, "n_depth": 0}]', "KeyError"),
])
def test_output_that_is_not_llama_benchs_json_is_refused_naming_the_source(text, message):
    with pytest.raises(DgxReadyError, match=f"llama-bench: .*{message}"):
        parse_table(text, "llama-bench")


def test_a_table_without_batch_1_or_with_a_zero_rate_is_refused():
    rows = json.loads(FIXTURE.read_text())
    with pytest.raises(DgxReadyError, match="no batch-1 test"):
        parse_table(json.dumps([r for r in rows if r["n_ubatch"] != 1]), "t.json")
    rows[3]["samples_ts"] = [0.0, 0.0, 0.0]
    with pytest.raises(DgxReadyError, match="no tokens per second"):
        parse_table(json.dumps(rows), "t.json")


def test_the_command_runs_every_batch_at_both_contexts_in_one_prompt():
    cmd = bench_command(Path("/b/llama-bench"), Path("/m/model.gguf"), (1, 2, 128), depth=256)
    assert cmd[cmd.index("-ub") + 1] == "1,2,128" and cmd[cmd.index("-d") + 1] == "0,256"
    assert cmd[cmd.index("-p") + 1] == cmd[cmd.index("-b") + 1] == "128"
    assert cmd[cmd.index("-n") + 1] == "0" and cmd[cmd.index("-o") + 1] == "json"


def test_a_failing_llama_bench_is_reported_with_its_exit_and_last_lines(tmp_path):
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\necho 'error: failed to load model' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(DgxReadyError, match="llama-bench exited 3: error: failed to load model"):
        run_engine_table(fake, tmp_path / "missing.gguf")


def test_bench_all_measures_the_table_only_for_a_llamacpp_it_started(tmp_path):
    common = ("http://127.0.0.1:1", "m", None, 1000, tmp_path / "m.gguf")
    for tgt in (runner.Target(common[0], common[1], "llamacpp", False, *common[3:]),
                runner.Target(common[0], common[1], "vllm", True, *common[3:]),
                runner.Target(common[0], common[1], "llamacpp", True, 1000, None)):
        assert runner.engine_steps(tgt, runner.Console(quiet=True)) is None


@pytest.mark.server
def test_the_real_llama_bench_measures_the_default_model(isolated, llama_build):
    with running_model(parallel=1, ctx_per_slot=512, settings=isolated) as served:
        table = run_engine_table(llama_build.binary("llama-bench"), served.model_path, (1, 4), depth=64,
                                 passes=2)
    assert table.batches == [1, 4] and table.depths == [0, 64]
    assert Path(table.model_file) == served.model_path
    assert all(p.tokens_per_s > 1 for p in table.points)


def test_a_missing_llama_bench_is_named_and_bench_all_goes_on_without_the_table(tmp_path, monkeypatch):
    with pytest.raises(DgxReadyError, match="llama-bench: cannot run: No such file"):
        run_engine_table(tmp_path / "llama-bench", tmp_path / "m.gguf")
    monkeypatch.setattr(runner, "require_binary", lambda name: tmp_path / name)
    console = runner.Console(record=True, width=200)
    tgt = runner.Target("http://127.0.0.1:1", "m", "llamacpp", True, 1000, tmp_path / "m.gguf")
    assert runner.engine_steps(tgt, console) is None
    assert "engine batch table skipped: " in console.export_text()
