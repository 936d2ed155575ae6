"""A host's SLO capacity from physics, before the hardware is there.

The model:
- A decode step gives every active stream one token. With c streams it costs
      step(c) = max((W + c * ctx * kv) / (eta * BW), c * 2P / F_decode) + t_step
  W: weight bytes read per token; ctx: the mean tokens in a stream's context; kv: KV-cache bytes
  per token; BW: memory bandwidth and eta the share of it a decode step achieves; P: parameters;
  F_decode: the batched decode's sustained compute (the lower bound); t_step: fixed cost per step.
  Where the engine's own batch table was measured (`measured` with llama.cpp, bench/engine_table),
  the compute side is the table's instead: c * 2P / F(c) + c * ctx * kv * a(c), with F(c) the
  matrix products' compute at batch c and a(c) attention's seconds per KV byte, both read off the
  table (each point smoothed with its neighbouring batches) and interpolated in log2(c). On a CPU
  the per-stream cost of a step falls as the batch grows (2 cores: 8.6 ms a token at batch 1, 3.6
  at 16), and attention over a 512-token context costs a third as much again, so neither the
  constant F nor KV bytes over bandwidth holds there.
- Prefill costs (prompt - cached) * 2P / F_prefill, where `cached` is what the engine's prefix
  cache serves: the role's shared system prompt, or a session's earlier turns as well.
- A closed loop of c agents, each sending its next request `think` seconds after its last answer.
  The engine interleaves the others' prefills with my decode, so a request of n output tokens takes
      E = pf + n * step(c) + (c - 1) * pf_mean * E / (E_mean + think)
  solved for the mean request, then for the P95 request (the P95 prompt and output; measured
  outputs, where answers stop early, have a P95 nearer the cap than their mean). TTFT is the
  prefill, one step, and the others' prefills already running; aggregate output tok/s is
  c * n_mean / (E_mean + think).
- Agents whose answers run to the same cap move in lockstep: they finish together and send their
  next prompts at once, so the last of a round waits for all c prefills (measured on the 2-core VM:
  a level's TTFTs come in groups of c equal values). The P95 request and TTFT are the worse of the
  two pictures: c * pf_p95 + n_p95 * step against the interleaved one above.
- A measured run of `rounds` requests per agent starts with all c agents sending at once (bench's
  closed loop does). That first round waits for all c prompts, then each agent that finishes
  before it sends its next prompt, whose prefill stalls it: c * pf_mean + n_p95 * step +
  q * (c - 1) * pf_mean. It is the run's slowest 1/rounds of requests, so the run's P95 request is
  the first round's at (1 - 0.05 * rounds), and q, the share of the others that finished before
  it, is about that quantile. From 20 rounds on the first round is within the slowest 5%, and the
  steady loop alone sets the P95; a prediction without a run (`rounds` None) is the steady loop.
- eta, F and t_step come from a profile (bench/profiles.yaml, each citing its source): one set per
  engine and profile, fitted to a published table. For `measured` they are calibrated from
  concurrency 1 and 2 of a baseline's sweep on the machine itself (STREAM gives its bandwidth):
  the step at 1 and 2 streams is the median gap between tokens (TPOT less the other stream's
  prefill where a baseline has no gaps). With the engine's batch table, F(c) and a(c) are the
  table's, scaled by one factor fitted to those two steps: what the server adds to the engine's.

Attention's own FLOPs and prefill chunking are left out; at 2k-token contexts on 7B models they
are within the fitted constants.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from bench.engine_table import EngineTable, smoothed
from bench.serving import LevelResult
from bench.workloads import SyntheticWorkload, make_workload
from dgxready.config import load_yaml
from dgxready.errors import DgxReadyError
from dgxready.roles import Role
from model.catalog import Catalog
from model.plan import KV_DTYPE_BYTES

PROFILES_PATH = Path(__file__).with_name("profiles.yaml")
PrefixCache = Literal["none", "system", "session"]
EngineName = Literal["llamacpp", "vllm"]
CHARS_PER_TOKEN = 4.0
MAX_OUTPUT_SEARCHED = 8192
# The slowest share of a level's requests above its P95.
P95_TAIL = 0.05


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchPoint(Strict):
    batch: int = Field(ge=1)
    decode_tflops: float = Field(gt=0, description="the decode step's matrix products at this batch")
    attention_s_per_gb: float = Field(ge=0, description="attention's cost per GB of KV cache a step "
                                                        "attends over, at this batch")


class EngineParams(Strict):
    eta: float = Field(gt=0, le=1.5, description="share of the memory bandwidth a decode step achieves")
    step_overhead_ms: float = Field(ge=0, description="fixed cost of a decode step")
    decode_tflops: float = Field(gt=0, description="sustained compute of a batched decode step")
    batch_curve: list[BatchPoint] = Field(default_factory=list, description=(
        "the engine's own compute by batch (from its batch table); empty: decode_tflops at every "
        "batch, and attention in the KV bytes only"))
    prefill_tflops: float = Field(gt=0, description="sustained compute of prompt processing")
    prefix_cache: PrefixCache = "system"
    source: str


class HardwareProfile(Strict):
    description: str
    bandwidth_gbps: float = Field(gt=0)
    memory_gb: float = Field(gt=0)
    unified_memory: bool = False
    source: str
    engines: dict[EngineName, EngineParams] = Field(min_length=1)


class ProfilesFile(Strict):
    profiles: dict[str, HardwareProfile] = Field(min_length=1)


def load_profiles(path: Path = PROFILES_PATH) -> dict[str, HardwareProfile]:
    return load_yaml(path, ProfilesFile).profiles


@dataclass(frozen=True)
class ModelShape:
    """`weight_bytes`: what a decode step reads of the weights; `kv_values_per_token`:
    2 * layers * KV heads * head dim."""
    name: str
    params: float
    weight_bytes: float
    kv_values_per_token: int
    kv_dtype_bytes: float

    @property
    def kv_bytes_per_token(self) -> float:
        return self.kv_values_per_token * self.kv_dtype_bytes


@dataclass(frozen=True)
class WorkloadShape:
    """Tokens per request. `system_tokens` are shared by every turn of a role; `history_tokens`
    are a session's earlier turns, which a session-aware prefix cache also serves."""
    name: str
    prompt_mean: float
    prompt_p95: float
    system_tokens: float
    history_tokens: float
    output_mean: float
    output_p95: float
    think_s: float = 0.0

    def cached(self, mode: PrefixCache) -> float:
        return {"none": 0.0, "system": self.system_tokens,
                "session": self.system_tokens + self.history_tokens}[mode]

    def with_output(self, tokens: float) -> WorkloadShape:
        return replace(self, output_mean=tokens, output_p95=tokens)


