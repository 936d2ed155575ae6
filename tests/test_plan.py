import pytest

from model.catalog import load_catalog
from model.gpu import GpuFacts
from model.memory import MemoryBudget, budget_from
from model.plan import (
    PlanDoesNotFit,
    make_plan,
    require_fit,
    shape_from_catalog,
    shape_from_gguf,
)

GiB = 1024**3
MISTRAL = "mistral-7b-instruct-v0.3"


def mistral(fmt):
    entry = load_catalog().model(MISTRAL)
    return entry.formats[fmt], shape_from_catalog(entry.architecture)


def test_mistral_fp16_kv_is_128_kib_per_token():
    _, shape = mistral("safetensors-bf16")
    assert shape.bytes_per_token("f16") == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    assert shape.bytes_per_token("fp8") == 64 * 1024


def test_mistral_plan_adds_up_by_hand():
    spec, shape = mistral("safetensors-bf16")
    budget = MemoryBudget("gpu", 80 * GiB, 78 * GiB, "test budget")
    plan = make_plan(MISTRAL, "safetensors-bf16", spec, shape, 10, 4096, "auto", budget)
    weights = 4949453792 + 4999819336 + 4546807800
    assert plan.weights_bytes == weights
    assert plan.kv_bytes == 10 * 4096 * 131072 == 5 * GiB
    assert plan.overhead_bytes == int(2 * GiB + 0.05 * weights)
    assert plan.total_bytes == weights + 5 * GiB + int(2 * GiB + 0.05 * weights)
    util = float(plan.engine_flags[plan.engine_flags.index("--gpu-memory-utilization") + 1])
    assert util == pytest.approx(plan.total_bytes / (80 * GiB) + 0.02, abs=0.011)
    assert plan.engine_flags[2:] == ["--max-num-seqs", "10", "--max-model-len", "4096",
                                     "--kv-cache-dtype", "auto"]
    assert plan.fits


def test_llamacpp_flags_split_context_across_slots():
    spec, shape = mistral("gguf-q4_k_m")
    budget = MemoryBudget("cpu", 32 * GiB, 30 * GiB, "test")
    plan = make_plan(MISTRAL, "gguf-q4_k_m", spec, shape, 10, 4096, "q8_0", budget)
    assert plan.engine_flags == ["-np", "10", "-c", "40960", "-ngl", "0",
                                 "--cache-type-k", "q8_0", "--cache-type-v", "q8_0"]
    assert plan.kv_bytes == int(10 * 4096 * 2 * 32 * 8 * 128 * 34 / 32)


def test_plan_refuses_with_the_numbers():
    spec, shape = mistral("safetensors-bf16")
    budget = MemoryBudget("gpu", 16 * GiB, 15 * GiB, "test 16 GiB card")
    plan = make_plan(MISTRAL, "safetensors-bf16", spec, shape, 10, 4096, "auto", budget)
    with pytest.raises(PlanDoesNotFit) as err:
        require_fit(plan)
    msg = str(err.value)
    assert "does not fit" in msg and "total needed: 21.18 GiB" in msg and "6.93 GiB short" in msg
    assert "available (gpu: test 16 GiB card): 15.00 GiB" in msg


def test_dgx_spark_budget_uses_meminfo_when_nvml_memory_is_not_supported():
    # Simulated NVML: GB10 answers NOT_SUPPORTED for memory, which gpu_facts records as None.
    gb10 = GpuFacts(0, "NVIDIA GB10", (12, 1), None, None, unified_memory=True)
    budget = budget_from([gb10], mem_total=128 * GiB, mem_available=119 * GiB)
    assert (budget.kind, budget.total_bytes, budget.available_bytes) == ("unified", 128 * GiB, 119 * GiB)
    spec, shape = mistral("fp8")
    plan = make_plan(MISTRAL, "fp8", spec, shape, 10, 4096, "fp8", budget)
    assert plan.kv_bytes == 10 * 4096 * 64 * 1024
    util = float(plan.engine_flags[1])
    assert 0.05 <= util <= 0.2


def test_gpu_and_cpu_budgets():
    h100 = GpuFacts(0, "NVIDIA H100", (9, 0), 80 * GiB, 79 * GiB, unified_memory=False)
    assert budget_from([h100], 100, 50).kind == "gpu"
    assert budget_from([h100], 100, 50).available_bytes == 79 * GiB
    assert budget_from([], 100, 50) == MemoryBudget("cpu", 100, 50, budget_from([], 100, 50).source)


def test_smollm2_shape_comes_from_its_gguf(session_store):
    path = session_store / "smollm2-135m" / "gguf-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shape = shape_from_gguf(path)
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.context_length) == (30, 3, 64, 8192)
    assert shape.bytes_per_token("f16") == 2 * 30 * 3 * 64 * 2 == 23040


def test_bad_kv_dtype_and_ctx_are_refused():
    spec, shape = mistral("gguf-q8_0")
    budget = MemoryBudget("cpu", 64 * GiB, 60 * GiB, "t")
    with pytest.raises(Exception, match="llama.cpp takes"):
        make_plan(MISTRAL, "gguf-q8_0", spec, shape, 1, 1024, "fp8", budget)
    with pytest.raises(Exception, match="exceeds the model's context length 32768"):
        make_plan(MISTRAL, "gguf-q8_0", spec, shape, 1, 65536, "f16", budget)
