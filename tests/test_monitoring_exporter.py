"""The dgxready exporter. This machine has no GPU, so the no-GPU case runs on the real NVML path; the
GB10 case (memory queries answer NOT_SUPPORTED), a failing NVML call and an XID event are SIMULATED
with a fake pynvml module, since no such GPU can run here. Engines and the multiplexer are real."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import httpx
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dgxready.ports import free_port
from dgxready.settings import REPO_ROOT
from model.procs import proc_start_time
from model.serve import ServerState
from monitoring.exporter import ExporterOptions, make_registry
from tests.agents_helpers import start_mux

MEMINFO = "MemTotal:       131072000 kB\nMemFree:         1000000 kB\nMemAvailable:   98304000 kB\n"


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def scrape(registry) -> dict[str, list]:
    return samples(generate_latest(registry).decode())


def value(found: dict[str, list], name: str) -> float:
    assert name in found, f"{name} not exported; have {sorted(found)}"
    return found[name][0].value


def options(tmp_path: Path, mux_url: str | None = None) -> ExporterOptions:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    return ExporterOptions(models_dir=tmp_path / "store", state_dir=tmp_path / "state", mux_url=mux_url,
                           meminfo=meminfo, baselines=tmp_path / "baselines")


class FakeNvml:
    """SIMULATED pynvml: one GB10-like GPU whose memory queries raise NOT_SUPPORTED, as NVML does on
    DGX Spark. `failing` names calls that raise a plain NVMLError (a GPU in trouble mid-scrape)."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):  # noqa: N801 - pynvml's names
        pass

    class NVMLError_Timeout(NVMLError):  # noqa: N801
        pass

    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM, NVML_CLOCK_MEM = 0, 1, 2
    nvmlEventTypeXidCriticalError = 8

    def __init__(self) -> None:
        self.failing: set[str] = set()
        self.xid_queue: list[int] = []

    def call(self, name: str, result):
        if name in self.failing:
            raise self.NVMLError(f"simulated failure of {name}")
        return result

    def nvmlInit(self): return None  # noqa: E704, N802
    def nvmlDeviceGetCount(self): return 1  # noqa: E704, N802
    def nvmlDeviceGetHandleByIndex(self, i): return f"handle{i}"  # noqa: E704, N802
    def nvmlDeviceGetUUID(self, h): return b"GPU-5a1e0000-0000-0000-0000-000000000010"  # noqa: E704, N802
    def nvmlDeviceGetName(self, h): return b"NVIDIA GB10"  # noqa: E704, N802

    def nvmlDeviceGetMemoryInfo(self, h):  # noqa: N802
        raise self.NVMLError_NotSupported("Not Supported")

    def nvmlDeviceGetUtilizationRates(self, h):  # noqa: N802
        return self.call("util", SimpleNamespace(gpu=37, memory=0))

    def nvmlDeviceGetTemperature(self, h, sensor):  # noqa: N802
        return self.call("temperature", 61)

    def nvmlDeviceGetPowerUsage(self, h):  # noqa: N802
        return self.call("power", 45250)

    def nvmlDeviceGetClockInfo(self, h, clock):  # noqa: N802
        return self.call("clocks", {self.NVML_CLOCK_SM: 2418, self.NVML_CLOCK_MEM: 4266}[clock])

    def nvmlEventSetCreate(self): return "events"  # noqa: E704, N802
    def nvmlDeviceRegisterEvents(self, h, types, events): return None  # noqa: E704, N802

    def nvmlEventSetWait_v2(self, events, timeout_ms):  # noqa: N802
        if not self.xid_queue:
            raise self.NVMLError_Timeout("Timeout")
        return SimpleNamespace(device="handle0", eventData=self.xid_queue.pop(0))


def test_without_a_gpu_the_exporter_still_exports_the_host_part(tmp_path):
    found = scrape(make_registry(options(tmp_path)))  # the real pynvml: no driver, no GPU here
    assert value(found, "dgxready_exporter_gpu_available") == 0
    assert not any(name.startswith("DCGM_") for name in found)
    disk_total = value(found, "dgxready_model_store_disk_total_bytes")
    assert disk_total > value(found, "dgxready_model_store_disk_free_bytes") > 0
    assert "dgxready_unified_memory_total_bytes" not in found


def test_a_gb10_whose_nvml_memory_is_not_supported_exports_the_unified_pool_from_meminfo(tmp_path):
    found = scrape(make_registry(options(tmp_path), FakeNvml()))  # SIMULATED GB10, see FakeNvml
    assert value(found, "dgxready_exporter_gpu_available") == 1
    assert value(found, "dgxready_unified_memory_total_bytes") == 131072000 * 1024
    assert value(found, "dgxready_unified_memory_available_bytes") == 98304000 * 1024
    assert "DCGM_FI_DEV_FB_USED" not in found and "DCGM_FI_DEV_FB_FREE" not in found
    temp = found["DCGM_FI_DEV_GPU_TEMP"][0]
    assert temp.value == 61 and temp.labels["modelName"] == "NVIDIA GB10" and temp.labels["gpu"] == "0"
    assert temp.labels["UUID"].startswith("GPU-5a1e")
    assert value(found, "DCGM_FI_DEV_POWER_USAGE") == 45.25
    assert value(found, "DCGM_FI_DEV_GPU_UTIL") == 37
    assert (value(found, "DCGM_FI_DEV_SM_CLOCK"), value(found, "DCGM_FI_DEV_MEM_CLOCK")) == (2418, 4266)
    assert value(found, "DCGM_FI_DEV_XID_ERRORS") == 0