@dataclass(frozen=True)
class Scenario:
    bandwidth_gbps: float
    engine: EngineParams
    model: ModelShape
    workload: WorkloadShape


@dataclass(frozen=True)
class LevelPrediction:
    concurrency: int
    e2el_mean_s: float
    e2el_p95_s: float
    ttft_p95_s: float
    step_s: float
    output_tokens_per_s: float
    bound: Literal["memory", "compute"]


def curve_at(curve: list[BatchPoint], c: int) -> tuple[float, float]:
    """(TFLOPS, attention s/GB) at batch c: linear in log2 of the batch between the measured ones,
    the nearest measured one outside them."""
    points = sorted(curve, key=lambda p: p.batch)
    if c <= points[0].batch:
        return points[0].decode_tflops, points[0].attention_s_per_gb
    for lo, hi in itertools.pairwise(points):
        if c <= hi.batch:
            w = math.log2(c / lo.batch) / math.log2(hi.batch / lo.batch)
            return (lo.decode_tflops + w * (hi.decode_tflops - lo.decode_tflops),
                    lo.attention_s_per_gb + w * (hi.attention_s_per_gb - lo.attention_s_per_gb))
    return points[-1].decode_tflops, points[-1].attention_s_per_gb


def context_tokens(w: WorkloadShape) -> float:
    return w.prompt_mean + w.output_mean / 2


def engine_compute(engine: EngineParams, model: ModelShape, ctx: float, c: int) -> float:
    if not engine.batch_curve:
        return c * 2 * model.params / (engine.decode_tflops * 1e12)
    tflops, attention = curve_at(engine.batch_curve, c)
    return c * 2 * model.params / (tflops * 1e12) + c * ctx * model.kv_bytes_per_token * attention / 1e9


def decode_step(sc: Scenario, c: int) -> tuple[float, Literal["memory", "compute"]]:
    ctx = context_tokens(sc.workload)
    memory = (sc.model.weight_bytes + c * ctx * sc.model.kv_bytes_per_token) / (
        sc.engine.eta * sc.bandwidth_gbps * 1e9)
    compute = engine_compute(sc.engine, sc.model, ctx, c)
    overhead = sc.engine.step_overhead_ms / 1e3
    return (memory + overhead, "memory") if memory >= compute else (compute + overhead, "compute")


