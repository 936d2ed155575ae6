"""Against the real llama-server (built from the pinned sdist) and the real SmolLM2 model."""
import socket
import threading
import time

import httpx
import openai
import pytest

from dgxready.errors import DgxReadyError
from dgxready.ports import free_port
from model.backend import BackendChoice, VllmInstall
from model.catalog import load_catalog
from model.procs import ServerFailed
from model.quantize import quantize
from model.serve import ServeRequest, serve, status, stop

pytestmark = pytest.mark.server
DEFAULT = "smollm2-135m"


def client(state):
    return openai.OpenAI(base_url=f"{state.base_url}/v1", api_key="x", max_retries=0, timeout=120)


def test_chat_completion_returns_text(served):
    resp = client(served).chat.completions.create(
        model=DEFAULT, messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=24,
        extra_body={"ignore_eos": True})
    assert resp.choices[0].message.content.strip()
    assert resp.usage.completion_tokens > 0


def test_streaming_yields_many_chunks_and_a_finish_reason(served):
    stream = client(served).chat.completions.create(
        model=DEFAULT, messages=[{"role": "user", "content": "Count from one to ten."}],
        max_tokens=16, stream=True, extra_body={"ignore_eos": True})
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    # the sampled answer can be as short as "Ack." (CI, session 11), so the stream runs to max_tokens
    assert len([p for p in pieces if p]) >= 8
    assert finish == "length"


def test_two_requests_run_in_parallel_slots(served):
    busy_seen = 0
    done = threading.Event()

    def ask():
        client(served).chat.completions.create(
            model=DEFAULT, messages=[{"role": "user", "content": "Write a long story."}],
            max_tokens=200, extra_body={"ignore_eos": True})

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not done.is_set():
        slots = httpx.get(f"{served.base_url}/slots", timeout=5).json()
        busy_seen = max(busy_seen, sum(1 for s in slots if s.get("is_processing")))
        if busy_seen == 2 or not any(t.is_alive() for t in threads):
            break
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert busy_seen == 2


def test_metrics_and_status(served):
    metrics = httpx.get(f"{served.base_url}/metrics", timeout=5).text
    assert "llamacpp:tokens_predicted_total" in metrics
    mine = [s for s in status() if s.state.port == served.port]
    assert mine and mine[0].healthy


def test_port_in_use_is_a_clear_error(isolated, llama_build):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(DgxReadyError, match=f"port {port} on 127.0.0.1 is already in use"):
            serve(ServeRequest(model=DEFAULT, backend="llamacpp", port=port), isolated)


def test_a_server_that_dies_shows_its_last_log_lines(isolated, llama_build):
    req = ServeRequest(model=DEFAULT, backend="llamacpp", port=free_port(),
                       extra_args=("--no-such-flag",))
    with pytest.raises(ServerFailed, match=r"exited with code \d+ before it was ready(.|\n)*no-such-flag"):
        serve(req, isolated)
    assert status(isolated) == []


def test_ctrl_c_while_waiting_for_the_server_leaves_no_server_behind(isolated, llama_build, monkeypatch,
                                                                    processes):
    started = []

    def interrupted(proc, base_url, log, timeout_s):
        started.append(processes.track(proc))
        raise KeyboardInterrupt  # what Ctrl-C raises in the waiting loop

    monkeypatch.setattr("model.serve.wait_ready", interrupted)
    with pytest.raises(KeyboardInterrupt):
        serve(ServeRequest(model=DEFAULT, backend="llamacpp", port=free_port(), parallel=1,
                           ctx_per_slot=1024), isolated)
    assert started and started[0].wait(timeout=15) is not None
    assert status(isolated) == []


def test_stop_ends_the_process_and_forgets_it(isolated, llama_build):
    state = serve(ServeRequest(model=DEFAULT, backend="llamacpp", port=free_port(), parallel=1,
                               ctx_per_slot=1024), isolated)
    assert state.running
    assert [s.pid for s in stop(DEFAULT, settings=isolated)] == [state.pid]
    assert not state.running and status(isolated) == []
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{state.base_url}/health", timeout=2)


def test_requantized_model_is_served(isolated, llama_build):
    result = quantize(DEFAULT, "Q8_0", settings=isolated)
    assert result.fmt == "gguf-q8_0-local" and result.path.exists()
    assert result.size != load_catalog().format(DEFAULT, "gguf-q4_1").files[0].size
    state = serve(ServeRequest(model=DEFAULT, fmt=result.fmt, backend="llamacpp",
                               port=free_port(), parallel=1, ctx_per_slot=1024), isolated)
    resp = client(state).chat.completions.create(
        model=DEFAULT, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert resp.usage.completion_tokens > 0


def test_auto_backend_keeps_gguf_models_on_llamacpp(isolated):
    # Simulated host: NVML sees an H100 and a vLLM install is present (neither exists here).
    from model.serve import catalog_view, settle_backend

    vllm = BackendChoice("vllm", "H100 found and vLLM is installed", VllmInstall("venv", "/x/vllm"))
    plain = settle_backend(ServeRequest(model=DEFAULT), vllm, catalog_view(DEFAULT, isolated))
    assert plain.backend == "llamacpp" and "has no vLLM format" in plain.reason
    mistral = settle_backend(ServeRequest(model="mistral-7b-instruct-v0.3"), vllm,
                             catalog_view("mistral-7b-instruct-v0.3", isolated))
    assert mistral.backend == "vllm"
    gguf = settle_backend(ServeRequest(model="mistral-7b-instruct-v0.3", fmt="gguf-q8_0"), vllm,
                          catalog_view("mistral-7b-instruct-v0.3", isolated))
    assert gguf.backend == "llamacpp" and "is a GGUF" in gguf.reason
