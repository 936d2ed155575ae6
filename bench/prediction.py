"""bench.predict's document: the predicted curve, capacity, output-length limit and levers for a
profile, model and workload, and (for `measured`) how the prediction fared against the levels it
was not calibrated on, and the capacity answer against the baseline's capacity search. Validated on
write against bench/schema/prediction-v4.schema.json (version 2 added the engine's batch curve to the
parameters, version 3 each check's request count, version 4 the capacity search's check), which is
generated from these models."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jsonschema import Draft202012Validator
from pydantic import BaseModel, ConfigDict, Field

from bench.predict import (
    SPARK,
    EngineParams,
    HardwareProfile,
    LevelPrediction,
    LeverEffect,
    ModelShape,
    Scenario,
    WorkloadShape,
    batch_curve,
    calibrate,
    capacity,
    longest_output,
    model_shape,
    predict_curve,
    predict_level,
    ranked_levers,
    scaled_to_measured,
    workload_shape,
)
from bench.report import Baseline
from bench.serving import LevelResult
from bench.verdict import output_cap
from bench.workloads import DEFAULT_MAX_TOKENS
from dgxready.errors import DgxReadyError
from dgxready.files import atomic_write_text
from dgxready.roles import Role
from model.catalog import Catalog

SCHEMA_ID = "dgxready-bench-prediction/4"
SCHEMA_PATH = Path(__file__).with_name("schema") / "prediction-v4.schema.json"
CHECK_BAR = 0.20
CALIBRATION_LEVELS = (1, 2)
# The model predicts a steady closed loop. A level's tok/s is its output over its whole duration,
# which ends with the last round draining to its slowest agent: with two rounds at 16 agents the
# 2-core VM's tok/s read 21-23% under the prediction, with four 9-13% either side of it.
STEADY_ROUNDS = 4


@dataclass(frozen=True)
class LevelCheck:
    """A predicted level against the same level measured, as relative errors."""
    concurrency: int
    workload: str
    predicted_e2el_p95_s: float
    measured_e2el_p95_s: float
    predicted_output_tokens_per_s: float
    measured_output_tokens_per_s: float
    e2el_error: float
    tokens_error: float
    measured_requests: int

    @classmethod
    def of(cls, concurrency: int, workload: str, predicted: LevelPrediction, e2el_p95_s: float,
           tokens_per_s: float, requests: int) -> LevelCheck:
        return cls(concurrency, workload, predicted.e2el_p95_s, e2el_p95_s, predicted.output_tokens_per_s,
                   tokens_per_s, predicted.e2el_p95_s / e2el_p95_s - 1,
                   predicted.output_tokens_per_s / tokens_per_s - 1, requests)

    @property
    def rounds(self) -> float:
        """Requests per agent: how many turns each of the level's agents took."""
        return self.measured_requests / self.concurrency

    @property
    def steady(self) -> bool:
        return self.rounds >= STEADY_ROUNDS

    @property
    def within_bar(self) -> bool:
        return abs(self.e2el_error) <= CHECK_BAR and abs(self.tokens_error) <= CHECK_BAR


@dataclass(frozen=True)
class CapacityLevelCheck:
    """A level of the capacity search, predicted as the run it was; `measured_meets` is the search's
    own judgement of the level (its P95 against the SLO)."""
    concurrency: int
    requests: int
    predicted_e2el_p95_s: float
    measured_e2el_p95_s: float | None
    measured_meets: bool


@dataclass(frozen=True)
class CapacityCheck:
    """The capacity answer for the capacity search's workload and SLO (the steady loop) against the
    search's in the same baseline (bench.capacity: a point estimate, and the range its confidence
    could not narrow), with each level it measured."""
    workload: str
    slo_p95_e2el_s: float
    predicted_capacity: int
    measured_capacity: int
    measured_low: int
    measured_high: int
    levels: list[CapacityLevelCheck]

    @property
    def within_range(self) -> bool:
        return self.measured_low <= self.predicted_capacity <= self.measured_high