def prefill(sc: Scenario, prompt_tokens: float) -> float:
    uncached = max(prompt_tokens - sc.workload.cached(sc.engine.prefix_cache), 1.0)
    return uncached * 2 * sc.model.params / (sc.engine.prefill_tflops * 1e12)


def closed_loop_mean(own: float, others: float, think: float) -> float:
    """E = own + others * E / (E + think), for E > 0."""
    if think <= 0:
        return own + others
    b = own + others - think
    return (b + math.sqrt(b * b + 4 * own * think)) / 2


def first_round_share(c: int, rounds: float | None) -> float:
    """In a run of `rounds` requests per agent that starts with all c agents at once: the share of
    the first round finished before the run's P95 request, which is the first round's; 0 where the
    first round cannot set the P95 (no run, one agent, or 20 rounds and more)."""
    if rounds is None or c < 2:
        return 0.0
    return max(1 - P95_TAIL * rounds, 0.0)


def predict_level(sc: Scenario, c: int, rounds: float | None = None) -> LevelPrediction:
    """Level c of the steady loop, or of a run of `rounds` requests per agent (module docstring)."""
    w = sc.workload
    step, bound = decode_step(sc, c)
    pf_mean, pf_p95 = prefill(sc, w.prompt_mean), prefill(sc, w.prompt_p95)
    e_mean = closed_loop_mean(pf_mean + w.output_mean * step, (c - 1) * pf_mean, w.think_s)
    busy = min((c - 1) * pf_mean / (e_mean + w.think_s), 0.95)
    convoy_ttft = c * pf_p95 + step
    e_p95 = max((pf_p95 + w.output_p95 * step) / (1 - busy), convoy_ttft + (w.output_p95 - 1) * step)
    ttft = max(pf_p95 + step + (c - 1) * pf_mean * pf_mean / (e_mean + w.think_s), convoy_ttft)
    share = first_round_share(c, rounds)
    if share:
        e_p95 = max(e_p95, c * pf_mean + w.output_p95 * step + share * (c - 1) * pf_mean)
        ttft = max(ttft, c * pf_mean + step)
    return LevelPrediction(c, e_mean, e_p95, ttft, step, c * w.output_mean / (e_mean + w.think_s), bound)


def predict_curve(sc: Scenario, levels: list[int]) -> list[LevelPrediction]:
    return [predict_level(sc, c) for c in levels]


def capacity(sc: Scenario, slo_s: float, limit: int = 256) -> int:
    """The largest number of agents whose P95 E2EL meets the SLO (0 when one agent misses it)."""
    met = 0
    for c in range(1, limit + 1):
        if predict_level(sc, c).e2el_p95_s > slo_s:
            break
        met = c
    return met


def longest_output(sc: Scenario, agents: int, slo_s: float) -> int:
    """The longest output (tokens, every request) that `agents` agents can have under the SLO."""
    def meets(n: int) -> bool:
        return predict_level(replace(sc, workload=sc.workload.with_output(n)), agents).e2el_p95_s <= slo_s

    if not meets(1):
        return 0
    low, high = 1, MAX_OUTPUT_SEARCHED
    if meets(high):
        return high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if meets(mid) else (low, mid)
    return low


@dataclass(frozen=True)
class Lever:
    name: str
    description: str
    apply: Callable[[Scenario], Scenario] | None
    agents_divisor: int = 1


@dataclass(frozen=True)
class LeverEffect:
    name: str
    description: str
    capacity: int
    p95_e2el_at_target_s: float
    meets_target: bool


def _weights(bytes_per_param: float) -> Callable[[Scenario], Scenario]:
    def apply(sc: Scenario) -> Scenario:
        return replace(sc, model=replace(sc.model, weight_bytes=sc.model.params * bytes_per_param))
    return apply


def _fp8_kv(sc: Scenario) -> Scenario:
    return replace(sc, model=replace(sc.model, kv_dtype_bytes=1.0))


def _prefix_cache(sc: Scenario) -> Scenario:
    return replace(sc, engine=sc.engine.model_copy(update={"prefix_cache": "session"}))


