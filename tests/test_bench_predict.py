"""bench.predict: the published DGX Spark figures reproduced by one set of parameters per engine,
the answer to the 10-agent question, calibration, the document and bad input."""
import io
import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from bench import runner
from bench.engine_table import BATCHES, EnginePoint, EngineTable, parse_table, smoothed
from bench.metrics import RequestRecord
from bench.predict import (
    ModelShape,
    Scenario,
    WorkloadShape,
    batch_curve,
    calibrate,
    decode_step,
    first_round_share,
    load_profiles,
    model_shape,
    predict_level,
    prefill,
    scaled_to_measured,
)
from bench.prediction import (
    SCHEMA_PATH,
    PredictRequest,
    generated_schema,
    predict_from,
    requested_max_tokens,
    requested_model,
    serving_level,
    write_prediction,
)
from bench.report import load_baseline, write_baseline
from bench.serving import level_from
from bench.summary import prediction_headline, print_capacity_check, print_checks
from dgxready.errors import DgxReadyError
from dgxready.roles import load_roles
from model.catalog import load_catalog

PUBLISHED = yaml.safe_load((Path(__file__).parent / "fixtures" / "predict" / "published.yaml").read_text())
VM_CHECKS = yaml.safe_load((Path(__file__).parent / "fixtures" / "predict" / "vm-checks.yaml").read_text())
REFERENCE = Path(__file__).parents[1] / "bench" / "baselines" / "reference"
PROFILES = load_profiles()
CATALOG = load_catalog()
ROLES = list(load_roles().values())


def published_scenario(entry) -> Scenario:
    m = entry["model"]
    model = ModelShape(m["name"], float(m["params"]), float(m["weight_bytes"]),
                       2 * m["layers"] * m["kv_heads"] * m["head_dim"], m["kv_dtype_bytes"])
    ctx, out = entry["context_tokens"], entry["output_tokens"]
    workload = WorkloadShape("published", ctx, ctx, 0, 0, out, out)
    profile = PROFILES[entry["profile"]]
    return Scenario(profile.bandwidth_gbps, profile.engines[entry["engine"]], model, workload)


@pytest.mark.parametrize("entry", PUBLISHED, ids=[e["engine"] for e in PUBLISHED])
def test_each_published_decode_rate_is_predicted_within_15_percent_by_one_parameter_set(entry):
    sc = published_scenario(entry)
    for batch, published in entry["decode_tokens_per_s"].items():
        step, _bound = decode_step(sc, batch)
        assert batch / step == pytest.approx(published, rel=0.15), f"batch {batch}"
    prompt = entry["context_tokens"]
    assert prompt / prefill(sc, prompt) == pytest.approx(entry["prefill_tokens_per_s"], rel=0.15)


@pytest.mark.parametrize("run", VM_CHECKS, ids=[r["baseline"] for r in VM_CHECKS])
def test_the_vm_checks_the_readme_quotes_are_what_the_committed_baselines_give(run):
    path = REFERENCE / run["baseline"]
    baseline = load_baseline(path)
    model, fmt = requested_model(None, None, baseline, CATALOG, str(path))
    req = PredictRequest("measured", model, fmt, "f16", run["workload"], 4096, 10, 6.0)
    checks = predict_from(req, CATALOG, PROFILES, ROLES, baseline, str(path)).checks
    errors = {c.concurrency: [100 * c.e2el_error, 100 * c.tokens_error] for c in checks}
    assert errors.keys() == run["errors"].keys()
    for c, quoted in run["errors"].items():
        assert errors[c] == pytest.approx(quoted, abs=0.5), f"{c} agents"


def spark_prediction(**changes):
    req = PredictRequest("dgx-spark", "mistral-7b-instruct-v0.3", "fp8", "f16", "agents", 4096, 10, 6.0)
    return predict_from(replace(req, **changes), CATALOG, PROFILES, ROLES)


def test_the_spark_answer_says_how_long_ten_agents_outputs_may_be_and_which_levers_meet_the_slo():
    pred = spark_prediction()
    assert pred.engine == "vllm" and not pred.meets_target
    # The physics in shared/reference/benchmarks.md: about 135 tokens at FP8 with eta 0.85; the
    # LMSYS-fitted eta of 0.64 allows fewer.
    assert 60 <= pred.longest_output_tokens <= 160
    shorter = next(e for e in pred.levers if e.name == "shorter role outputs")
    assert shorter.meets_target and shorter.capacity >= 10
    assert pred.levers[0].meets_target and pred.levers[-1].name == "fewer agents"
    assert all(a.e2el_p95_s <= b.e2el_p95_s for a, b in zip(pred.levels, pred.levels[1:], strict=False))


