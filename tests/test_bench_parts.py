"""Hardware facts, microbenchmarks and the baseline schema (no inference server needed)."""
import errno
import json
import os
import platform
import subprocess
import sys
import types

import pytest

from bench import hw
from bench.report import committed_schema, generated_schema, load_baseline
from bench.storage import run_storage
from bench.stream import array_elements, run_stream
from dgxready.errors import DgxReadyError


def test_committed_schema_matches_the_models():
    assert committed_schema() == generated_schema(), "run `python -m bench.report` and bump the version"


def test_stream_reports_all_four_kernels():
    assert array_elements(64 << 20) * 8 == 4 * (64 << 20)
    r = run_stream(None, threads=2, repetitions=2, elements=4_000_000)
    assert set(r.best_gbps) == {"copy", "scale", "add", "triad"}
    assert all(v > 0.1 for v in r.best_gbps.values())
    assert r.threads == 2


def test_storage_uses_o_direct_and_cleans_up(tmp_path):
    r = run_storage(tmp_path, size=8 << 20, rand_seconds=0.2, high_qd=4)
    assert [j.name for j in r.jobs] == ["seq_write_1m", "seq_read_1m", "rand_read_4k_qd1",
                                        "rand_read_4k_qd4"]
    assert all(j.iops > 0 and j.bandwidth_mbps > 0 for j in r.jobs)
    assert r.mode == "direct"
    assert not list(tmp_path.iterdir())


def test_storage_without_o_direct_is_labelled_buffered(tmp_path, monkeypatch):
    # Simulated filesystem that refuses O_DIRECT (as some network and FUSE filesystems do).
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    r = run_storage(tmp_path, size=4 << 20, rand_seconds=0.1, high_qd=2)
    assert r.mode == "buffered" and {j.mode for j in r.jobs} == {"buffered"}


class FakeNvml(types.SimpleNamespace):
    """Simulated NVML for a DGX Spark: GB10 answers NOT_SUPPORTED to memory queries."""


def fake_nvml():
    class NVMLError(Exception):
        pass

    class NotSupported(NVMLError):
        def __str__(self):
            return "Not Supported"

    def unsupported(*a):
        raise NotSupported()

    return FakeNvml(
        NVMLError=NVMLError, NVMLError_NotSupported=NotSupported, NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2,
        NVML_TEMPERATURE_GPU=0, nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"NVIDIA GB10", nvmlDeviceGetCudaComputeCapability=lambda h: (12, 1),
        nvmlSystemGetDriverVersion=lambda: "580.95.05", nvmlSystemGetCudaDriverVersion=lambda: 13000,
        nvmlDeviceGetMemoryInfo=unsupported, nvmlDeviceGetMaxClockInfo=lambda h, k: 3003,
        nvmlDeviceGetEnforcedPowerLimit=unsupported, nvmlDeviceGetTemperature=lambda h, k: 47,
    )


def test_gb10_memory_falls_back_to_meminfo_and_profile_passes(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    gpus = hw.gpu_reports()
    assert len(gpus) == 1 and gpus[0].unified_memory
    assert gpus[0].compute_capability == "12.1" and gpus[0].cuda_driver_version == "13.0"
    assert set(gpus[0].nvml_failed) == {"memory_info", "power_limit"}
    host = hw.host_facts()
    spark = host.__class__(**{**host.__dict__, "architecture": "aarch64",
                              "memory_total_bytes": 128 * 10**9})
    checks = hw.check_profile("dgx-spark", spark, gpus)
    assert all(c.passed for c in checks), checks


NO_GPU_NVML = """
class NVMLError(Exception):
    pass


def nvmlInit():
    raise NVMLError("Driver Not Loaded")
"""

GB10_NVML = """
class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    def __str__(self):
        return "Not Supported"


def unsupported(*a):
    raise NVMLError_NotSupported()


NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0
nvmlInit = nvmlShutdown = lambda: None
nvmlDeviceGetCount = lambda: 1
nvmlDeviceGetHandleByIndex = lambda i: i
nvmlDeviceGetName = lambda h: b"NVIDIA GB10"
nvmlDeviceGetCudaComputeCapability = lambda h: (12, 1)
nvmlSystemGetDriverVersion = lambda: "580.95.05"
nvmlSystemGetCudaDriverVersion = lambda: 13000
nvmlDeviceGetMemoryInfo = nvmlDeviceGetEnforcedPowerLimit = unsupported
nvmlDeviceGetMaxClockInfo = lambda h, k: 3003
nvmlDeviceGetTemperature = lambda h, k: 47
"""


def bench_hw(tmp_path, nvml: str, *flags: str) -> subprocess.CompletedProcess:
    """`invoke bench.hw` with a simulated NVML (a pynvml module ahead of the real one on the
    path), so that the result is the same on a laptop and on a DGX."""
    fake = tmp_path / "fake-nvml"
    fake.mkdir(exist_ok=True)
    (fake / "pynvml.py").write_text(nvml)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(fake), *sys.path])}
    return subprocess.run([sys.executable, "-m", "invoke", "bench.hw", *flags], capture_output=True,
                          text=True, env=env, timeout=120)


