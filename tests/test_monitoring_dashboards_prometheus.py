"""Every dashboard expression against a real Prometheus (monitoring.stack) scraping a real
llama-server, the multiplexer in front of it, the exporter and node_exporter, after real chat and
tool traffic: each must parse and return data. A panel flagged `needs` (a GPU, vLLM, a bench.all
baseline) cannot have data on this CPU box, so it must parse and return an empty result. The
snapshot then draws every dashboard from the same Prometheus."""
import asyncio
import math
import time

import httpx
import pytest
from PIL import Image

from dgxready.ports import free_port
from dgxready.settings import load_settings
from model.serve import ServeRequest, serve, stop
from monitoring.dashboards.definitions import DASHBOARDS
from monitoring.dashboards.model import panel_queries
from monitoring.prometheus.config import EngineTarget
from monitoring.settings import MonitoringSettings
from monitoring.snapshot import Prometheus, PrometheusError, TimeRange, snapshot
from monitoring.stack import StackTargets, start_stack, stop_stack
from tests.agents_helpers import chat, start_mux

pytestmark = pytest.mark.server

SCRAPE_S = 1.0
RATE_WINDOW = "1m"
# Ten agents on four slots of a shared two-core box have taken 80 s a request; the deadline is 300 s.
CLIENT_TIMEOUT_S = 300


async def stream_chat(client, url, key, session):
    async with client.stream("POST", f"{url}/v1/chat/completions", headers={
            "Authorization": f"Bearer {key}", "X-Session-Id": session},
            json={"model": "any", "stream": True, "max_tokens": 8,
                  "messages": [{"role": "user", "content": "Name one colour."}]}) as r:
        assert r.status_code == 200
        async for _ in r.aiter_lines():
            pass


def wave(mux, n: int) -> None:
    """Every agent: one streamed and one plain chat; a product manager asks for a shell (denied)."""
    async def streams():
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
            await asyncio.gather(*(stream_chat(client, mux.url, a.key, f"wave{n}-{a.name}")
                                   for a in mux.keys.agents))
    asyncio.run(streams())
    for a in mux.keys.agents:
        answer = chat(mux.url, a.key, "Say hi.", session=f"wave{n}-plain", timeout=CLIENT_TIMEOUT_S)
        assert answer.status_code == 200, answer.text
    pm = mux.key("product-manager")
    denied = httpx.post(f"{mux.url}/v1/tools/call", headers={"Authorization": f"Bearer {pm}"},
                        json={"tool": "shell.run", "args": {"argv": ["echo", "x"]}, "session": f"w{n}"})
    assert denied.status_code == 403
    ok = httpx.post(f"{mux.url}/v1/tools/call", headers={"Authorization": f"Bearer {pm}"},
                    json={"tool": "knowledge.query", "args": {"query": "gpu"}, "session": f"w{n}"})
    assert ok.status_code == 200


def wait_for_targets(prom: Prometheus, jobs: int, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        up = prom.query("up")
        if len(up) >= jobs and all(r["value"][1] == "1" for r in up):
            return
        time.sleep(0.5)
    raise AssertionError(f"scrape targets not all up: {prom.query('up')}")


@pytest.fixture(scope="module")
def traffic(tmp_path_factory, session_store, llama_build):
    """A real llama-server and multiplexer, scraped every second, after two waves of traffic."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("mon")
    mp.setenv("DGXREADY_MODEL_STORE", str(session_store))
    mp.setenv("DGXREADY_STATE_DIR", str(root / "state"))
    settings = load_settings()
    engine = serve(ServeRequest(model="smollm2-135m", backend="llamacpp", port=free_port(), parallel=4,
                                ctx_per_slot=1024), settings)
    mux = start_mux(root / "mux", [("main", engine.base_url, 4)], rate_limits=False)
    monitoring = MonitoringSettings(scrape_interval_s=SCRAPE_S, evaluation_interval_s=SCRAPE_S, mux_url=mux.url)
    targets = StackTargets([EngineTarget(engine.base_url, "llamacpp", "smollm2-135m")], mux.url, None)
    stack = start_stack(settings, monitoring, targets)
    try:
        prom = Prometheus(stack.prometheus_url)
        wait_for_targets(prom, jobs=4)
        started = time.time()
        for n in (1, 2):
            wave(mux, n)
            time.sleep(4 * SCRAPE_S)
        yield prom, TimeRange(started - 10, time.time(), 1.0)
    finally:
        stop_stack(settings)
        mux.mux.stop()
        stop(settings=settings)
        mp.undo()


def finite_values(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result if math.isfinite(float(r["value"][1]))]


def test_every_dashboard_expression_parses_and_returns_data_after_real_traffic(traffic):
    prom, _ = traffic
    empty, failed = [], []
    for q in panel_queries(DASHBOARDS):
        try:
            result = prom.query(q.concrete(RATE_WINDOW))
        except PrometheusError as exc:
            failed.append(f"{q.dashboard} / {q.panel}: {q.expr}\n    {exc}")
            continue
        if q.needs is None and not finite_values(result):
            empty.append(f"{q.dashboard} / {q.panel}: {q.expr} -> {result}")
        if q.needs is not None and result:
            empty.append(f"{q.dashboard} / {q.panel} is flagged needs={q.needs} but has data: drop the flag")
    assert not failed, "expressions Prometheus rejected:\n" + "\n".join(failed)
    assert not empty, "panels that would show nothing:\n" + "\n".join(empty)


def test_the_snapshot_draws_each_dashboard_and_names_only_flagged_panels_as_empty(traffic, tmp_path):
    prom, window = traffic
    shot = snapshot(prom.url, tmp_path, window, host="test-box", scrape_interval_s=SCRAPE_S)
    assert sorted(p.name for p in shot.pngs) == sorted(f"{d.uid}.png" for d in DASHBOARDS)
    for png in shot.pngs:
        with Image.open(png) as im:
            assert im.width >= 1200 and im.height >= 400
    flagged = {(d.uid, p.title) for d in DASHBOARDS for p in d.panels
               if p.needs and p.datasource == "prometheus"}
    assert set(shot.no_data) == flagged