def test_lighter_weights_faster_memory_and_shorter_outputs_never_predict_a_worse_capacity():
    base = spark_prediction(max_tokens=96)
    assert spark_prediction(max_tokens=96, fmt="gguf-q4_k_m", engine="vllm").capacity >= base.capacity
    assert spark_prediction(max_tokens=96, profile="h200").capacity >= spark_prediction(
        max_tokens=96, profile="h100").capacity
    assert spark_prediction(max_tokens=48).capacity >= base.capacity
    assert spark_prediction(max_tokens=96, kv_dtype="fp8").capacity >= base.capacity


def test_the_second_machine_lever_is_named_for_the_machine_and_engine_predicted():
    spark = {e.name: e for e in spark_prediction().levers}["a second DGX Spark"]
    assert "vLLM replica" in spark.description and "200 GbE" in spark.description
    h100 = {e.name: e for e in spark_prediction(profile="h100").levers}
    assert "a second GPU" in h100 and "200 GbE" not in h100["a second GPU"].description
    req = PredictRequest("measured", "smollm2-135m", "gguf-q4_1", "f16", "synthetic", 128, 10, 6.0)
    cpu = {e.name: e for e in predict_from(req, CATALOG, PROFILES, ROLES, noise_baseline(), "b.json").levers}
    assert not noise_baseline().hardware.gpus
    assert "a second host" in cpu and "llama-server" in cpu["a second host"].description
    assert not {"a second GPU", "a second DGX Spark"} & cpu.keys()


def test_fewer_agents_is_a_lever_only_where_the_target_is_missed():
    assert "fewer agents" not in {e.name for e in spark_prediction(max_tokens=48, agents=4).levers}
    assert spark_prediction().levers[-1].name == "fewer agents"


def simulated_level(sc: Scenario, c: int, rng) -> object:
    """What an engine that follows the model would report: TTFT and per-token gaps from the model,
    with 2% noise. Simulated, to test that calibration recovers the parameters."""
    p = predict_level(sc, c)
    w = sc.workload
    pf = prefill(sc, w.prompt_mean)
    ttft = pf + p.step_s
    tpot = (p.e2el_mean_s - ttft) / (w.output_mean - 1)
    records = []
    for i in range(24):
        t = ttft * rng.normal(1, 0.02)
        e2el = t + tpot * (w.output_mean - 1) * rng.normal(1, 0.02)
        records.append(RequestRecord(sent_at=i * e2el, prompt_tokens=int(w.prompt_mean),
                                     output_tokens=int(w.output_mean), ttft=t, e2el=e2el, success=True,
                                     finish_reason="length", ended_at=(i + 1) * e2el))
    return level_from(records, c, None, 0, None)


def test_calibration_on_concurrency_1_and_2_recovers_an_engine_that_follows_the_model():
    truth = PROFILES["dgx-spark"].engines["llamacpp"].model_copy(update={"eta": 1.0, "prefix_cache": "none"})
    model = ModelShape("m", 135e6, 98e6, 2 * 30 * 3 * 64, 2.0)
    workload = WorkloadShape("synthetic", 200, 260, 0, 0, 112, 126)
    engine = truth.model_copy(update={"decode_tflops": 0.02, "prefill_tflops": 0.05})
    sc = Scenario(10.0, engine, model, workload)
    rng = np.random.default_rng(0)
    one, two = simulated_level(sc, 1, rng), simulated_level(sc, 2, rng)
    fitted = calibrate(one, two, model, workload, 10.0, "simulated")
    refit = replace(sc, engine=fitted)
    for c in (4, 8, 16):
        assert predict_level(refit, c).e2el_mean_s == pytest.approx(predict_level(sc, c).e2el_mean_s, rel=0.1)