def test_an_xid_event_shows_as_the_last_xid_of_its_gpu(tmp_path):
    nvml = FakeNvml()  # SIMULATED: NVML queues an XID 79 (fallen off the bus) event
    registry = make_registry(options(tmp_path), nvml)
    nvml.xid_queue.append(79)
    assert value(scrape(registry), "DCGM_FI_DEV_XID_ERRORS") == 79


def test_an_nvml_error_mid_scrape_leaves_out_that_value_and_the_exporter_goes_on(tmp_path):
    nvml = FakeNvml()  # SIMULATED: the temperature query starts failing after the first scrape
    registry = make_registry(options(tmp_path), nvml)
    assert value(scrape(registry), "DCGM_FI_DEV_GPU_TEMP") == 61
    nvml.failing = {"temperature", "power"}
    found = scrape(registry)
    assert "DCGM_FI_DEV_GPU_TEMP" not in found and "DCGM_FI_DEV_POWER_USAGE" not in found
    assert value(found, "DCGM_FI_DEV_GPU_UTIL") == 37
    assert value(found, "dgxready_model_store_disk_total_bytes") > 0
    errors = {s.labels["source"]: s.value for s in found["dgxready_exporter_collect_errors_total"]}
    assert errors == {"nvml": 2}
    nvml.failing = set()
    assert value(scrape(registry), "DCGM_FI_DEV_GPU_TEMP") == 61


def test_a_section_that_raises_is_counted_and_the_rest_is_still_exported(tmp_path):
    nvml = FakeNvml()  # SIMULATED: NVML answers garbage that breaks the GPU section outright
    registry = make_registry(options(tmp_path), nvml)
    nvml.nvmlDeviceGetUtilizationRates = lambda h: object()  # has no .gpu: AttributeError
    found = scrape(registry)
    assert not any(name.startswith("DCGM_") for name in found)
    assert value(found, "dgxready_model_store_disk_free_bytes") > 0
    errors = {s.labels["source"]: s.value for s in found["dgxready_exporter_collect_errors_total"]}
    assert errors == {"gpu": 1}


def record_engine(state_dir: Path, proc: subprocess.Popen, port: int) -> None:
    state = ServerState("smollm2-135m", "gguf-q4_1", "llamacpp", "test", proc.pid, proc_start_time(proc.pid),
                        "127.0.0.1", port, 2, "/dev/null", ["sleep"], time.time())
    (state_dir / "servers").mkdir(parents=True, exist_ok=True)
    (state_dir / "servers" / f"{port}.json").write_text(json.dumps(asdict(state)))


def engine_sample(found: dict[str, list], name: str) -> float:
    return next(s.value for s in found[name] if s.labels["port"] == "8080")


def test_the_recorded_engine_is_up_with_its_memory_then_down_then_a_restart_is_counted(tmp_path, processes):
    opts = options(tmp_path)
    registry = make_registry(opts)
    first = processes.start(["sleep", "300"])
    record_engine(opts.state_dir, first, 8080)
    found = scrape(registry)
    assert engine_sample(found, "dgxready_engine_up") == 1
    assert engine_sample(found, "dgxready_engine_resident_memory_bytes") > 0
    assert engine_sample(found, "dgxready_engine_restarts_total") == 0
    first.kill()
    first.wait()
    assert engine_sample(scrape(registry), "dgxready_engine_up") == 0
    record_engine(opts.state_dir, processes.start(["sleep", "300"]), 8080)
    found = scrape(registry)
    assert engine_sample(found, "dgxready_engine_up") == 1
    assert engine_sample(found, "dgxready_engine_restarts_total") == 1


def test_the_multiplexer_health_is_read_from_a_real_multiplexer(tmp_path):
    mux = start_mux(tmp_path, [("local", f"http://127.0.0.1:{free_port()}", 2)])  # its backend is down
    try:
        found = scrape(make_registry(options(tmp_path, mux.url)))
        assert value(found, "dgxready_multiplexer_up") == 1
        assert value(found, "dgxready_multiplexer_healthy") == 0
        assert value(found, "dgxready_multiplexer_backends_up") == 0
    finally:
        mux.mux.stop()
    found = scrape(make_registry(options(tmp_path, mux.url)))
    assert value(found, "dgxready_multiplexer_up") == 0


def test_the_exporter_process_serves_metrics_over_http(tmp_path, processes):
    port = free_port()
    processes.start([sys.executable, "-m", "monitoring.exporter", "--port", str(port), "--state-dir",
                     str(tmp_path / "state"), "--models-dir", str(tmp_path)], cwd=REPO_ROOT,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            resp = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the exporter did not start listening"
            time.sleep(0.2)
    found = samples(resp.text)
    assert value(found, "dgxready_exporter_gpu_available") == 0
    assert found["dgxready_model_store_disk_total_bytes"][0].labels["path"] == str(tmp_path)


def test_each_hosts_newest_measured_capacity_is_exported_and_a_truncated_baseline_is_skipped(tmp_path):
    host = tmp_path / "baselines" / "spark-1"
    host.mkdir(parents=True)
    capacity = {"max_concurrency_meeting_slo": 3, "slo_p95_e2el_s": 6.0, "workload": {"name": "agents"}}
    old = {"host": "spark-1", "created_at": "a", "capacity": capacity}
    new = old | {"created_at": "b", "capacity": old["capacity"] | {"max_concurrency_meeting_slo": 9}}
    (host / "20260101T000000Z.json").write_text(json.dumps(old))
    (host / "20260102T000000Z.json").write_text(json.dumps(new))
    (host / "20260103T000000Z.json").write_text(json.dumps(new)[:40])
    found = scrape(make_registry(options(tmp_path)))
    [sample] = found["dgxready_bench_capacity_agents"]
    assert sample.labels == {"host": "spark-1", "workload": "agents"} and sample.value == 9
