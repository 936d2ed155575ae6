"""The serving benchmark against the real llama-server, plus failure handling."""
import asyncio
import copy
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from bench import runner
from bench.loadgen import Endpoint, closed_loop, closed_warmup, probe
from bench.metrics import Slo, compute_metrics
from bench.report import load_baseline
from bench.serving import run_level
from bench.workloads import make_workload
from dgxready.errors import DgxReadyError
from dgxready.ports import free_port
from model.serve import ServeRequest, serve

pytestmark = pytest.mark.server


def counters(url):
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("llamacpp:")}


def test_token_counts_match_the_servers_counters(served):
    ep = Endpoint(served.base_url, probe(served.base_url))
    before = counters(served.base_url)
    records = asyncio.run(closed_loop(ep, make_workload("synthetic", max_tokens=24), 2, 6))
    after = counters(served.base_url)
    m = compute_metrics(records)
    assert m.completed == 6 and m.failed == 0
    assert m.total_output_tokens == after["llamacpp:tokens_predicted_total"] - before[
        "llamacpp:tokens_predicted_total"]
    assert all(r.output_tokens >= 18 for r in records)  # ignore_eos: lengths are as asked
    assert m.ttft.mean > 0 and m.itl.count >= sum(r.output_tokens - 2 for r in records)


def test_agents_workload_is_multi_turn_with_shared_system_prompts(served):
    ep = Endpoint(served.base_url, probe(served.base_url))
    wl = make_workload("agents", max_tokens=16)
    sessions = [wl.session(i) for i in range(2)]
    first = [s.next_request() for s in sessions]
    assert first[0].messages[0]["role"] == "system" and first[0].role != first[1].role
    records = asyncio.run(closed_loop(ep, wl, 2, 6))
    assert sum(r.success for r in records) == 6


class TurnLog:
    """A workload whose sessions note (stream, turn) as each request is asked of them."""

    def __init__(self, inner):
        self.inner, self.asked = inner, []

    def session(self, index):
        return LoggedSession(self.inner.session(index), index, self.asked)


class LoggedSession:
    def __init__(self, inner, index, asked):
        self.inner, self.index, self.asked, self.turn = inner, index, asked, 0

    def next_request(self):
        self.turn += 1
        self.asked.append((self.index, self.turn))
        return self.inner.next_request()

    def observe(self, reply):
        self.inner.observe(reply)


def test_a_levels_warm_up_is_every_streams_first_turn_so_the_measured_requests_are_later_turns(served):
    ep = Endpoint(served.base_url, probe(served.base_url))
    workload = TurnLog(make_workload("agents", max_tokens=4))
    level = run_level(ep, workload, 3, 6, warmup=2, slo=None)
    assert level.warmup_requests == 3 and level.metrics.completed == 6
    assert sorted(workload.asked[:3]) == [(0, 1), (1, 1), (2, 1)]
    assert all(turn >= 2 for _, turn in workload.asked[3:]) and len(workload.asked) == 9
    assert closed_warmup(0, 8) == 0 and closed_warmup(2, 1) == 2


def test_unreachable_endpoint_fails_before_the_run():
    port = free_port()
    with pytest.raises(DgxReadyError, match=f"127.0.0.1:{port}/v1/models: unreachable"):
        probe(f"http://127.0.0.1:{port}")


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    calls = 0

    def log_message(self, *a):
        pass

    def do_POST(self):
        FlakyHandler.calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        if FlakyHandler.calls % 3 == 1:
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"boom")
        elif FlakyHandler.calls % 3 == 2:
            time.sleep(1.5)
        else:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n')
            self.wfile.write(b"data: [DONE]\n\n")  # no usage, no finish_reason


@pytest.fixture
def flaky_server():
    """A deliberately broken HTTP server: 500s, a hang past the timeout, a stream with no usage."""
    FlakyHandler.calls = 0
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_server_errors_timeouts_and_empty_streams_are_failures_not_crashes(flaky_server):
    ep = Endpoint(flaky_server, "m", timeout_s=0.5)
    records = asyncio.run(closed_loop(ep, make_workload("synthetic", max_tokens=8), 1, 6))
    m = compute_metrics(records)
    assert m.completed == 0 and m.failed == 6
    assert m.errors == {"http 500": 2, "timeout": 2, "empty": 2}


def test_a_server_killed_mid_run_counts_failures(isolated, llama_build):
    state = serve(ServeRequest(model="smollm2-135m", backend="llamacpp", port=free_port(), parallel=2,
                               ctx_per_slot=1024), isolated)
    ep = Endpoint(state.base_url, "smollm2-135m", timeout_s=30)
    threading.Timer(1.5, lambda: os.kill(state.pid, signal.SIGKILL)).start()
    records = asyncio.run(closed_loop(ep, make_workload("synthetic", max_tokens=128), 2, 12))
    m = compute_metrics(records)
    assert m.failed >= 2 and m.completed + m.failed == 12
    assert set(m.errors) <= {"transport", "truncated", "empty"}