def simulated_run(sc: Scenario, c: int, rounds: int, prompts, outputs) -> np.ndarray:
    """E2EL of every request of a closed loop of c agents, rounds * c requests, all c sent at once at
    the start, on a simulated engine: a waiting prompt's prefill (the model's cost) runs before any
    decode step, and a decode step (the model's cost at that batch) gives each stream a token."""
    total, sent, now = rounds * c, 0, 0.0
    waiting, active, e2el = [], [], []

    def send(at: float) -> None:
        nonlocal sent
        waiting.append((at, prompts[sent], outputs[sent]))
        sent += 1

    for _ in range(c):
        send(0.0)
    while len(e2el) < total:
        if waiting:
            at, prompt, output = waiting.pop(0)
            now += prefill(sc, prompt)
            active.append([at, output - 1])
            continue
        now += decode_step(sc, len(active))[0]
        for stream in active:
            stream[1] -= 1
        for stream in [s for s in active if s[1] <= 0]:
            active.remove(stream)
            e2el.append(now - stream[0])
            if sent < total:
                send(now)
    return np.array(e2el)


def test_a_run_whose_agents_start_at_once_is_predicted_within_10_percent_of_a_simulated_engine():
    engine = PROFILES["dgx-spark"].engines["llamacpp"].model_copy(update={
        "eta": 1.0, "step_overhead_ms": 5.0, "decode_tflops": 0.05, "prefill_tflops": 0.1,
        "prefix_cache": "none", "batch_curve": []})
    model = ModelShape("m", 135e6, 98e6, 2 * 30 * 3 * 64, 2.0)
    sc = Scenario(10.0, engine, model, WorkloadShape("synthetic", 225, 337, 0, 0, 112, 126))
    rng = np.random.default_rng(0)
    for c in (4, 8, 16):
        for rounds in (2, 4, 8):
            n = rounds * c
            simulated = np.percentile(simulated_run(sc, c, rounds, rng.uniform(100, 350, n),
                                                    rng.integers(96, 129, n)), 95)
            predicted = predict_level(sc, c, rounds=rounds).e2el_p95_s
            assert predicted == pytest.approx(simulated, rel=0.1), f"{c} agents, {rounds} rounds"
            if (c, rounds) == (16, 2):
                assert predict_level(sc, c).e2el_p95_s < 0.92 * simulated, "the steady loop alone"


def test_the_first_round_sets_the_p95_only_of_a_run_of_several_agents_and_fewer_than_20_rounds():
    assert first_round_share(16, 4) == pytest.approx(0.8)
    assert first_round_share(16, None) == first_round_share(1, 4) == first_round_share(16, 20) == 0
    sc = Scenario(10.0, PROFILES["dgx-spark"].engines["llamacpp"], ModelShape("m", 135e6, 98e6, 11520, 2.0),
                  WorkloadShape("synthetic", 225, 337, 0, 0, 112, 126))
    assert predict_level(sc, 16, rounds=40) == predict_level(sc, 16)
    assert predict_level(sc, 16, rounds=4).ttft_p95_s >= 16 * prefill(sc, 225)


def test_the_prediction_document_is_schema_valid_and_the_committed_schema_is_current(tmp_path):
    assert json.loads(SCHEMA_PATH.read_text()) == generated_schema()
    json_path, png = runner.write_prediction_files(spark_prediction(), tmp_path)
    doc = json.loads(json_path.read_text())
    assert doc["schema"] == "dgxready-bench-prediction/4" and doc["capacity"] == 0
    assert png.stat().st_size > 10_000
    broken = spark_prediction().model_copy(update={"capacity": -1})
    with pytest.raises(DgxReadyError, match="capacity.*minimum"):
        write_prediction(broken, tmp_path / "broken.json")
    assert not (tmp_path / "broken.json").exists()


@pytest.mark.parametrize("changes, message", [
    ({"profile": "dgx-station"}, "--profile 'dgx-station'"),
    ({"model": "llama-70b"}, "unknown model 'llama-70b'"),
    ({"fmt": "gguf-q2"}, "no format 'gguf-q2'"),
    ({"kv_dtype": "int3"}, "--kv-dtype 'int3'"),
    ({"profile": "measured"}, "needs --baseline"),
    ({"workload": "chat"}, "--workload 'chat'"),
])
def test_bad_input_names_the_flag_or_the_catalog_entry(changes, message):
    with pytest.raises((DgxReadyError, ValueError), match=message):
        spark_prediction(**changes)


