"""What the multiplexer sends to backends: per kind, and a session's history. The vLLM backend is
simulated (no CUDA here): the instant-reply benchmark backend, wrapped to record every request
body it receives."""
import asyncio
import contextlib
import http.client
import json
import sqlite3
import threading
import time
from types import SimpleNamespace

import httpx
import uvicorn

import agents.tasks
from agents.benchmarks.instant_backend import make_app
from agents.config import BackendConfig, MuxConfig
from agents.tasks import backend_for
from dgxready.ports import free_port
from dgxready.roles import load_roles
from tests.agents_helpers import start_mux


async def request_body(receive) -> bytes:
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    return body


class RecordingBackend:
    def __init__(self, service_s: float = 0.0):
        self.bodies: list[dict] = []
        self.arrivals: list[tuple[int, float]] = []
        self.app = make_app(service_s)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.record, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off",
                                                    interface="asgi3"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    async def record(self, scope, receive, send):
        if scope["type"] == "http":
            self.arrivals.append((scope["client"][1], time.monotonic()))
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        body = await request_body(receive)
        self.bodies.append(json.loads(body))
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        return await self.app(scope, replay, send)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


def post(url, key, session, stream=False, **extra):
    headers = {"Authorization": f"Bearer {key}"} | ({"X-Session-Id": session} if session else {})
    return httpx.post(f"{url}/v1/chat/completions", timeout=30, headers=headers,
                      json={"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}],
                            **extra})


def test_vllm_gets_the_roles_priority_and_a_cache_salt_per_session(tmp_path):
    roles = load_roles()
    (tmp_path / "v").mkdir()
    (tmp_path / "l").mkdir()
    with RecordingBackend() as vllm, RecordingBackend() as llamacpp:
        mux = start_mux(tmp_path / "v", [("v", vllm.url, 4)], rate_limits=False, backend_kind="vllm")
        plain = start_mux(tmp_path / "l", [("l", llamacpp.url, 4)], rate_limits=False)
        try:
            dev, qa = mux.key("developer"), mux.key("qa-specialist")
            for key, session in ((dev, "s1"), (dev, "s1"), (dev, "s2"), (qa, "s1")):
                assert post(mux.url, key, session, max_tokens=100000).status_code == 200
            assert post(mux.url, dev, "s3", stream=True).status_code == 200
            assert post(plain.url, plain.key("developer"), "s1").status_code == 200
        finally:
            mux.mux.stop()
            plain.mux.stop()
    sent = vllm.bodies
    assert [b["priority"] for b in sent] == [roles["developer"].scheduling.priority] * 3 + [
        roles["qa-specialist"].scheduling.priority, roles["developer"].scheduling.priority]
    salts = [b["cache_salt"] for b in sent]
    assert salts[0] == salts[1] and len(set(salts[1:])) == 4  # same session: same salt; else never
    assert all("s1" not in s and "developer" not in s for s in salts)
    assert sent[0]["max_tokens"] == roles["developer"].sampling.max_tokens  # capped by the role
    assert sent[0]["temperature"] == roles["developer"].sampling.temperature
    assert sent[4]["stream"] and sent[4]["stream_options"] == {"include_usage": True}
    assert "priority" not in llamacpp.bodies[0] and "cache_salt" not in llamacpp.bodies[0]


def test_a_sessions_next_turn_waits_and_then_carries_the_turn_before_it(tmp_path):
    async def two_turns(url, key):
        async with httpx.AsyncClient(timeout=30) as client:
            def turn(text):
                return client.post(f"{url}/v1/chat/completions",
                                   headers={"Authorization": f"Bearer {key}", "X-Session-Id": "s"},
                                   json={"model": "m", "messages": [{"role": "user", "content": text}]})
            first = asyncio.create_task(turn("first question"))
            await asyncio.sleep(0.05)  # the first turn is at the backend (it answers after 0.3 s)
            return await asyncio.gather(first, turn("second question"))

    with RecordingBackend(service_s=0.3) as slow:
        mux = start_mux(tmp_path, [("slow", slow.url, 4)], rate_limits=False)
        try:
            a, b = asyncio.run(two_turns(mux.url, mux.key("developer")))
        finally:
            mux.mux.stop()
    assert a.status_code == b.status_code == 200
    first, second = slow.bodies
    said = [m["content"] for m in second["messages"]]
    assert "first question" in said and a.json()["choices"][0]["message"]["content"] in said
    assert said.index("first question") < said.index("second question")
    assert "second question" not in [m["content"] for m in first["messages"]]


def stored_turns(path, session: str) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT count(*) FROM session_turns WHERE session=?", (session,)).fetchone()[0]