def test_the_sweep_stops_after_a_level_beyond_twice_the_slo_unless_asked_for_every_level(served):
    ep = Endpoint(served.base_url, probe(served.base_url))
    console = runner.Console(record=True, width=200)
    impossible = Slo(e2el_p95_s=0.001)
    stopped = runner.sweep(ep, "synthetic", [1, 2, 4], 8, impossible, console, warmup=0)
    assert [lv.concurrency for lv in stopped] == [1]
    assert "c=2, 4 skipped" in console.export_text()
    full = runner.sweep(ep, "synthetic", [1, 2], 8, impossible, console, warmup=0, stop_when_saturated=False)
    assert [lv.concurrency for lv in full] == [1, 2]


def test_a_sweep_asked_for_more_requests_sends_them_and_records_each_ones_output_tokens(served):
    ep = Endpoint(served.base_url, probe(served.base_url))
    console = runner.Console(record=True, width=200)
    default, asked = (runner.sweep(ep, "synthetic", [1], 4, Slo(), console, warmup=0, num_requests=n)
                      for n in (None, 11))
    assert default[0].num_requests == 8 and asked[0].num_requests == 11
    assert len(asked[0].output_token_samples) == 11
    assert sum(asked[0].output_token_samples) == asked[0].metrics.total_output_tokens


def test_bench_all_writes_a_valid_baseline_and_plots(isolated, llama_build, tmp_path):
    opts = runner.AllOptions(levels=(1, 2), capacity_limit=2, max_tokens=16, skip_micro=True,
                             output_dir=tmp_path / "out")
    path, baseline = runner.run_all(opts, runner.Console(quiet=True))
    again = load_baseline(path)
    assert again.capacity.max_concurrency_meeting_slo >= 1
    assert [lv.concurrency for lv in again.serving.levels] == [1, 2]
    assert again.capacity.workload["name"] == "agents" and again.capacity.workload["max_tokens"] == 16
    assert len(again.plots) == 4 and all(Path(p).exists() or (runner.REPO_ROOT / p).exists()
                                         for p in again.plots)

    doc = json.loads(path.read_text())
    worse = copy.deepcopy(doc)
    # Every request 3x slower: with a level's few samples and a loaded box's spread, a smaller
    # planted change can honestly come out inconclusive.
    for lv in worse["serving"]["levels"]:
        for samples in ("e2el_samples", "ttft_samples", "tpot_samples"):
            lv[samples] = [x * 3 for x in lv[samples]]
        lv["metrics"]["output_throughput"] *= 0.7
    worse_path = tmp_path / "worse.json"
    worse_path.write_text(json.dumps(worse))
    cmp = subprocess.run([sys.executable, "-m", "invoke", "bench.compare", str(path), str(worse_path)],
                         capture_output=True, text=True)
    assert cmp.returncode == 1 and "regressed" in cmp.stdout and "+200.0%" in cmp.stdout, cmp.stdout
    assert "-30.0%" in cmp.stdout and "inconclusive" in cmp.stdout   # the lone throughput figure
    same = subprocess.run([sys.executable, "-m", "invoke", "bench.compare", str(path), str(path)],
                          capture_output=True, text=True)
    assert same.returncode == 0, same.stdout + same.stderr


def test_ctrl_c_leaves_no_json_and_stops_the_server(isolated, llama_build, tmp_path, processes):
    out_dir = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = processes.start(
        [sys.executable, "-m", "invoke", "bench.all", "--skip-micro", "--concurrency", "1,2,4",
         "--max-tokens", "64", "--output-dir", str(out_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    state_dir = isolated.state_dir / "servers"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(state_dir.glob("*.json")):
        time.sleep(0.2)
    records = list(state_dir.glob("*.json"))
    assert records, "bench.all never started its server"
    pid = json.loads(records[0].read_text())["pid"]
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not list(out_dir.rglob("*.json")) if out_dir.exists() else True
    assert not list(state_dir.glob("*.json"))
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_load_generator_agrees_with_llama_server_counters(served):
    from bench.accuracy.serving import measure

    rows = {r.metric: r for r in measure(served.base_url, requests=4, max_tokens=48)}
    assert rows["output tokens"].ours == rows["output tokens"].reference
    assert rows["decode tokens/s"].within, rows["decode tokens/s"]
    assert rows["mean TTFT s"].within, rows["mean TTFT s"]


def test_bench_all_on_a_host_over_ssh_fetches_the_results(tmp_path, isolated, llama_build, local_sshd):
    sshd = local_sshd("benchbox")
    local = tmp_path / "fetched"
    run = subprocess.run(
        [sys.executable, "-m", "invoke", "bench.all", "--host", "benchbox", "--ssh-config",
         str(sshd.ssh_config), "--remote-dir", str(runner.REPO_ROOT), "--skip-micro",
         "--skip-capacity", "--concurrency", "1", "--max-tokens", "16", "--output-dir", str(local)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    fetched = list(local.glob("*.json"))
    assert len(fetched) == 1 and load_baseline(fetched[0]).serving.levels[0].concurrency == 1
    assert len(list(local.rglob("*.png"))) == 3
    down = subprocess.run(
        [sys.executable, "-m", "invoke", "bench.all", "--host", "nosuchbox.invalid",
         "--skip-micro"], capture_output=True, text=True, timeout=120)
    assert down.returncode == 1 and "nosuchbox.invalid: cannot connect" in down.stderr