def test_a_measured_profile_needs_concurrency_1_and_2_in_the_baseline():
    from bench.benchmarks.noise import synthetic_baseline  # noqa: PLC0415 - a test-only builder
    baseline = synthetic_baseline(np.random.default_rng(1))
    assert serving_level(baseline, 1) is not None
    no_two = baseline.model_copy(update={"serving": baseline.serving.model_copy(
        update={"levels": [lv for lv in baseline.serving.levels if lv.concurrency != 2]})})
    req = PredictRequest("measured", "smollm2-135m", "gguf-q4_1", "f16", "synthetic", 128, 10, 6.0)
    with pytest.raises(DgxReadyError, match="concurrency 1 and 2"):
        predict_from(req, CATALOG, PROFILES, ROLES, no_two, "old.json")
    checked = predict_from(req, CATALOG, PROFILES, ROLES, baseline, "synthetic.json")
    assert {c.concurrency for c in checked.checks} == {4, 8, 16}


def test_bench_all_asks_the_spark_the_capacity_searchs_own_question():
    opts = runner.AllOptions(max_tokens=64, slo_p95_e2e_s=8.0, target_agents=12)
    pred = runner.spark_prediction(opts)
    assert (pred.profile, pred.workload.name, pred.workload.output_p95, pred.slo_p95_e2el_s,
            pred.target_agents) == ("dgx-spark", "agents", 64, 8.0, 12)
    assert "predicted on dgx-spark (vllm)" in prediction_headline(pred)


def test_where_not_even_a_one_token_answer_meets_the_slo_the_headline_says_so_not_zero_tokens():
    req = PredictRequest("measured", "smollm2-135m", "gguf-q4_1", "f16", "synthetic", 128, 10, 6.0)
    cpu = predict_from(req, CATALOG, PROFILES, ROLES, noise_baseline(), "b.json")
    assert cpu.longest_output_tokens == 0
    line = prediction_headline(cpu)
    assert "10 agents miss it even with one-token outputs" in line and "up to 0 tokens" not in line
    spark = runner.spark_prediction(runner.AllOptions(max_tokens=128, slo_p95_e2e_s=6.0, target_agents=10))
    assert f"can have outputs up to {spark.longest_output_tokens} tokens" in prediction_headline(spark)


def test_where_batching_is_nearly_free_the_headline_says_the_output_length_sets_the_latency():
    spark = runner.spark_prediction(runner.AllOptions(max_tokens=128, slo_p95_e2e_s=6.0, target_agents=10))
    assert not spark.meets_target and spark.capacity < 10 and spark.longest_output_tokens >= 100
    line = prediction_headline(spark)
    assert "the latency barely grows with the agents (P95 " in line and "s at 10)" in line
    req = PredictRequest("measured", "smollm2-135m", "gguf-q4_1", "f16", "synthetic", 128, 10, 6.0)
    cpu = predict_from(req, CATALOG, PROFILES, ROLES, noise_baseline(), "b.json")
    assert not cpu.meets_target and "barely grows" not in prediction_headline(cpu)
    met = runner.spark_prediction(runner.AllOptions(max_tokens=64, slo_p95_e2e_s=6.0, target_agents=10))
    assert met.meets_target and "barely grows" not in prediction_headline(met)


def noise_baseline():
    from bench.benchmarks.noise import synthetic_baseline  # noqa: PLC0415 - a test-only builder
    return synthetic_baseline(np.random.default_rng(1))


def test_a_measured_prediction_of_another_model_is_calibrated_and_checked_on_the_model_the_baseline_served():
    baseline = noise_baseline()
    own = PredictRequest("measured", "smollm2-135m", "gguf-q4_1", "f16", "synthetic", 128, 10, 6.0)
    other = replace(own, model="mistral-7b-instruct-v0.3", fmt="gguf-q4_k_m")
    mine, theirs = (predict_from(r, CATALOG, PROFILES, ROLES, baseline, "b.json") for r in (own, other))
    assert theirs.checks == mine.checks and theirs.parameters == mine.parameters
    assert theirs.model.name.startswith("mistral") and theirs.levels[0].e2el_p95_s > mine.levels[0].e2el_p95_s


