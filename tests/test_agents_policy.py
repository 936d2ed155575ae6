"""What the multiplexer lets a client ask for: length caps, one choice, no cache_salt of its own,
a bounded share of the queue, the client-declared tools its role allows (in the request and in the
model's answer), and metrics whose labels no client can multiply. The backends are the recording
instant backend and a fake one that answers with tool calls; one test checks the length cap
against a real llama-server, which prefers its own n_predict to max_tokens."""
import asyncio
import json
import re

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import agents.service
from agents.backends import BackendPool
from agents.config import BackendConfig
from agents.scheduler import AgentQueueFull, FairScheduler, QueueFull
from agents.state import StateStore
from dgxready.roles import load_roles
from tests.agents_helpers import start_mux
from tests.conftest import module_server
from tests.test_agents_forwarding import RecordingBackend, post

SEARCH = {"type": "function", "function": {"name": "search_web", "parameters": {"type": "object"}}}
SHELL = {"type": "function", "function": {"name": "shell_exec", "parameters": {"type": "object"}}}


@pytest.fixture
def search_allowed(monkeypatch):
    """The developer role may use client tools named search_*; no other role any."""
    roles = load_roles()
    roles["developer"] = roles["developer"].model_copy(update={"client_tools": ["search_*"]})
    monkeypatch.setattr(agents.service, "load_roles", lambda: roles)


def running(tmp_path, backend, **overrides):
    return start_mux(tmp_path, [("b", backend.url, 4)], rate_limits=False, **overrides)


def test_every_length_field_is_capped_by_the_role_and_only_max_tokens_reaches_the_backend(tmp_path):
    cap = load_roles()["developer"].sampling.max_tokens
    with RecordingBackend() as backend:
        mux = running(tmp_path, backend)
        try:
            dev = mux.key("developer")
            asked = {"max_completion_tokens": 100000, "n_predict": 100000, "min_tokens": 100000}
            assert post(mux.url, dev, "s", **asked).status_code == 200
            assert post(mux.url, dev, "s", max_tokens=100000, max_completion_tokens=7).status_code == 200
        finally:
            mux.mux.stop()
    first, second = backend.bodies
    assert first["max_tokens"] == cap and first["min_tokens"] == cap
    assert "max_completion_tokens" not in first and "n_predict" not in first
    assert second["max_tokens"] == 7  # the shortest length asked under any name


@pytest.mark.server
def test_a_real_llama_server_asked_for_more_under_its_own_name_stops_at_the_roles_cap(
        tmp_path, tmp_path_factory, session_store, llama_build, monkeypatch):
    roles = load_roles()
    qa = roles["qa-specialist"]
    short = qa.sampling.model_copy(update={"max_tokens": 16})
    roles["qa-specialist"] = qa.model_copy(update={"sampling": short})
    monkeypatch.setattr(agents.service, "load_roles", lambda: roles)
    with module_server(tmp_path_factory, session_store, parallel=1, ctx=1024) as llama:
        mux = start_mux(tmp_path, [("llama", llama.base_url, 1)], rate_limits=False)
        try:
            r = httpx.post(f"{mux.url}/v1/chat/completions", timeout=300,
                           headers={"Authorization": f"Bearer {mux.key('qa-specialist')}"},
                           json={"messages": [{"role": "system", "content": "Count."},
                                              {"role": "user", "content": "1 2 3"}],
                                 "n_predict": 64, "max_completion_tokens": 64, "ignore_eos": True})
        finally:
            mux.mux.stop()
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16


def test_several_choices_and_lengths_that_are_not_positive_integers_are_refused_naming_the_field(tmp_path):
    with RecordingBackend() as backend:
        mux = running(tmp_path, backend)
        try:
            dev = mux.key("developer")
            for field, value in (("n", 2), ("best_of", 3), ("n_cmpl", 2), ("n", 0),
                                 ("max_tokens", "10"), ("max_completion_tokens", -1), ("min_tokens", 1.5)):
                r = post(mux.url, dev, "s", **{field: value})
                assert r.status_code == 400 and r.json()["error"]["message"].startswith(field), (field, r.text)
            assert post(mux.url, dev, "s", n=1, max_tokens=None).status_code == 200
        finally:
            mux.mux.stop()
    assert len(backend.bodies) == 1


def test_a_clients_cache_salt_never_reaches_the_backend(tmp_path):
    with RecordingBackend() as vllm:
        mux = running(tmp_path, vllm, backend_kind="vllm")
        try:
            dev = mux.key("developer")
            no_session = httpx.post(f"{mux.url}/v1/chat/completions",
                                    headers={"Authorization": f"Bearer {dev}"},
                                    json={"messages": [{"role": "user", "content": "hi"}],
                                          "cache_salt": "mine"})
            assert no_session.status_code == 200
            assert post(mux.url, dev, "s1", cache_salt="mine").status_code == 200
        finally:
            mux.mux.stop()
    alone, in_session = vllm.bodies
    assert "cache_salt" not in alone
    assert in_session["cache_salt"] != "mine" and len(in_session["cache_salt"]) == 32