class Prediction(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    schema_id: str = Field(SCHEMA_ID, alias="schema")
    profile: str
    profile_source: str
    engine: str
    bandwidth_gbps: float
    parameters: EngineParams
    model: ModelShape
    kv_dtype: str
    workload: WorkloadShape
    slo_p95_e2el_s: float
    target_agents: int
    levels: list[LevelPrediction]
    capacity: int = Field(ge=0, description="largest number of agents whose predicted P95 E2EL meets the SLO")
    longest_output_tokens: int = Field(ge=0, description="longest output the target agents can have "
                                                         "under the SLO")
    levers: list[LeverEffect]
    checks: list[LevelCheck] = Field(default_factory=list, description="measured levels the calibration "
                                                                       "did not use, against the model")
    capacity_check: CapacityCheck | None = Field(None, description="the capacity answer against the "
                                                                   "baseline's capacity search")

    @property
    def meets_target(self) -> bool:
        return self.capacity >= self.target_agents


@dataclass(frozen=True)
class PredictRequest:
    profile: str
    model: str
    fmt: str
    kv_dtype: str
    workload: str
    max_tokens: int
    agents: int
    slo_s: float
    engine: str | None = None
    think_s: float = 0.0
    levels: tuple[int, ...] = (1, 2, 4, 8, 10, 16, 20, 32)


@dataclass(frozen=True)
class Setting:
    """Where a prediction's constants come from."""
    profile_source: str
    engine: str
    bandwidth_gbps: float
    params: EngineParams
    machine: str  # what a second one would be: "DGX Spark", "GPU" or "host"


def profile_setting(profile: HardwareProfile, engine: str) -> Setting:
    if engine not in profile.engines:
        raise DgxReadyError(f"profile has no parameters for engine {engine!r}; it has "
                            + ", ".join(profile.engines))
    return Setting(profile.source, engine, profile.bandwidth_gbps, profile.engines[engine],
                   SPARK if profile.unified_memory else "GPU")


def serving_level(baseline: Baseline, c: int) -> LevelResult | None:
    for lv in baseline.serving.levels if baseline.serving else []:
        if lv.concurrency == c:
            return lv.level_result()
    return None


DEFAULT_MODEL = ("mistral-7b-instruct-v0.3", "fp8")


def baseline_model(baseline: Baseline, catalog: Catalog, source: str) -> tuple[str, str]:
    """The catalog model and format the baseline's sweep served: its model, in the first format
    of its engine."""
    if not baseline.serving:
        raise DgxReadyError(f"{source}: no serving sweep to calibrate on (a bench.all run with one)")
    name, engine = baseline.serving.model, baseline.serving.backend or "llamacpp"
    try:
        formats = catalog.model(name).formats
    except DgxReadyError:
        raise DgxReadyError(f"{source}: serving.model {name!r} is not in the model catalog, so its shape "
                            "is unknown") from None
    fmt = next((f for f, spec in formats.items() if spec.engine == engine), None)
    if fmt is None:
        raise DgxReadyError(f"{source}: model {name!r} has no {engine} format in the catalog")
    return name, fmt


def requested_model(model: str | None, fmt: str | None, baseline: Baseline | None, catalog: Catalog,
                    source: str) -> tuple[str, str]:
    """--model/--format as given; unset, the baseline's own with --baseline, else Mistral-7B FP8."""
    if model is None:
        model, default_fmt = baseline_model(baseline, catalog, source) if baseline else DEFAULT_MODEL
        return model, fmt or default_fmt
    return model, fmt or next(iter(catalog.model(model).formats))


# Where nothing says otherwise, the agents workload lets the roles' own max_tokens decide.
ROLES_DECIDE = 4096


def requested_max_tokens(workload: str, max_tokens: int | None, baseline: Baseline | None) -> int:
    """--max-tokens as given; unset, the cap of the baseline's sweep when it ran this workload, so
    that the predicted curve is of what was measured; else the roles' own caps for agents, and
    bench.serve's default length for synthetic."""
    if max_tokens is not None:
        if max_tokens < 1:
            raise DgxReadyError(f"--max-tokens {max_tokens}: give at least 1")
        return max_tokens
    measured = baseline.serving.workload if baseline and baseline.serving else {}
    if measured.get("name") == workload and (cap := output_cap(measured)):
        return cap
    return ROLES_DECIDE if workload == "agents" else DEFAULT_MAX_TOKENS


# Below this many requests a level's TPOT median and P95 output move by tens of percent run to run
STEADY_REQUESTS = 24
FEW_REQUESTS_HINT = ": few for a steady fit, `bench.all --sweep-requests 32` gives more"


def measured_setting(baseline: Baseline, model: ModelShape, roles: list[Role], source: str) -> Setting:
    """Calibrated on concurrency 1 and 2 of the baseline's sweep (of `model`, the one it served);
    STREAM gives the bandwidth, and the engine's batch table, where the baseline has one, the
    decode step's compute by batch."""
    one, two = (serving_level(baseline, c) for c in CALIBRATION_LEVELS)
    if not (one and two and baseline.serving):
        raise DgxReadyError(f"{source}: --profile measured needs a sweep with concurrency 1 and 2")
    if not baseline.micro.stream:
        raise DgxReadyError(f"{source}: --profile measured needs the STREAM figures (a bench.all run "
                            "without --skip-micro)")
    bandwidth = baseline.micro.stream.best_op[1]
    sweep = sweep_shape(baseline, roles, one)
    counts = one.metrics.completed, two.metrics.completed
    hint = FEW_REQUESTS_HINT if min(counts) < STEADY_REQUESTS else ""
    table = baseline.micro.engine
    curve = batch_curve(table, model) if table else []
    batches = (f"; the engine's steps at batch {', '.join(map(str, table.batches))} and context "
               f"{', '.join(map(str, table.depths))} from llama-bench") if table else ""
    params = calibrate(one, two, model, sweep, bandwidth,
                       f"calibrated on concurrency 1 and 2 of {source} ({baseline.host}, "
                       f"{baseline.created_at}; {counts[0]} and {counts[1]} requests{hint}){batches}",
                       curve)
    return Setting(f"measured on {baseline.host}: STREAM {bandwidth:.1f} GB/s", baseline.serving.backend
                   or "llamacpp", bandwidth, params, "GPU" if baseline.hardware.gpus else "host")


def recorded_shape(workload: dict, roles: list[Role]) -> WorkloadShape:
    """The shape of a workload as a baseline records it (`describe()`)."""
    return workload_shape(workload["name"], output_cap(workload) or DEFAULT_MAX_TOKENS, roles)


def sweep_shape(baseline: Baseline, roles: list[Role], level: LevelResult) -> WorkloadShape:
    return scaled_to_measured(recorded_shape(baseline.serving.workload, roles), level)


def checks_against(baseline: Baseline, setting: Setting, model: ModelShape, roles: list[Role]
                   ) -> list[LevelCheck]:
    """Every sweep level beyond the calibration's, predicted with the tokens that level's requests
    had (a level of a few requests draws prompts and outputs of its own from the workload; the
    check is of the engine model, not of that draw), and as a run of that level's requests per
    agent, whose agents started at once."""
    if not baseline.serving:
        return []
    out = []
    for lv in baseline.serving.levels:
        m = lv.metrics
        if lv.concurrency in CALIBRATION_LEVELS or lv.concurrency is None or not m.e2el or not m.completed:
            continue
        sc = Scenario(setting.bandwidth_gbps, setting.params, model,
                      sweep_shape(baseline, roles, lv.level_result()))
        predicted = predict_level(sc, lv.concurrency, rounds=m.completed / lv.concurrency)
        out.append(LevelCheck.of(lv.concurrency, sc.workload.name, predicted, m.e2el.p95,
                                 m.output_throughput, m.completed))
    return out


def capacity_check(baseline: Baseline, setting: Setting, model: ModelShape, roles: list[Role]
                   ) -> CapacityCheck | None:
    """The baseline's capacity search against the model, for the search's workload (with the
    sweep's measured tokens where the sweep ran the same workload): each level as a run of its
    requests per agent, per round of the search (bench.capacity's rounds start their agents at once)."""
    search = baseline.capacity
    if search is None:
        return None
    workload = search.workload
    shape = recorded_shape(workload, roles)
    one = serving_level(baseline, 1)
    if one is not None and baseline.serving.workload.get("name") == workload["name"]:
        shape = scaled_to_measured(shape, one)
    sc = Scenario(setting.bandwidth_gbps, setting.params, model, shape)
    levels = [CapacityLevelCheck(lv.concurrency, lv.num_requests,
                                 predict_level(sc, lv.concurrency, rounds=lv.requests_per_agent).e2el_p95_s,
                                 lv.p95_e2el_s, lv.passed)
              for lv in sorted(search.levels, key=lambda lv: lv.concurrency)]
    return CapacityCheck(workload["name"], search.slo_p95_e2el_s, capacity(sc, search.slo_p95_e2el_s),
                         search.max_concurrency_meeting_slo, *search.bounds, levels)


def predict(req: PredictRequest, setting: Setting, model: ModelShape, roles: list[Role],
            checks: list[LevelCheck] | None = None, capacity_checked: CapacityCheck | None = None
            ) -> Prediction:
    shape = workload_shape(req.workload, req.max_tokens, roles, req.think_s)
    sc = Scenario(setting.bandwidth_gbps, setting.params, model, shape)
    return Prediction(
        profile=req.profile, profile_source=setting.profile_source, engine=setting.engine,
        bandwidth_gbps=setting.bandwidth_gbps, parameters=setting.params, model=model, kv_dtype=req.kv_dtype,
        workload=shape, slo_p95_e2el_s=req.slo_s, target_agents=req.agents,
        levels=predict_curve(sc, sorted(set(req.levels) | {req.agents})),
        capacity=capacity(sc, req.slo_s), longest_output_tokens=longest_output(sc, req.agents, req.slo_s),
        levers=ranked_levers(sc, req.agents, req.slo_s, setting.machine, setting.engine), checks=checks or [],
        capacity_check=capacity_checked)


def predict_from(req: PredictRequest, catalog: Catalog, profiles: dict[str, HardwareProfile],
                 roles: list[Role], baseline: Baseline | None = None, source: str = "") -> Prediction:
    """With --profile measured the engine is calibrated on the model the baseline served, and its
    other levels check the model; the prediction is then for the requested model."""
    model = model_shape(catalog, req.model, req.fmt, req.kv_dtype)
    if req.profile == "measured":
        if baseline is None:
            raise DgxReadyError("--profile measured needs --baseline FILE (a bench.all result)")
        served = model_shape(catalog, *baseline_model(baseline, catalog, source), "f16")
        setting = measured_setting(baseline, served, roles, source)
        return predict(req, setting, model, roles, checks_against(baseline, setting, served, roles),
                       capacity_check(baseline, setting, served, roles))
    if req.profile not in profiles:
        raise DgxReadyError(f"--profile {req.profile!r}: choose measured or one of " + ", ".join(profiles))
    engine = req.engine or catalog.format(req.model, req.fmt).engine
    return predict(req, profile_setting(profiles[req.profile], engine), model, roles)


def generated_schema() -> dict:
    schema = Prediction.model_json_schema(by_alias=True)
    schema["$id"] = SCHEMA_ID
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def write_prediction(pred: Prediction, path: Path) -> Path:
    doc = json.loads(pred.model_dump_json(by_alias=True))
    errors = list(Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).iter_errors(doc))
    if errors:
        raise DgxReadyError("prediction does not match its schema:\n"
                            + "\n".join(f"{e.json_path}: {e.message[:200]}" for e in errors[:20]))
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    return path


if __name__ == "__main__":
    SCHEMA_PATH.write_text(json.dumps(generated_schema(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {SCHEMA_PATH}")