def test_without_model_flags_a_measured_prediction_is_of_the_baselines_own_model():
    baseline = noise_baseline()
    assert requested_model(None, None, baseline, CATALOG, "b.json") == ("smollm2-135m", "gguf-q4_1")
    assert requested_model(None, None, None, CATALOG, "") == ("mistral-7b-instruct-v0.3", "fp8")
    unknown = baseline.model_copy(update={"serving": baseline.serving.model_copy(update={"model": "my-model"})})
    with pytest.raises(DgxReadyError, match="b.json: serving.model 'my-model' is not in the model catalog"):
        requested_model(None, None, unknown, CATALOG, "b.json")


def test_without_max_tokens_a_prediction_is_of_the_length_its_baseline_measured_else_the_workloads_own():
    def measured(workload):
        baseline = noise_baseline()
        serving = baseline.serving.model_copy(update={"workload": workload})
        return baseline.model_copy(update={"serving": serving})
    synthetic = measured({"name": "synthetic", "input_words": [64, 256], "output_tokens": [192, 256]})
    assert requested_max_tokens("synthetic", None, synthetic) == 256
    assert requested_max_tokens("agents", None, synthetic) == 4096
    assert requested_max_tokens("synthetic", None, None) == 128
    assert requested_max_tokens("synthetic", 300, synthetic) == 300
    assert requested_max_tokens("agents", None, measured({"name": "agents", "max_tokens": 96})) == 96
    with pytest.raises(DgxReadyError, match="--max-tokens 0"):
        requested_max_tokens("agents", 0, None)


def test_each_checked_level_is_predicted_with_the_tokens_its_own_requests_had():
    baseline = noise_baseline()
    req = PredictRequest("measured", "smollm2-135m", "gguf-q4_1", "f16", "synthetic", 128, 10, 6.0)
    before = {c.concurrency: c for c in predict_from(req, CATALOG, PROFILES, ROLES, baseline, "b").checks}
    def longer_prompts(lv):
        return lv.model_copy(update={"metrics": replace(lv.metrics,
                                                        total_input_tokens=4 * lv.metrics.total_input_tokens)})

    levels = [longer_prompts(lv) if lv.concurrency == 4 else lv for lv in baseline.serving.levels]
    longer = baseline.model_copy(update={"serving": baseline.serving.model_copy(update={"levels": levels})})
    after = {c.concurrency: c for c in predict_from(req, CATALOG, PROFILES, ROLES, longer, "b").checks}
    assert after[4].predicted_e2el_p95_s > 1.2 * before[4].predicted_e2el_p95_s
    assert after[8] == before[8] and after[16] == before[16]


def test_answers_that_stop_early_shorten_the_mean_output_but_not_the_p95_requests():
    shape = WorkloadShape("agents", 500, 700, 300, 150, 128, 128)
    records = [RequestRecord(sent_at=float(i), prompt_tokens=500, output_tokens=128 if i % 4 else 20,
                             ttft=0.3, e2el=3.0, success=True, finish_reason="length", ended_at=i + 3.0)
               for i in range(20)]
    level = level_from(records, 1, None, 0, None)
    measured = scaled_to_measured(shape, level)
    assert measured.output_mean == pytest.approx(101) and measured.output_p95 == 128
    without_samples = scaled_to_measured(shape, replace(level, output_token_samples=[]))
    assert without_samples.output_p95 == pytest.approx(101)


def test_a_calibration_on_few_requests_says_so_and_how_to_get_more():
    baseline = noise_baseline()
    req = PredictRequest("measured", "smollm2-135m", "gguf-q4_1", "f16", "synthetic", 128, 10, 6.0)
    source = predict_from(req, CATALOG, PROFILES, ROLES, baseline, "b.json").parameters.source
    assert "8 and 8 requests" in source and "--sweep-requests" in source
    more = [lv.model_copy(update={"metrics": replace(lv.metrics, completed=32)})
            for lv in baseline.serving.levels]
    steady = baseline.model_copy(update={"serving": baseline.serving.model_copy(update={"levels": more})})
    source = predict_from(req, CATALOG, PROFILES, ROLES, steady, "b.json").parameters.source
    assert "32 and 32 requests" in source and "--sweep-requests" not in source


ENGINE_FIXTURE = Path(__file__).parent / "fixtures" / "bench" / "llama-bench-batches.json"
ENGINE_TABLE = parse_table(ENGINE_FIXTURE.read_text(), ENGINE_FIXTURE.name)
SMOLLM = model_shape(CATALOG, "smollm2-135m", "gguf-q4_1", "f16")