def test_one_agent_filling_its_share_of_the_queue_turns_away_only_itself():
    async def run():
        pool = BackendPool.of([BackendConfig(name="b", url="http://127.0.0.1:9", max_concurrency=1)], 10)
        sched = FairScheduler(pool, queue_max=6, agent_queue_max=2)
        deadline = asyncio.get_running_loop().time() + 60
        held = await sched.acquire("flooder", 1, 1, 10, deadline)
        queued = [asyncio.create_task(sched.acquire("flooder", 1, 1, 10, deadline)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(AgentQueueFull):
            await sched.acquire("flooder", 1, 1, 10, deadline)
        others = [asyncio.create_task(sched.acquire(a, 1, 1, 10, deadline)) for a in ("a", "b", "c", "d")]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):  # the queue as a whole is full now
            await sched.acquire("e", 1, 1, 10, deadline)
        for task in queued + others:
            task.cancel()
        await asyncio.gather(*queued, *others, return_exceptions=True)
        sched.release(held.backend)
        return sched.depth, sched.queued

    depth, queued = asyncio.run(run())
    assert depth == 0 and set(queued.values()) == {0}
    assert FairScheduler(None, 256).agent_queue_max == 64 and FairScheduler(None, 8).agent_queue_max == 4


def test_a_flooding_agent_gets_429_while_the_others_are_still_admitted(tmp_path):
    async def run(mux):
        async with httpx.AsyncClient(timeout=60) as client:
            def ask(key):
                return client.post(f"{mux.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                   json={"messages": [{"role": "user", "content": "hi"}]})
            flood = [asyncio.create_task(ask(mux.key("developer"))) for _ in range(10)]
            await asyncio.sleep(0.3)  # the flood is queued behind the one slot
            others = await asyncio.gather(*(ask(mux.key(role)) for role in ("architect-nusy", "qa-specialist",
                                                                              "product-manager")))
            return await asyncio.gather(*flood), others

    with RecordingBackend(service_s=0.5) as slow:
        mux = start_mux(tmp_path, [("slow", slow.url, 1)], rate_limits=False, queue_max=6,
                        queue_per_agent_max=2)
        try:
            flood, others = asyncio.run(run(mux))
            metrics = httpx.get(f"{mux.url}/metrics").text
        finally:
            mux.mux.stop()
    codes = [r.status_code for r in flood]
    assert set(codes) == {200, 429} and codes.count(429) >= 6  # one in flight and two queued, then more
    assert "share of the queue" in next(r for r in flood if r.status_code == 429).json()["error"]["message"]
    assert [r.status_code for r in others] == [200, 200, 200]
    assert f'dgxready_mux_rejections_total{{reason="agent_queue_full"}} {codes.count(429)}.0' in metrics


def audit_of(mux) -> list[tuple]:
    return [row for row in StateStore(mux.config.state_db).audit_rows() if row[2].startswith("client:")]


def test_client_tools_the_role_may_not_use_are_dropped_named_audited_and_counted(tmp_path, search_allowed):
    with RecordingBackend() as backend:
        mux = running(tmp_path, backend)
        try:
            dev, qa = mux.key("developer"), mux.key("qa-specialist")
            kept = post(mux.url, dev, "s", tools=[SEARCH, SHELL], parallel_tool_calls=False,
                        tool_choice={"type": "function", "function": {"name": "shell_exec"}})
            none_left = post(mux.url, qa, "s", tools=[SEARCH], tool_choice="required")
            metrics = httpx.get(f"{mux.url}/metrics").text
        finally:
            mux.mux.stop()
    assert kept.status_code == none_left.status_code == 200
    assert kept.headers["x-dgxready-dropped-tools"] == "shell_exec"
    assert none_left.headers["x-dgxready-dropped-tools"] == "search_web"
    to_dev, to_qa = backend.bodies
    assert to_dev["tools"] == [SEARCH] and to_dev["parallel_tool_calls"] is False
    assert "tool_choice" not in to_dev  # it named a dropped tool
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(to_qa)
    assert [(r[0].split("-")[0], r[2], r[3]) for r in audit_of(mux)] == [
        ("developer", "client:shell_exec", "dropped"), ("qa", "client:search_web", "dropped")]
    assert 'dgxready_mux_client_tools_total{action="dropped",role="developer"} 1.0' in metrics
    assert 'dgxready_mux_client_tools_total{action="dropped",role="qa-specialist"} 1.0' in metrics


def test_refusing_policy_answers_400_naming_the_tool_and_sends_nothing(tmp_path, search_allowed):
    with RecordingBackend() as backend:
        mux = running(tmp_path, backend, client_tools_policy="refuse")
        try:
            dev = mux.key("developer")
            refused = post(mux.url, dev, "s", tools=[SEARCH, SHELL])
            allowed = post(mux.url, dev, "s", tools=[SEARCH])
            malformed = post(mux.url, dev, "s", tools=[{"type": "function", "function": {"name": "a b"}}])
            legacy = post(mux.url, dev, "s", functions=[{"name": "search_web"}])
        finally:
            mux.mux.stop()
    assert refused.status_code == 400
    message = refused.json()["error"]["message"]
    assert message.startswith("tools:") and "'shell_exec'" in message and "developer" in message
    assert allowed.status_code == 200 and [b["tools"] for b in backend.bodies] == [[SEARCH]]
    assert malformed.status_code == 400 and "tools[0].function.name" in malformed.json()["error"]["message"]
    assert legacy.status_code == 400 and legacy.json()["error"]["message"].startswith("functions")
    assert [r[3] for r in audit_of(mux)] == ["refused"]


def tool_call_backend(calls: list[tuple[str, str]]) -> Starlette:
    """Answers every chat with the given tool calls, streamed in pieces the way vLLM sends them."""
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}

    def event(delta: dict, finish: str | None = None) -> str:
        chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(chunk)}\n\n"

    def pieces():
        yield event({"role": "assistant", "content": ""})
        for i, (name, args) in enumerate(calls):
            yield event({"tool_calls": [{"index": i, "id": f"call-{i}", "type": "function",
                                         "function": {"name": name, "arguments": ""}}]})
            for part in (args[:len(args) // 2], args[len(args) // 2:]):
                yield event({"tool_calls": [{"index": i, "function": {"arguments": part}}]})
        yield event({}, "tool_calls")
        last = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "fake", "choices": [],
                "usage": usage}
        yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n"

    async def chat(request: Request) -> Response:
        if (await request.json()).get("stream"):
            return StreamingResponse(pieces(), media_type="text/event-stream")
        message = {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call-{i}", "type": "function", "function": {"name": name, "arguments": args}}
            for i, (name, args) in enumerate(calls)]}
        return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": "fake",
                             "usage": usage,
                             "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/v1/models", models), Route("/health", health)])


