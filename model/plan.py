"""Memory plan: weights + KV cache for N concurrent sequences + runtime overhead, against the
memory this host has, and the engine flags that follow."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from dgxready.errors import DgxReadyError
from model.catalog import Architecture, ModelFormat
from model.gguf_meta import read_metadata
from model.memory import MemoryBudget

GiB = 1024**3
MiB = 1024**2
KV_DTYPE_BYTES = {"f16": 2.0, "bf16": 2.0, "auto": 2.0, "fp8": 1.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
# Fixed runtime cost beyond weights and KV: CUDA context, CUDA graphs and the activation peak for
# vLLM; compute buffers for llama.cpp. Both grow a little with the model, hence the fraction.
OVERHEAD = {"vllm": (2.0 * GiB, 0.05), "llamacpp": (256 * MiB, 0.05)}
HEADROOM = 0.05


class PlanDoesNotFit(DgxReadyError):
    pass


@dataclass(frozen=True)
class KvShape:
    layers: int
    kv_heads: int
    head_dim: int
    context_length: int
    source: str

    def bytes_per_token(self, kv_dtype: str) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * KV_DTYPE_BYTES[kv_dtype]


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    fmt: str
    engine: str
    agents: int
    ctx: int
    kv_dtype: str
    shape: KvShape
    weights_bytes: int
    kv_bytes_per_token: float
    kv_bytes: int
    overhead_bytes: int
    budget: MemoryBudget
    engine_flags: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.overhead_bytes

    @property
    def usable_bytes(self) -> int:
        return int(self.budget.available_bytes * (1 - HEADROOM))

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("weights", gib(self.weights_bytes)),
            (f"KV cache ({self.agents} seq x {self.ctx} tok x {self.kv_bytes_per_token / 1024:g} KiB,"
             f" {self.kv_dtype})", gib(self.kv_bytes)),
            (f"runtime overhead ({self.engine})", gib(self.overhead_bytes)),
            ("total needed", gib(self.total_bytes)),
            (f"available ({self.budget.kind}: {self.budget.source})", gib(self.budget.available_bytes)),
            (f"usable (minus {HEADROOM:.0%} headroom)", gib(self.usable_bytes)),
        ]


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def shape_from_catalog(arch: Architecture) -> KvShape:
    return KvShape(arch.layers, arch.kv_heads, arch.head_dim, arch.context_length, "catalog")


def shape_from_gguf(path: Path) -> KvShape:
    get = read_metadata(path).get
    arch = get("general.architecture")
    heads = get(f"{arch}.attention.head_count")
    head_dim = get(f"{arch}.attention.key_length") or get(f"{arch}.embedding_length") // heads
    return KvShape(
        layers=int(get(f"{arch}.block_count")),
        kv_heads=int(get(f"{arch}.attention.head_count_kv") or heads),
        head_dim=int(head_dim),
        context_length=int(get(f"{arch}.context_length")),
        source=f"GGUF metadata of {path.name}",
    )


def kv_shape(entry_path: Path, arch: Architecture) -> KvShape:
    """From the GGUF's own metadata when that file is there, else from the catalog's facts."""
    if entry_path.suffix == ".gguf" and entry_path.exists():
        return shape_from_gguf(entry_path)
    return shape_from_catalog(arch)


def engine_kv_dtype(engine: str, requested: str) -> str:
    """vLLM's name for the model's own KV dtype is `auto`."""
    return "auto" if engine == "vllm" and requested == "f16" else requested


def engine_flags(engine: str, agents: int, ctx: int, kv_dtype: str, total: int,
                 budget: MemoryBudget) -> list[str]:
    if engine == "vllm":
        # vLLM refuses to start when free memory < utilization x total, so never ask for more
        # than is free now.
        wanted = math.ceil((total / budget.total_bytes + 0.02) * 100) / 100
        ceiling = math.floor(budget.available_bytes * (1 - HEADROOM) / budget.total_bytes * 100) / 100
        util = max(0.05, min(wanted, ceiling, 0.95))
        return ["--gpu-memory-utilization", f"{util:.2f}", "--max-num-seqs", str(agents),
                "--max-model-len", str(ctx), "--kv-cache-dtype", "fp8" if kv_dtype == "fp8" else "auto"]
    flags = ["-np", str(agents), "-c", str(agents * ctx),
             "-ngl", "999" if budget.kind in ("gpu", "unified") else "0"]
    if kv_dtype in ("q8_0", "q4_0"):
        flags += ["--cache-type-k", kv_dtype, "--cache-type-v", kv_dtype]
    return flags


def make_plan(model: str, fmt: str, spec: ModelFormat, shape: KvShape, agents: int, ctx: int,
              kv_dtype: str, budget: MemoryBudget) -> MemoryPlan:
    if kv_dtype not in KV_DTYPE_BYTES:
        raise DgxReadyError(f"--kv-dtype {kv_dtype!r}: choose one of {', '.join(KV_DTYPE_BYTES)}")
    if spec.engine == "vllm" and kv_dtype in ("q8_0", "q4_0"):
        raise DgxReadyError(f"--kv-dtype {kv_dtype}: vLLM takes auto, bf16, f16 or fp8")
    if spec.engine == "llamacpp" and kv_dtype == "fp8":
        raise DgxReadyError("--kv-dtype fp8: llama.cpp takes f16, q8_0 or q4_0")
    if ctx > shape.context_length:
        raise DgxReadyError(f"--ctx {ctx} exceeds the model's context length {shape.context_length}")
    per_token = shape.bytes_per_token(kv_dtype)
    weights = spec.weight_bytes
    kv = int(per_token * agents * ctx)
    fixed, frac = OVERHEAD[spec.engine]
    overhead = int(fixed + frac * weights)
    total = weights + kv + overhead
    flags = engine_flags(spec.engine, agents, ctx, kv_dtype, total, budget)
    return MemoryPlan(model, fmt, spec.engine, agents, ctx, kv_dtype, shape, weights, per_token,
                      kv, overhead, budget, flags)


def require_fit(plan: MemoryPlan) -> MemoryPlan:
    if plan.fits:
        return plan
    table = "\n".join(f"  {k}: {v}" for k, v in plan.rows())
    short = plan.total_bytes - plan.usable_bytes
    raise PlanDoesNotFit(
        f"{plan.model} ({plan.fmt}) with {plan.agents} agents at ctx {plan.ctx} does not fit: "
        f"{gib(short)} short\n{table}\n"
        "try fewer agents, a shorter --ctx, a quantized KV cache (--kv-dtype fp8 or q8_0) "
        "or a quantized format"
    )