def engine_scenario(curve, prompt_tokens: float, output_tokens: float = 0.0) -> Scenario:
    """Compute-bound by construction (a bandwidth no step could reach), to read the curve alone."""
    engine = PROFILES["dgx-spark"].engines["llamacpp"].model_copy(update={
        "eta": 1.0, "step_overhead_ms": 0.0, "batch_curve": curve, "prefix_cache": "none"})
    workload = WorkloadShape("engine", prompt_tokens, prompt_tokens, 0, 0, output_tokens, output_tokens)
    return Scenario(1e6, engine, SMOLLM, workload)


def power_law_table(exponent: float = -0.3) -> EngineTable:
    """The fixture's batches and depths with a per-stream step of exactly t(depth) * batch**exponent."""
    def rate(p):
        return 1 / (0.006 * (1 + p.depth / 1000) * p.batch ** exponent)
    return replace(ENGINE_TABLE, points=[replace(p, tokens_per_s=rate(p)) for p in ENGINE_TABLE.points])


def test_the_batch_curve_gives_back_a_smooth_engines_step_at_every_measured_batch_and_context():
    table = power_law_table()
    curve = batch_curve(table, SMOLLM)
    for depth in table.depths:
        sc = engine_scenario(curve, depth + table.prompt_tokens / 2)
        for b in table.batches:
            assert decode_step(sc, b)[0] == pytest.approx(table.point(b, depth).step_s, rel=0.01), (b, depth)
    sc = engine_scenario(curve, 256)
    steps = {c: decode_step(sc, c)[0] for c in (8, 12, 16, 128)}
    assert steps[8] < steps[12] < steps[16]
    assert steps[128] / 128 == pytest.approx(steps[16] / 16 * (decode_step(sc, 64)[0] / 64) / (steps[16] / 16),
                                             rel=0.01), "beyond the table a stream costs what it did at its end"


def test_one_slow_point_of_the_engine_table_moves_the_curve_by_a_fraction_of_its_excess():
    table = power_law_table()
    slow = replace(table, points=[replace(p, tokens_per_s=p.tokens_per_s / 1.25) if (p.batch, p.depth) == (2, 0)
                                  else p for p in table.points])
    sc, sc_slow = (engine_scenario(batch_curve(t, SMOLLM), table.prompt_tokens / 2) for t in (table, slow))
    assert 1.0 < decode_step(sc_slow, 2)[0] / decode_step(sc, 2)[0] < 1.12
    assert decode_step(sc_slow, 16)[0] == pytest.approx(decode_step(sc, 16)[0], rel=0.01)


@given(st.lists(st.floats(min_value=1e-3, max_value=1e6), min_size=len(BATCHES), max_size=len(BATCHES)))
def test_smoothing_keeps_the_end_batches_and_gives_each_other_the_geometric_mean_of_its_neighbours(rates):
    table = EngineTable("m", 1, 64, [EnginePoint(b, 0, r, 0.0) for b, r in zip(BATCHES, rates, strict=True)])
    out = {p.batch: p.tokens_per_s for p in smoothed(table).points}
    assert out.keys() == set(BATCHES)
    assert out[BATCHES[0]] == pytest.approx(rates[0]) and out[BATCHES[-1]] == pytest.approx(rates[-1])
    for i in range(1, len(BATCHES) - 1):
        assert out[BATCHES[i]] == pytest.approx(math.prod(rates[i - 1:i + 2]) ** (1 / 3), rel=1e-6)


def test_smoothing_follows_a_gpu_tables_bend_from_memory_to_compute_bound():
    gpu = [0.010] * 5 + [0.014, 0.024]
    table = EngineTable("m", 1, 64, [EnginePoint(b, 0, b / s, 0.0) for b, s in zip(BATCHES, gpu, strict=True)])
    for point in smoothed(table).points:
        assert point.step_s == pytest.approx(gpu[BATCHES.index(point.batch)], rel=0.17), point.batch