# Speculative decoding: 3 draft tokens at 60% acceptance yield about 1.6 tokens per verified step
# (Leviathan et al., 2023); the gain is on memory-bound steps only, and fades as the batch grows.
SPECULATIVE_TOKENS_PER_STEP = 1.6


def _speculative(sc: Scenario) -> Scenario:
    return replace(sc, engine=sc.engine.model_copy(update={
        "eta": sc.engine.eta * SPECULATIVE_TOKENS_PER_STEP,
        "step_overhead_ms": sc.engine.step_overhead_ms / SPECULATIVE_TOKENS_PER_STEP}))


SPARK = "DGX Spark"


def second_machine(machine: str, engine: str) -> Lever:
    """Another `machine` ("DGX Spark", "GPU" or "host") serving the same model, half the agents each."""
    server = "vLLM replica" if engine == "vllm" else "llama-server"
    pair = " (vLLM with Ray over the 200 GbE link when one model needs both)" if machine == SPARK else ""
    what = f"a second {server} behind the multiplexer (a backend in multiplexer.yaml), half the agents each"
    return Lever(f"a second {machine}", what + pair, None, agents_divisor=2)


def levers_for(sc: Scenario, target_agents: int, slo_s: float, machine: str, engine: str) -> list[Lever]:
    bytes_per_param = sc.model.weight_bytes / sc.model.params
    out: list[Lever] = []
    if bytes_per_param > 0.7:
        out.append(Lever("4-bit weights", "Q4_K_M GGUF or AWQ/GPTQ: about 0.56 bytes a parameter",
                         _weights(0.5625)))
    if bytes_per_param > 1.2:
        out.append(Lever("FP8 weights", "FP8 checkpoint (vLLM): 1 byte a parameter", _weights(1.0)))
    if sc.model.kv_dtype_bytes > 1.0:
        out.append(Lever("FP8 KV cache", "--kv-cache-dtype fp8 (vLLM) or -ctk/-ctv q8_0 (llama.cpp): "
                                         "half the KV bytes a step reads", _fp8_kv))
    longest = longest_output(sc, target_agents, slo_s)
    if 0 < longest < sc.workload.output_p95:
        out.append(Lever("shorter role outputs", f"max_tokens <= {longest} in the role files",
                         lambda s: replace(s, workload=s.workload.with_output(longest))))
    if sc.engine.prefix_cache != "session":
        out.append(Lever("prefix caching", "keep each session's turns in the prefix cache "
                                           "(vLLM's automatic prefix caching)", _prefix_cache))
    out.append(Lever("speculative decoding", "a draft model or n-gram drafts (vLLM --speculative-config, "
                                             "llama-server -md): about 1.6 tokens a step when "
                                             "memory-bound", _speculative))
    out.append(second_machine(machine, engine))
    cap = capacity(sc, slo_s)
    if cap < target_agents:
        out.append(Lever("fewer agents", f"run {cap} agents instead of {target_agents}" if cap else
                         "no number of agents meets the SLO at these output lengths", None))
    return out


def lever_effect(sc: Scenario, lever: Lever, target_agents: int, slo_s: float) -> LeverEffect:
    changed = lever.apply(sc) if lever.apply else sc
    if lever.name == "fewer agents":
        cap = capacity(sc, slo_s)
        p95 = predict_level(sc, max(cap, 1)).e2el_p95_s
        return LeverEffect(lever.name, lever.description, cap, p95, False)
    per_replica = math.ceil(target_agents / lever.agents_divisor)
    p95 = predict_level(changed, per_replica).e2el_p95_s
    return LeverEffect(lever.name, lever.description, capacity(changed, slo_s) * lever.agents_divisor,
                       p95, p95 <= slo_s)


def ranked_levers(sc: Scenario, target_agents: int, slo_s: float, machine: str, engine: str
                  ) -> list[LeverEffect]:
    effects = [lever_effect(sc, lv, target_agents, slo_s)
               for lv in levers_for(sc, target_agents, slo_s, machine, engine)]
    return sorted(effects, key=lambda e: (e.name == "fewer agents", -e.capacity, e.p95_e2el_at_target_s))