def test_a_sessions_turn_reaches_the_state_file_by_the_group_commit_or_at_shutdown(tmp_path):
    with RecordingBackend() as instant:
        mux = start_mux(tmp_path, [("instant", instant.url, 4)], rate_limits=False, session_commit_ms=1000)
        try:
            key = mux.key("developer")
            assert post(mux.url, key, "early", stream=True).status_code == 200
            deadline = time.monotonic() + 5
            while stored_turns(tmp_path / "mux.db", "early") == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert stored_turns(tmp_path / "mux.db", "early") == 1, "no later request was needed"
            assert post(mux.url, key, "late").status_code == 200
        finally:
            mux.mux.stop()
    assert stored_turns(tmp_path / "mux.db", "late") == 1, "the shutdown wrote the last turn"


def test_agents_serve_uses_a_configured_backend_that_answers_and_starts_no_model(monkeypatch):
    def refuse_to_start(**options):
        raise AssertionError(f"started a model with {options}")

    monkeypatch.setattr(agents.tasks, "running_model", refuse_to_start)
    with RecordingBackend() as live:
        config = MuxConfig(backends=[BackendConfig(name="down", url=f"http://127.0.0.1:{free_port()}"),
                                     BackendConfig(name="up", url=live.url)])
        with backend_for(config, 4) as used:
            assert used is config


def test_agents_serve_starts_the_default_model_when_no_backend_answers(monkeypatch):
    started = []

    @contextlib.contextmanager
    def fake_running_model(**options):
        started.append(options)
        yield SimpleNamespace(base_url="http://127.0.0.1:18080")

    monkeypatch.setattr(agents.tasks, "running_model", fake_running_model)
    config = MuxConfig(backends=[BackendConfig(name="down", url=f"http://127.0.0.1:{free_port()}")])
    with backend_for(config, 6) as used:
        assert [(b.url, b.kind, b.max_concurrency) for b in used.backends] == [
            ("http://127.0.0.1:18080", "llamacpp", 6)]
    assert started == [{"parallel": 6, "ctx_per_slot": 4096}]


class StallingBackend(RecordingBackend):
    """Takes a chat request, sends `events` stream events (none: not even the response's start),
    then nothing more until the caller hangs up."""

    def __init__(self, events: int):
        super().__init__()
        self.events = events

    async def record(self, scope, receive, send):
        if scope["type"] == "http":
            self.arrivals.append((scope["client"][1], time.monotonic()))
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        while (await receive()).get("more_body"):
            pass
        if self.events:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
        for _ in range(self.events):
            event = {"choices": [{"index": 0, "delta": {"content": "so far"}, "finish_reason": None}]}
            await send({"type": "http.response.body", "body": f"data: {json.dumps(event)}\n\n".encode(),
                        "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass


def outstanding(url: str) -> int:
    return httpx.get(f"{url}/health").json()["backends"]["stalled"]["outstanding"]


def test_a_backend_that_never_answers_gets_a_504_at_the_turns_deadline_and_gives_its_slot_back(tmp_path):
    with StallingBackend(events=0) as stalled:
        mux = start_mux(tmp_path, [("stalled", stalled.url, 1)], rate_limits=False)
        try:
            key = mux.key("developer")
            for stream in (False, True):
                began = time.monotonic()
                resp = httpx.post(f"{mux.url}/v1/chat/completions", timeout=30,
                                  headers={"Authorization": f"Bearer {key}", "X-Deadline-S": "1"},
                                  json={"model": "m", "stream": stream,
                                        "messages": [{"role": "user", "content": "hi"}]})
                assert resp.status_code == 504, resp.text
                assert "deadline passed before the backend answered" in resp.json()["error"]["message"]
                assert 0.9 < time.monotonic() - began < 5
                assert outstanding(mux.url) == 0
            assert 'status="timeout"' in httpx.get(f"{mux.url}/metrics").text
        finally:
            mux.mux.stop()


def test_a_stream_that_stalls_ends_at_the_turns_deadline_with_an_error_event_and_frees_its_slot(tmp_path):
    with StallingBackend(events=2) as stalled:
        mux = start_mux(tmp_path, [("stalled", stalled.url, 1)], rate_limits=False)
        try:
            began = time.monotonic()
            with httpx.stream("POST", f"{mux.url}/v1/chat/completions", timeout=30,
                              headers={"Authorization": f"Bearer {mux.key('developer')}", "X-Deadline-S": "1",
                                       "X-Session-Id": "s"},
                              json={"model": "m", "stream": True,
                                    "messages": [{"role": "user", "content": "hi"}]}) as resp:
                assert resp.status_code == 200
                events = [line[5:].strip() for line in resp.iter_lines() if line.startswith("data:")]
            assert 0.9 < time.monotonic() - began < 5
            assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:2]] == ["so far"] * 2
            error = json.loads(events[2])["error"]
            assert error["type"] == "timeout" and "the turn's deadline passed" in error["message"]
            assert events[3:] == ["[DONE]"]
            assert outstanding(mux.url) == 0
            assert stored_turns(tmp_path / "mux.db", "s") == 0, "a cut-off answer is not a session's turn"
        finally:
            mux.mux.stop()