def simulated_server_level(curve, c: int, factor: float, prompt: int, output: int, rng) -> object:
    """What llama-server would report if its steps were `factor` times the engine's table: every
    gap between tokens that step, 2% noise, and one gap in ten holding another stream's prefill.
    Simulated, to test the calibration against a known engine."""
    step = factor * decode_step(engine_scenario(curve, prompt + output / 2), c)[0]
    records = []
    for i in range(32):
        gaps = [step * rng.normal(1, 0.02) * (4 if g % 10 == 9 else 1) for g in range(output - 1)]
        ttft = 0.12 * rng.normal(1, 0.02)
        records.append(RequestRecord(sent_at=float(i), prompt_tokens=prompt, output_tokens=output, ttft=ttft,
                                     e2el=ttft + sum(gaps), itl=gaps, success=True, finish_reason="length",
                                     ended_at=i + ttft + sum(gaps)))
    return level_from(records, c, None, 0, None)


def test_calibration_with_the_engines_curve_predicts_the_steps_of_larger_batches_where_a_constant_rate_cannot():
    curve = batch_curve(power_law_table(), SMOLLM)
    rng = np.random.default_rng(3)
    one, two, sixteen = (simulated_server_level(curve, c, 1.1, 500, 100, rng) for c in (1, 2, 16))
    workload = WorkloadShape("agents", 500, 500, 0, 0, 100, 100)
    with_curve = calibrate(one, two, SMOLLM, workload, 30.0, "simulated", curve)
    constant = calibrate(one, two, SMOLLM, workload, 30.0, "simulated")
    measured = sixteen.metrics.itl.median
    step_with_curve = decode_step(Scenario(30.0, with_curve, SMOLLM, workload), 16)[0]
    step_constant = decode_step(Scenario(30.0, constant, SMOLLM, workload), 16)[0]
    assert step_with_curve == pytest.approx(measured, rel=0.05)
    assert step_constant > 1.15 * measured
    assert "1.10x the engine's" in with_curve.source


def with_engine_table(baseline):
    return baseline.model_copy(update={"micro": baseline.micro.model_copy(update={"engine": ENGINE_TABLE})})


def test_a_measured_prediction_uses_the_baselines_engine_table_and_says_so():
    baseline = noise_baseline()
    with_table = with_engine_table(baseline)
    req = PredictRequest("measured", "smollm2-135m", "gguf-q4_1", "f16", "synthetic", 128, 10, 6.0)
    plain, tabled = (predict_from(req, CATALOG, PROFILES, ROLES, b, "b.json") for b in (baseline, with_table))
    assert not plain.parameters.batch_curve and "llama-bench" not in plain.parameters.source
    assert [p.batch for p in tabled.parameters.batch_curve] == ENGINE_TABLE.batches
    assert "batch 1, 2, 4, 8, 16, 32, 64 and context 0, 512 from llama-bench" in tabled.parameters.source
    assert {c.concurrency for c in tabled.checks} == {4, 8, 16}


def test_a_baseline_keeps_its_engine_table_and_an_older_version_may_not_carry_one(tmp_path):
    baseline = noise_baseline()
    with_table = with_engine_table(baseline)
    path = write_baseline(with_table, tmp_path)
    assert load_baseline(path).micro.engine == ENGINE_TABLE
    doc = json.loads(path.read_text())
    doc["schema"] = "dgxready-bench-baseline/3"
    for level in (doc.get("capacity") or {}).get("levels", []):
        del level["e2el_samples"], level["ttft_samples"]  # version 5's
    old = tmp_path / "v3.json"
    old.write_text(json.dumps(doc))
    with pytest.raises(DgxReadyError, match=r"v3.json: \$.micro"):
        load_baseline(old)
    del doc["micro"]["engine"]
    old.write_text(json.dumps(doc))
    assert load_baseline(old).micro.engine is None


def test_a_baseline_whose_engine_table_has_a_zero_rate_or_no_points_is_refused_naming_the_field(tmp_path):
    path = write_baseline(with_engine_table(noise_baseline()), tmp_path)
    doc = json.loads(path.read_text())
    doc["micro"]["engine"]["points"][3]["tokens_per_s"] = 0
    zero = tmp_path / "zero.json"
    zero.write_text(json.dumps(doc))
    with pytest.raises(DgxReadyError, match=r"zero.json: \$.micro.engine.points\[3\].tokens_per_s"):
        load_baseline(zero)
    doc["micro"]["engine"]["points"] = []
    zero.write_text(json.dumps(doc))
    with pytest.raises(DgxReadyError, match=r"zero.json: \$.micro.engine.points"):
        load_baseline(zero)


