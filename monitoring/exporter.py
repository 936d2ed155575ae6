"""The dgxready exporter: GPU metrics through NVML under dcgm-exporter's names (so dashboards and
alerts work with either), the unified memory pool on GB10 (where NVML's memory queries answer
NOT_SUPPORTED) from /proc/meminfo, the model store's disk, the engine processes that `model.serve`
recorded, and the multiplexer's /health. Everything is read when Prometheus scrapes, in-process:
no subprocess per scrape. Without a GPU (or without NVML) the host part is still exported.

`python -m monitoring.exporter --port 9400`"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pynvml
from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from dgxready.settings import BASELINES_DIR, Settings, load_settings
from model.gpu import meminfo_bytes
from model.procs import is_running
from model.serve import ServerState, load_states
from monitoring.capacity import CapacityCollector

GPU_LABELS = ["gpu", "UUID", "device", "modelName", "Hostname"]
ENGINE_LABELS = ["model", "backend", "port"]
MAX_XID_EVENTS_PER_SCRAPE = 64
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ExporterOptions:
    models_dir: Path
    state_dir: Path
    mux_url: str | None = None
    mux_timeout_s: float = 1.0
    meminfo: Path = Path("/proc/meminfo")
    baselines: Path = BASELINES_DIR


def options_from_settings(settings: Settings, mux_url: str | None) -> ExporterOptions:
    return ExporterOptions(models_dir=settings.models_dir, state_dir=settings.state_dir, mux_url=mux_url)


@dataclass(frozen=True)
class GpuSample:
    """One GPU's readings of one scrape; None where NVML does not report the value."""
    index: int
    uuid: str
    name: str
    unified_memory: bool
    util_percent: float | None = None
    fb_used_mib: float | None = None
    fb_free_mib: float | None = None
    temp_c: float | None = None
    power_w: float | None = None
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    last_xid: int | None = None


@dataclass
class ErrorCounts:
    """Errors met while collecting, by where they happened; the exporter goes on either way."""
    by_source: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, source: str) -> None:
        with self.lock:
            self.by_source[source] = self.by_source.get(source, 0) + 1