def agents_workload_shape(roles: list[Role], max_tokens: int, turns: int, task_tokens: float = 20.0,
                          chars_per_token: float = CHARS_PER_TOKEN) -> WorkloadShape:
    """bench's `agents` workload in tokens: each role's system prompt, then `turns` turns, each
    carrying the earlier turns' questions and answers (answers as long as the role allows)."""
    prompts, systems, histories, outputs = [], [], [], []
    for role in roles:
        system = len(role.system_prompt()) / chars_per_token
        output = min(role.sampling.max_tokens, max_tokens)
        for turn in range(turns):
            history = turn * (task_tokens + output)
            prompts.append(system + history + task_tokens)
            systems.append(system)
            histories.append(history)
            outputs.append(output)
    return WorkloadShape("agents", _mean(prompts), _p95(prompts), _mean(systems), _mean(histories),
                         _mean(outputs), _p95(outputs))


def synthetic_workload_shape(input_words: tuple[int, int], output_tokens: tuple[int, int],
                             tokens_per_word: float = 1.3, template_tokens: float = 20.0) -> WorkloadShape:
    """bench's `synthetic` workload: uniform prompt words and output tokens, no shared prefix."""
    def uniform(lo: float, hi: float) -> tuple[float, float]:
        return (lo + hi) / 2, lo + 0.95 * (hi - lo)

    words_mean, words_p95 = uniform(*input_words)
    out_mean, out_p95 = uniform(*output_tokens)
    return WorkloadShape("synthetic", template_tokens + tokens_per_word * words_mean,
                         template_tokens + tokens_per_word * words_p95, 0.0, 0.0, out_mean, out_p95)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _p95(xs: list[float]) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


class CalibrationError(DgxReadyError):
    pass


def measured_tokens(level: LevelResult) -> tuple[float, float]:
    m = level.metrics
    if not m.completed:
        raise CalibrationError(f"concurrency {level.concurrency}: no request completed")
    return m.total_input_tokens / m.completed, m.total_output_tokens / m.completed


def measured_steps(one: LevelResult, two: LevelResult) -> tuple[float, float, float]:
    """(step at 1 stream, step at 2, prefill at 1). A step is the median gap between tokens,
    which the few steps that also ran the other stream's prefill do not move; without gaps, TPOT,
    less at 2 the other stream's prefill spread over the output. The prefill is TTFT at 1 less a
    step."""
    gaps = one.metrics.itl and two.metrics.itl
    s1 = one.metrics.itl.median if gaps else one.metrics.tpot.median
    pf = max(one.metrics.ttft.median - s1, 1e-4)
    if gaps:
        return s1, max(two.metrics.itl.median, s1), pf
    _, output = measured_tokens(one)
    return s1, max(two.metrics.tpot.median - pf / max(output - 1, 1), s1), pf


def calibrate(one: LevelResult, two: LevelResult, model: ModelShape, workload: WorkloadShape,
              bandwidth_gbps: float, source: str, curve: list[BatchPoint] | None = None) -> EngineParams:
    """Engine parameters that reproduce concurrency 1 and 2 of a measured sweep: the prefill rate
    from TTFT at 1, then the step's fixed and per-stream costs from the steps at 1 and 2. With the
    engine's batch curve, the curve scaled by one factor that fits the steps at 1 and 2."""
    if not (one.metrics.tpot and two.metrics.tpot and one.metrics.ttft):
        raise CalibrationError("calibration needs TPOT and TTFT at concurrency 1 and 2")
    s1, s2, pf = measured_steps(one, two)
    prompt, output = measured_tokens(one)
    uncached = max(prompt - workload.cached("system"), 1)
    prefill_tflops = uncached * 2 * model.params / pf / 1e12
    if curve:
        return curve_calibrated(s1, s2, one, two, model, workload, source, curve, prefill_tflops)
    memory = (model.weight_bytes + (prompt + output / 2) * model.kv_bytes_per_token) / (bandwidth_gbps * 1e9)
    per_stream = s2 - s1
    if per_stream < memory:
        per_stream = max((s2 - (s1 - memory)) / 2, per_stream)
    overhead = max(s1 - max(memory, per_stream), 0.0)
    return EngineParams(eta=1.0, step_overhead_ms=overhead * 1e3,
                        decode_tflops=2 * model.params / per_stream / 1e12,
                        prefill_tflops=prefill_tflops, prefix_cache="system", source=source)