class ScriptedBackend(RecordingBackend):
    """Answers a chat request as the text of its last message asks (`answer`, which returns False
    for a text it does not know); other requests as the instant backend does."""

    async def record(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        body = await request_body(receive)
        if await self.answer(json.loads(body)["messages"][-1]["content"], send):
            return

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, replay, send)

    async def answer(self, asked: str, send) -> bool:
        raise NotImplementedError


class RunawayBackend(ScriptedBackend):
    """Answers with more than a multiplexer should hold, as asked: `whole` a 200 KiB JSON answer
    without a length, `declared` one with its length, `line` one event and then a line of 6 MiB,
    `events` 200 KiB of events, each with a newline, `comments` 6 MiB of SSE comments before any
    event."""

    async def answer(self, mode: str, send) -> bool:
        if mode not in ("whole", "declared", "line", "events", "comments"):
            return False
        if mode in ("whole", "declared"):
            answer = json.dumps({"choices": [{"message": {"content": "x" * (200 << 10)}}]}).encode()
            length = [(b"content-length", str(len(answer)).encode())] if mode == "declared" else []
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), *length]})
            for i in range(0, len(answer), 16 << 10):
                await send({"type": "http.response.body", "body": answer[i:i + (16 << 10)], "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return True
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        event = {"choices": [{"index": 0, "delta": {"content": "word "}, "finish_reason": None}]}
        first = f"data: {json.dumps(event)}\n\n".encode()
        if mode == "comments":
            first = b": keep-alive\n\n" * (6 << 16)
        line = [b"data: " + b"x" * (64 << 10)] * 96
        pieces = line if mode == "line" else [first] * ((200 << 10) // len(first))
        for piece in [first, *pieces]:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        end = f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode()
        await send({"type": "http.response.body", "body": end, "more_body": False})
        return True


def answering_again(mux, backend: str) -> None:
    """Once the health check has the backend up again, one answer clears its failures."""
    deadline = time.monotonic() + 10
    while not httpx.get(f"{mux.url}/health").json()["backends"][backend]["up"]:
        assert time.monotonic() < deadline, f"backend {backend} did not come up"
        time.sleep(0.05)
    assert post(mux.url, mux.key("developer"), "other").status_code == 200


def ask(url: str, key: str, mode: str, session: str | None = None, stream: bool = True) -> httpx.Response:
    return post(url, key, session, stream, messages=[{"role": "user", "content": mode}])


def events_of(resp: httpx.Response) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [line[5:].strip() for line in resp.text.splitlines() if line.startswith("data:")]


def test_a_runaway_backend_fails_the_turn_at_what_the_multiplexer_may_hold_and_the_multiplexer_lives(tmp_path):
    with RunawayBackend() as runaway:
        mux = start_mux(tmp_path, [("runaway", runaway.url, 4)], rate_limits=False, max_answer_bytes=64 << 10,
                        cooldown_s=0.05)
        try:
            key = mux.key("developer")
            for mode in ("whole", "declared"):
                answering_again(mux, "runaway")
                resp = ask(mux.url, key, mode, stream=False)
                assert resp.status_code == 502 and resp.json()["error"]["message"] == (
                    "every backend failed before answering: its answer passed max_answer_bytes (65536 bytes)")
            answering_again(mux, "runaway")
            resp = ask(mux.url, key, "comments")
            assert resp.status_code == 502 and resp.json()["error"]["message"] == (
                "every backend failed before streaming: its stream passed 4194304 bytes before its first event")
            answering_again(mux, "runaway")
            line = events_of(ask(mux.url, key, "line"))
            assert json.loads(line[0])["choices"][0]["delta"]["content"] == "word "
            assert "failed mid-stream: a line of its stream passed 4194304 bytes" in line[1]
            assert line[2:] == ["[DONE]"]
            answering_again(mux, "runaway")
            held = events_of(ask(mux.url, key, "events", session="kept"))
            assert "failed mid-stream: its answer passed max_answer_bytes (65536 bytes)" in held[-2]
            answering_again(mux, "runaway")
            passed = events_of(ask(mux.url, key, "events"))
            assert len(passed) > (200 << 10) // 100 and passed[-1] == "[DONE]" and "error" not in passed[-2]
            metrics = httpx.get(f"{mux.url}/metrics").text
            assert 'status="failed_midstream"} 2.0' in metrics
            assert stored_turns(tmp_path / "mux.db", "kept") == 0
        finally:
            mux.mux.stop()


MISSHAPEN_USAGE = [{"prompt_tokens": "7", "completion_tokens": None}, [7, 2], {"prompt_tokens": -5,
                   "completion_tokens": 1.5}, {"prompt_tokens": True}]
MISSHAPEN_CHOICES = ["text", [1], [{"message": "text"}], [{"message": {"content": 5}}], []]


class MisshapenBackend(ScriptedBackend):
    """Answers in a shape no engine sends: the usage and choices its message names by index, as
    `usage <i>` (a whole answer), `stream <i>` (a streamed one) or `choices <i>`."""

    async def answer(self, asked: str, send) -> bool:
        kind, _, i = asked.partition(" ")
        if kind not in ("usage", "stream", "choices"):
            return False
        if kind == "stream":
            event = {"choices": [{"index": 0, "delta": {"content": "streamed"}, "finish_reason": "stop"}]}
            usage = {"choices": [], "usage": MISSHAPEN_USAGE[int(i)]}
            answer = f"data: {json.dumps(event)}\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n"
            kind_header = b"text/event-stream"
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": "whole"}}
            whole = {"choices": [choice], "usage": MISSHAPEN_USAGE[int(i)]} if kind == "usage" else {
                "choices": MISSHAPEN_CHOICES[int(i)]}
            answer, kind_header = json.dumps(whole), b"application/json"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind_header)]})
        await send({"type": "http.response.body", "body": answer.encode(), "more_body": False})
        return True