def test_a_table_at_one_context_or_with_a_deeper_step_no_slower_gives_attention_no_cost():
    shallow_only = replace(ENGINE_TABLE, points=[p for p in ENGINE_TABLE.points if p.depth == 0])
    def faster_deeper(p):
        return replace(p, tokens_per_s=ENGINE_TABLE.point(p.batch, 0).tokens_per_s * 1.1) if p.depth else p

    flat = replace(ENGINE_TABLE, points=[faster_deeper(p) for p in ENGINE_TABLE.points])
    for table in (shallow_only, flat):
        curve = batch_curve(table, SMOLLM)
        assert [p.batch for p in curve] == table.batches
        assert all(p.attention_s_per_gb == 0 and p.decode_tflops > 0 for p in curve)


def checked_levels_text(baseline) -> str:
    req = PredictRequest("measured", "smollm2-135m", "gguf-q4_1", "f16", "synthetic", 128, 10, 6.0)
    out = Console(file=io.StringIO(), width=400)
    print_checks(predict_from(req, CATALOG, PROFILES, ROLES, baseline, "b.json"), out)
    return out.file.getvalue()


def with_requests(baseline, requests: dict[int, int]):
    levels = [lv.model_copy(update={"metrics": replace(lv.metrics, completed=requests[lv.concurrency])})
              if lv.concurrency in requests else lv for lv in baseline.serving.levels]
    return baseline.model_copy(update={"serving": baseline.serving.model_copy(update={"levels": levels})})


def test_a_check_of_fewer_than_four_rounds_says_its_tok_s_includes_the_drain_and_how_to_measure_more():
    two_rounds = with_requests(noise_baseline(), {4: 16, 8: 32, 16: 32})
    req = PredictRequest("measured", "smollm2-135m", "gguf-q4_1", "f16", "synthetic", 128, 10, 6.0)
    checks = {c.concurrency: c for c in predict_from(req, CATALOG, PROFILES, ROLES, two_rounds, "b").checks}
    assert (checks[4].rounds, checks[8].rounds, checks[16].rounds) == (4.0, 4.0, 2.0)
    assert [c.steady for c in checks.values()] == [True, True, False]
    text = checked_levels_text(two_rounds)
    assert "16 agents: fewer than 4 rounds" in text and "--sweep-requests 64" in text
    assert "8 agents" not in text.split("fewer than")[0].splitlines()[-1]
    assert "fewer than" not in checked_levels_text(with_requests(noise_baseline(), {4: 16, 8: 32, 16: 64}))


def test_a_measured_prediction_checks_its_capacity_answer_against_the_baselines_capacity_search():
    path = REFERENCE / "vm-2core" / "agents-20261206T194834Z.json"
    req = PredictRequest("measured", "smollm2-135m", "gguf-q4_1", "f16", "agents", 128, 10, 6.0)
    checked = predict_from(req, CATALOG, PROFILES, ROLES, load_baseline(path), str(path)).capacity_check
    assert checked is not None and checked.workload == "agents" and checked.slo_p95_e2el_s == 6.0
    assert [(lv.concurrency, lv.requests, lv.measured_meets) for lv in checked.levels] == [
        (1, 13, True), (2, 52, True), (3, 11, False), (4, 5, False)]
    assert (checked.predicted_capacity, checked.measured_capacity) == (3, 2) and not checked.within_range
    assert all(a.predicted_e2el_p95_s < b.predicted_e2el_p95_s for a, b in itertools.pairwise(checked.levels))
    out = Console(file=io.StringIO(), width=300)
    print_capacity_check(checked, out)
    text = out.file.getvalue()
    assert "predicted 3 agents" in text and "bench.capacity measured 2" in text and "outside its range" in text
    assert "6.17" in text


def test_a_baseline_without_a_capacity_search_has_no_capacity_check():
    path = REFERENCE / "vm-2core" / "synthetic-20261206T201442Z.json"
    req = PredictRequest("measured", "smollm2-135m", "gguf-q4_1", "f16", "synthetic", 128, 10, 6.0)
    assert predict_from(req, CATALOG, PROFILES, ROLES, load_baseline(path), str(path)).capacity_check is None