def test_bench_hw_on_a_host_without_a_gpu_passes_generic_and_fails_dgx_spark(tmp_path):
    generic = bench_hw(tmp_path, NO_GPU_NVML)
    assert generic.returncode == 0, generic.stdout + generic.stderr
    assert "no NVIDIA GPU (NVML found none)" in generic.stdout and "GpuReport" not in generic.stdout
    assert f"architecture='{platform.machine()}'" in generic.stdout
    assert f"logical_cpus={os.cpu_count()}" in generic.stdout
    assert "PASS generic profile" in generic.stdout
    spark = bench_hw(tmp_path, NO_GPU_NVML, "--profile", "dgx-spark")
    assert spark.returncode == 1 and "FAIL GPU is GB10: no GPU" in spark.stdout


def test_bench_hw_on_a_gb10_host_reports_the_gpu_from_nvml(tmp_path):
    generic = bench_hw(tmp_path, GB10_NVML)
    assert generic.returncode == 0, generic.stdout + generic.stderr
    assert "name='NVIDIA GB10'" in generic.stdout and "unified_memory=True" in generic.stdout
    assert "no NVIDIA GPU" not in generic.stdout
    spark = bench_hw(tmp_path, GB10_NVML, "--profile", "dgx-spark")
    assert "PASS GPU is GB10: NVIDIA GB10" in spark.stdout
    assert "PASS compute capability 12.1" in spark.stdout and "PASS CUDA driver >= 13" in spark.stdout
    host = hw.host_facts()
    spark_host = host.architecture == "aarch64" and 100 <= host.memory_total_bytes / 1024**3 <= 136
    assert spark.returncode == (0 if spark_host else 1), spark.stdout


def test_invalid_baselines_name_the_json_path(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "dgxready-bench-baseline/1", "created_at": 5}))
    with pytest.raises(DgxReadyError) as err:
        load_baseline(bad)
    assert f"{bad}: $.created_at: 5 is not of type 'string'" in str(err.value)
    assert "$: 'environment' is a required property" in str(err.value)
    truncated = tmp_path / "cut.json"
    truncated.write_text('{"schema": "dgxready-bench-baseline/1", "created')
    with pytest.raises(DgxReadyError, match="not JSON \\(truncated\\?\\)"):
        load_baseline(truncated)


def test_network_to_a_peer_server_on_another_address(tmp_path):
    import socket
    import time

    from bench.runner import micro, parse_peer
    from dgxready.cli import out

    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        port = s.getsockname()[1]
    peer = subprocess.Popen([sys.executable, "-m", "bench.net", "--serve", "--host", "127.0.0.2",
                             "--port", str(port)])
    try:
        for _ in range(50):
            try:
                socket.create_connection(("127.0.0.2", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        m = micro(tmp_path, out, stream_reps=1, io_bytes=4 << 20, peers=(f"127.0.0.2:{port}",))
        assert [n.target.split(":")[0] for n in m.network] == ["127.0.0.1", "127.0.0.2"]
        assert m.network[1].throughput_gbps > 0 and m.network[1].rtt_p50_us > 0
    finally:
        peer.kill()
    with pytest.raises(DgxReadyError, match="give HOST:PORT"):
        parse_peer("nohostport")