def test_an_answer_of_a_shape_no_engine_sends_is_relayed_and_its_turn_kept_with_what_can_be_read(tmp_path):
    asks = [f"{kind} {i}" for kind in ("usage", "stream") for i in range(len(MISSHAPEN_USAGE))] + [
        f"choices {i}" for i in range(len(MISSHAPEN_CHOICES))]
    with MisshapenBackend() as misshapen:
        mux = start_mux(tmp_path, [("odd", misshapen.url, 4)], rate_limits=False)
        try:
            key = mux.key("developer")
            for n, content in enumerate(asks):
                resp = ask(mux.url, key, content, session=f"odd-{n}", stream=content.startswith("stream"))
                assert resp.status_code == 200, (content, resp.text)
            metrics = httpx.get(f"{mux.url}/metrics").text
            history = [httpx.get(f"{mux.url}/v1/sessions/odd-{n}", headers=mux.headers(key)).json()["history"]
                       for n in range(len(asks))]
        finally:
            mux.mux.stop()
    ok = 'dgxready_mux_requests_total{agent="developer-1",backend="odd",status="ok"}'
    assert f"{ok} {len(asks)}.0" in metrics
    answers = [h[-1]["content"] for h in history]
    assert answers == ["whole"] * 4 + ["streamed"] * 4 + [""] * len(MISSHAPEN_CHOICES)
    assert 'dgxready_mux_tokens_total{agent="developer-1",direction="prompt"} 0.0' in metrics


def test_an_idle_connection_stays_open_longer_than_clients_keep_theirs(tmp_path):
    """httpx (the OpenAI SDK's client) drops a pooled connection after 5 s idle, aiohttp after 15 s.
    A server that closes one first races the client's next request on it, which then fails with
    'server disconnected'. The same socket is used again here after 5.5 s idle."""
    with RecordingBackend() as backend:
        mux = start_mux(tmp_path, [("main", backend.url, 2)])
        host, port = mux.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            for pause in (0.0, 5.5):
                time.sleep(pause)
                conn.request("GET", "/health")
                answer = conn.getresponse()
                answer.read()
                assert answer.status == 200
                if not pause:
                    first_socket = conn.sock
            assert conn.sock is first_socket
        finally:
            conn.close()
            mux.mux.stop()


def test_the_multiplexer_lets_a_backend_connection_go_before_the_backend_would_close_it(tmp_path):
    """llama-server and vLLM close a connection idle for 5 s: the multiplexer reuses one only
    while it has been idle for less (here, right away, and not after 4.5 s)."""
    with RecordingBackend() as backend:
        mux = start_mux(tmp_path, [("main", backend.url, 2)], health_interval_s=60)
        try:
            for pause in (0.0, 0.2, 4.5):
                time.sleep(pause)
                assert post(mux.url, mux.key("developer"), "s1").status_code == 200
        finally:
            mux.mux.stop()
    ports = [port for port, _ in backend.arrivals[-3:]]
    assert ports[0] == ports[1], "a connection idle for 0.2 s was not reused"
    last_use = {}
    for port, at in backend.arrivals:
        idle = at - last_use.get(port, at)
        assert idle < 4.0, f"a request came on a connection idle for {idle:.1f} s"
        last_use[port] = at