class ToolCallingBackend(RecordingBackend):
    def __init__(self, calls: list[tuple[str, str]]):
        super().__init__()
        self.app = tool_call_backend(calls)


def answers(url: str, key: str) -> tuple:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    ask = {"model": "m", "messages": [{"role": "user", "content": "go"}], "tools": [SEARCH]}
    whole = client.chat.completions.create(**ask).choices[0]
    with client.chat.completions.stream(**ask) as stream:
        streamed = stream.get_final_completion().choices[0]
    return whole, streamed


def test_a_models_call_to_a_tool_the_role_may_not_use_is_blocked_whole_and_streamed(tmp_path, search_allowed):
    calls = [("shell_exec", '{"cmd": "rm -rf /"}'), ("search_web", '{"q": "gb10 memory"}')]
    with ToolCallingBackend(calls) as backend:
        mux = running(tmp_path, backend)
        try:
            whole, streamed = answers(mux.url, mux.key("developer"))
            metrics = httpx.get(f"{mux.url}/metrics").text
        finally:
            mux.mux.stop()
    for choice in (whole, streamed):
        assert choice.finish_reason == "tool_calls"
        assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [calls[1]]
        assert "blocked: tool 'shell_exec' is not allowed for role developer" in choice.message.content
        assert "rm -rf" not in choice.message.content
    assert [(r[2], r[3]) for r in audit_of(mux)] == [("client:shell_exec", "blocked")] * 2
    assert 'dgxready_mux_client_tools_total{action="blocked",role="developer"} 2.0' in metrics


def test_an_answer_whose_every_call_is_blocked_ends_with_stop_and_says_why(tmp_path, search_allowed):
    with ToolCallingBackend([("shell_exec", '{"cmd": "id"}')]) as backend:
        mux = running(tmp_path, backend)
        try:
            whole, streamed = answers(mux.url, mux.key("qa-specialist"))
        finally:
            mux.mux.stop()
    for choice in (whole, streamed):
        assert choice.finish_reason == "stop" and not choice.message.tool_calls
        assert "role qa-specialist (client_tools: none)" in choice.message.content


def series(metrics: str) -> list[str]:
    return [line.rsplit(" ", 1)[0] for line in metrics.splitlines() if line and not line.startswith("#")]


def test_bogus_tool_names_and_sessions_mint_no_metric_series(tmp_path):
    def hammer(mux, first: int, count: int) -> list[str]:
        key = mux.key("developer")
        h = {"Authorization": f"Bearer {key}"}
        for i in range(first, first + count):
            httpx.post(f"{mux.url}/v1/tools/call", headers=h, json={"tool": f"bogus.{i}", "args": {},
                                                                       "session": f"sess-{i}"})
            bogus = {"type": "function", "function": {"name": f"bogus_{i}"}}
            assert post(mux.url, key, f"sess-{i}", tools=[bogus]).status_code == 200
        return series(httpx.get(f"{mux.url}/metrics").text)

    with RecordingBackend() as backend:
        mux = running(tmp_path, backend)
        try:
            after_five = hammer(mux, 0, 5)
            after_forty = hammer(mux, 5, 35)
        finally:
            mux.mux.stop()
    assert after_forty == after_five
    assert not [s for s in after_forty if re.search(r"bogus|sess-", s)]
    assert any('tool="unknown"' in s for s in after_forty)