def text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlGpus:
    """NVML opened once at start; each scrape reads the devices. `nvml` is the pynvml module (a test
    hands in a fake one where no GPU exists)."""

    def __init__(self, nvml: ModuleType | Any, errors: ErrorCounts) -> None:
        self.nvml, self.errors = nvml, errors
        self.handles: list[Any] = []
        self.identity: list[tuple[str, str]] = []
        self.unavailable_reason = ""
        self.xid_events: Any = None
        self.last_xid: dict[str, int] = {}
        self.lock = threading.Lock()
        self.open()

    @property
    def available(self) -> bool:
        return bool(self.handles)

    def open(self) -> None:
        try:
            self.nvml.nvmlInit()
            self.handles = [self.nvml.nvmlDeviceGetHandleByIndex(i)
                            for i in range(self.nvml.nvmlDeviceGetCount())]
            self.identity = [(text(self.nvml.nvmlDeviceGetUUID(h)), text(self.nvml.nvmlDeviceGetName(h)))
                             for h in self.handles]
        except self.nvml.NVMLError as exc:
            self.handles, self.unavailable_reason = [], f"NVML: {exc}"
            return
        self.unavailable_reason = "" if self.handles else "NVML reports no GPU"
        self.xid_events = self.register_xid_events()

    def register_xid_events(self) -> Any:
        try:
            events = self.nvml.nvmlEventSetCreate()
        except self.nvml.NVMLError:
            return None
        for (uuid, _), handle in zip(self.identity, self.handles, strict=True):
            try:
                self.nvml.nvmlDeviceRegisterEvents(handle, self.nvml.nvmlEventTypeXidCriticalError, events)
                self.last_xid[uuid] = 0
            except self.nvml.NVMLError:
                continue
        return events

    def drain_xid_events(self) -> None:
        """Note the newest XID per GPU from the events NVML queued since the last scrape."""
        if self.xid_events is None:
            return
        for _ in range(MAX_XID_EVENTS_PER_SCRAPE):
            try:
                event = self.nvml.nvmlEventSetWait_v2(self.xid_events, 0)
            except self.nvml.NVMLError_Timeout:
                return
            except self.nvml.NVMLError:
                self.errors.add("nvml")
                return
            self.last_xid[text(self.nvml.nvmlDeviceGetUUID(event.device))] = int(event.eventData)

    def read(self, call: Callable[[], Any]) -> Any:
        """One NVML query; None when NVML does not support it or fails (counted), never raised."""
        try:
            return call()
        except self.nvml.NVMLError_NotSupported:
            return None
        except self.nvml.NVMLError:
            self.errors.add("nvml")
            return None

    def sample(self, index: int) -> GpuSample:
        nv, h = self.nvml, self.handles[index]
        uuid, name = self.identity[index]
        util = self.read(lambda: nv.nvmlDeviceGetUtilizationRates(h))
        mem, unified = self.memory(h)
        power_mw = self.read(lambda: nv.nvmlDeviceGetPowerUsage(h))
        return GpuSample(
            index=index, uuid=uuid, name=name, unified_memory=unified,
            util_percent=None if util is None else float(util.gpu),
            fb_used_mib=None if mem is None else mem.used / 2**20,
            fb_free_mib=None if mem is None else mem.free / 2**20,
            temp_c=self.read(lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            power_w=None if power_mw is None else power_mw / 1000,
            sm_clock_mhz=self.read(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
            mem_clock_mhz=self.read(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)),
            last_xid=self.last_xid.get(uuid))

    def memory(self, handle: Any) -> tuple[Any, bool]:
        """The framebuffer's memory info, or (None, True) where memory is unified (GB10)."""
        try:
            return self.nvml.nvmlDeviceGetMemoryInfo(handle), False
        except self.nvml.NVMLError_NotSupported:
            return None, True
        except self.nvml.NVMLError:
            self.errors.add("nvml")
            return None, False

    def samples(self) -> list[GpuSample]:
        with self.lock:
            self.drain_xid_events()
            return [self.sample(i) for i in range(len(self.handles))]


@dataclass(frozen=True)
class GpuField:
    metric: str
    help: str
    value: Callable[[GpuSample], float | None]


GPU_FIELDS = (
    GpuField("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", lambda s: s.util_percent),
    GpuField("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", lambda s: s.fb_used_mib),
    GpuField("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", lambda s: s.fb_free_mib),
    GpuField("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", lambda s: s.temp_c),
    GpuField("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", lambda s: s.power_w),
    GpuField("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", lambda s: s.sm_clock_mhz),
    GpuField("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz).", lambda s: s.mem_clock_mhz),
    GpuField("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.", lambda s: s.last_xid),
)


def gpu_families(samples: list[GpuSample], hostname: str) -> Iterator[Metric]:
    for f in GPU_FIELDS:
        family = GaugeMetricFamily(f.metric, f.help, labels=GPU_LABELS)
        for s in samples:
            value = f.value(s)
            if value is not None:
                family.add_metric([str(s.index), s.uuid, f"nvidia{s.index}", s.name, hostname], float(value))
        if family.samples:
            yield family


def unified_memory_families(meminfo: Path) -> Iterator[Metric]:
    yield GaugeMetricFamily("dgxready_unified_memory_total_bytes",
                            "Unified CPU+GPU memory (GB10), from /proc/meminfo MemTotal",
                            value=meminfo_bytes("MemTotal", meminfo))
    yield GaugeMetricFamily("dgxready_unified_memory_available_bytes",
                            "Unified CPU+GPU memory available (GB10), from /proc/meminfo MemAvailable",
                            value=meminfo_bytes("MemAvailable", meminfo))


def existing_ancestor(path: Path) -> Path:
    """The store may not exist yet: its disk is then the disk of the nearest folder above it."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_families(models_dir: Path) -> Iterator[Metric]:
    usage = shutil.disk_usage(existing_ancestor(models_dir))
    labels, values = ["path"], [str(models_dir)]
    total = GaugeMetricFamily("dgxready_model_store_disk_total_bytes",
                              "Size of the model store's filesystem", labels=labels)
    free = GaugeMetricFamily("dgxready_model_store_disk_free_bytes",
                             "Space available to unprivileged users on the model store's filesystem",
                             labels=labels)
    total.add_metric(values, usage.total)
    free.add_metric(values, usage.free)
    yield from (total, free)


def resident_bytes(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class EngineWatch:
    """The engines recorded under the state folder, and how often a port's process was replaced."""
    state_dir: Path
    seen: dict[int, tuple[int, int | None]] = field(default_factory=dict)
    restarts: dict[tuple[str, str, int], int] = field(default_factory=dict)

    def states(self) -> list[ServerState]:
        return load_states(Settings(state_dir=self.state_dir))

    def note(self, st: ServerState) -> None:
        identity = (st.pid, st.proc_start)
        key = (st.model, st.backend, st.port)
        previous = self.seen.get(st.port)
        self.restarts.setdefault(key, 0)
        if previous is not None and previous != identity:
            self.restarts[key] += 1
        self.seen[st.port] = identity

    def families(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("dgxready_engine_up", "1 if the recorded engine process runs",
                               labels=ENGINE_LABELS)
        rss = GaugeMetricFamily("dgxready_engine_resident_memory_bytes", "Engine process resident memory",
                                labels=ENGINE_LABELS)
        restarts = CounterMetricFamily("dgxready_engine_restarts",
                                       "Times a new engine process was seen on the port since the exporter "
                                       "started", labels=ENGINE_LABELS)
        for st in self.states():
            self.note(st)
            labels = [st.model, st.backend, str(st.port)]
            running = is_running(st.pid, st.proc_start)
            up.add_metric(labels, 1.0 if running else 0.0)
            memory = resident_bytes(st.pid) if running else None
            if memory is not None:
                rss.add_metric(labels, memory)
            restarts.add_metric(labels, self.restarts[(st.model, st.backend, st.port)])
        yield from (up, rss, restarts)


@dataclass(frozen=True)
class MuxHealth:
    answered: bool
    healthy: bool
    backends_up: int


def mux_health(client: httpx.Client, url: str) -> MuxHealth:
    try:
        resp = client.get(f"{url}/health")
    except httpx.HTTPError:
        return MuxHealth(False, False, 0)
    try:
        backends = resp.json().get("backends") or {}
    except ValueError:
        backends = {}
    up = sum(1 for b in backends.values() if isinstance(b, dict) and b.get("up"))
    return MuxHealth(True, resp.status_code == 200, up)


def mux_families(health: MuxHealth) -> Iterator[Metric]:
    yield GaugeMetricFamily("dgxready_multiplexer_up", "1 if the multiplexer's /health answered",
                            value=float(health.answered))
    yield GaugeMetricFamily("dgxready_multiplexer_healthy", "1 if the multiplexer's /health answered 200",
                            value=float(health.healthy))
    yield GaugeMetricFamily("dgxready_multiplexer_backends_up", "Backends the multiplexer's /health calls up",
                            value=float(health.backends_up))


class DgxReadyCollector(Collector):
    """Reads everything on each scrape. A section that fails is counted in
    dgxready_exporter_collect_errors_total{source} and left out; the scrape still answers."""

    def __init__(self, options: ExporterOptions, nvml: ModuleType | Any = pynvml) -> None:
        self.options = options
        self.errors = ErrorCounts()
        self.gpus = NvmlGpus(nvml, self.errors)
        self.engines = EngineWatch(options.state_dir)
        self.client = httpx.Client(timeout=options.mux_timeout_s)
        self.hostname = socket.gethostname()
        self.last_duration_s = 0.0

    def sections(self) -> list[tuple[str, Callable[[], Iterator[Metric]]]]:
        parts = [("gpu", self.gpu_part), ("disk", lambda: disk_families(self.options.models_dir)),
                 ("engine", self.engines.families)]
        if self.options.mux_url:
            parts.append(("multiplexer", lambda: mux_families(mux_health(self.client, self.options.mux_url))))
        return parts

    def gpu_part(self) -> Iterator[Metric]:
        samples = self.gpus.samples() if self.gpus.available else []
        families = list(gpu_families(samples, self.hostname))
        if any(s.unified_memory for s in samples):
            families += unified_memory_families(self.options.meminfo)
        return iter(families)

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        for source, part in self.sections():
            try:
                yield from list(part())
            except Exception:  # noqa: BLE001 - one broken source must not take the others down
                self.errors.add(source)
        yield from self.self_families()
        self.last_duration_s = time.perf_counter() - started

    def self_families(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("dgxready_exporter_gpu_available", "1 if NVML answered and found a GPU",
                                value=float(self.gpus.available))
        errors = CounterMetricFamily("dgxready_exporter_collect_errors", "Errors while collecting, by source",
                                     labels=["source"])
        with self.errors.lock:
            for source, count in sorted(self.errors.by_source.items()):
                errors.add_metric([source], count)
        yield errors
        yield GaugeMetricFamily("dgxready_exporter_last_collect_seconds",
                                "Time the previous collection took", value=self.last_duration_s)


def make_registry(options: ExporterOptions, nvml: ModuleType | Any = pynvml) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DgxReadyCollector(options, nvml))
    registry.register(CapacityCollector(options.baselines))
    return registry


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="dgxready exporter (GPU, unified memory, disk, engine, "
                                                 "multiplexer)")
    parser.add_argument("--address", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=9400, help="port to listen on")
    parser.add_argument("--state-dir", type=Path, help="dgxready state folder (default: the settings')")
    parser.add_argument("--models-dir", type=Path, help="model store (default: the settings')")
    parser.add_argument("--mux-url", help="multiplexer base URL whose /health is read; omit for none")
    parser.add_argument("--baselines", type=Path, default=BASELINES_DIR,
                        help="bench.all's baselines folder, for the newest capacity of each host")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    settings = load_settings()
    options = ExporterOptions(models_dir=args.models_dir or settings.models_dir,
                              state_dir=args.state_dir or settings.state_dir, mux_url=args.mux_url,
                              baselines=args.baselines)
    start_http_server(args.port, args.address, make_registry(options))
    print(json.dumps({"event": "exporter_listening", "address": args.address, "port": args.port}), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