def curve_calibrated(s1: float, s2: float, one: LevelResult, two: LevelResult, model: ModelShape,
                     workload: WorkloadShape, source: str, curve: list[BatchPoint],
                     prefill_tflops: float) -> EngineParams:
    """The engine's curve scaled by one factor, the least-squares fit of the server's steps at 1
    and 2 streams to the engine's at the same contexts (which weighs 2 streams, the nearer to the
    levels predicted, the more)."""
    engine = EngineParams(eta=1.0, step_overhead_ms=0.0, decode_tflops=curve_at(curve, 1)[0],
                          prefill_tflops=prefill_tflops, batch_curve=curve, source=source)
    e1, e2 = (engine_compute(engine, model, context_tokens(level_shape(workload, lv)), c)
              for lv, c in ((one, 1), (two, 2)))
    k = (s1 * e1 + s2 * e2) / (e1 * e1 + e2 * e2)
    scaled = [p.model_copy(update={"decode_tflops": p.decode_tflops / k,
                                   "attention_s_per_gb": p.attention_s_per_gb * k}) for p in curve]
    return engine.model_copy(update={"batch_curve": scaled, "decode_tflops": scaled[0].decode_tflops,
                                     "source": f"{source}; the server's steps are {k:.2f}x the engine's"})


def level_shape(workload: WorkloadShape, level: LevelResult) -> WorkloadShape:
    prompt, output = measured_tokens(level)
    return replace(workload, prompt_mean=prompt, output_mean=output)


def batch_curve(table: EngineTable, model: ModelShape) -> list[BatchPoint]:
    """F(B) and a(B) of `model` from its engine table, smoothed across neighbouring batches
    (engine_table.smoothed): attention's cost is the step's growth from context 0 to the table's
    depth, over that many tokens of KV per stream; the products' is what is left of the step at
    context 0 (whose tokens attend over half the test's prompt)."""
    table = smoothed(table)
    deep = max(table.depths)
    kv = model.kv_bytes_per_token
    out = []
    for b in table.batches:
        shallow = table.point(b, 0)
        if shallow is None:
            continue
        grown = table.point(b, deep).step_s - shallow.step_s if deep else 0.0
        per_byte = max(grown, 0.0) / (b * deep * kv) if deep else 0.0
        products = max(shallow.step_s - b * table.prompt_tokens / 2 * kv * per_byte, 0.05 * shallow.step_s)
        out.append(BatchPoint(batch=b, decode_tflops=b * 2 * model.params / products / 1e12,
                              attention_s_per_gb=per_byte * 1e9))
    return out


def model_shape(catalog: Catalog, name: str, fmt: str, kv_dtype: str) -> ModelShape:
    """Parameters and KV shape from the catalog's architecture; the bytes a step reads from the
    format's weight files."""
    if kv_dtype not in KV_DTYPE_BYTES:
        raise DgxReadyError(f"--kv-dtype {kv_dtype!r}: choose one of {', '.join(KV_DTYPE_BYTES)}")
    arch = catalog.model(name).architecture
    spec = catalog.format(name, fmt)
    return ModelShape(f"{name} {fmt}", arch.params, spec.weight_bytes,
                      2 * arch.layers * arch.kv_heads * arch.head_dim, KV_DTYPE_BYTES[kv_dtype])


def workload_shape(name: str, max_tokens: int, roles: list[Role], think_s: float = 0.0) -> WorkloadShape:
    """bench's workloads as make_workload builds them, in tokens."""
    workload = make_workload(name, max_tokens=max_tokens)
    if isinstance(workload, SyntheticWorkload):
        shape = synthetic_workload_shape(workload.input_words, workload.output_tokens)
    else:
        shape = agents_workload_shape(roles, max_tokens, workload.turns_per_conversation)
    return replace(shape, think_s=think_s)


def scaled_to_measured(shape: WorkloadShape, level: LevelResult) -> WorkloadShape:
    """The shape with its prompt tokens scaled to what the server counted, and the outputs as
    measured. Agents stop before max_tokens now and then: that shortens the mean output, not the
    P95 request's, which still runs to the cap. So the P95 output is the level's own P95 where the
    baseline has each request's output (schema version 3), and scaled with the mean otherwise."""
    prompt, output = measured_tokens(level)
    k = prompt / shape.prompt_mean
    output_p95 = (_p95(level.output_token_samples) if level.output_token_samples
                  else min(shape.output_p95, output * shape.output_p95 / shape.output_mean))
    return replace(shape, prompt_mean=prompt, prompt_p95=shape.prompt_p95 * k,
                   system_tokens=shape.system_tokens * k, history_tokens=shape.history_tokens * k,
                   output_mean=output, output_p95=output_p95)
