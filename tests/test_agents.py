"""The multiplexer's concurrency suite, against real llama-servers with the default model."""
import asyncio
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import yaml

from agents.config import write_keys
from dgxready.ports import free_port
from dgxready.roles import ROLE_ORDER, TOOLS, load_roles
from model.serve import ServeRequest, serve, stop
from tests.agents_helpers import chat, start_mux
from tests.conftest import module_server

pytestmark = pytest.mark.server


def start_backend(settings, parallel=8, ctx=1024):
    return serve(ServeRequest(model="smollm2-135m", backend="llamacpp", port=free_port(),
                              parallel=parallel, ctx_per_slot=ctx), settings)


@pytest.fixture(scope="module")
def backend(tmp_path_factory, session_store, llama_build):
    with module_server(tmp_path_factory, session_store, parallel=8, ctx=1024) as state:
        yield state


@pytest.fixture(scope="module")
def mux(backend, tmp_path_factory):
    m = start_mux(tmp_path_factory.mktemp("mux"), [("main", backend.base_url, 8)], history_turns=1,
                  rate_limits=False)
    yield m
    m.mux.stop()


def test_openai_sdk_with_an_agent_key(mux):
    client = openai.OpenAI(base_url=f"{mux.url}/v1", api_key=mux.key("developer"), max_retries=0)
    assert client.models.list().data[0].id == "smollm2-135m"
    resp = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=8, extra_body={"ignore_eos": True})
    assert resp.choices[0].message.content and resp.usage.completion_tokens > 0
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{mux.url}/v1", api_key="not-a-key-0000000000", max_retries=0
                      ).chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}])


async def stream_turn(client, url, key, session, content, max_tokens=16):
    started = time.perf_counter()
    text, finish = [], None
    async with client.stream("POST", f"{url}/v1/chat/completions",
                             headers={"Authorization": f"Bearer {key}", "X-Session-Id": session},
                             json={"model": "m", "stream": True, "max_tokens": max_tokens,
                                   "messages": [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": content}]}) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("data:") and line.strip() != "data: [DONE]":
                chunk = json.loads(line[5:])
                assert "error" not in chunk, chunk
                for ch in chunk.get("choices") or []:
                    text.append((ch.get("delta") or {}).get("content") or "")
                    finish = ch.get("finish_reason") or finish
    return "".join(text), finish, time.perf_counter() - started


def test_ten_agents_at_once_are_all_served(mux):
    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(
                stream_turn(client, mux.url, a.key, f"load-{a.name}", "Name one colour.", 24)
                for a in mux.keys.agents))

    results = asyncio.run(run())
    latencies = sorted(r[2] for r in results)
    print("per-agent latencies (s):", [round(x, 2) for x in latencies])
    assert len(results) == 10 and all(r[0] and r[1] in ("stop", "length") for r in results)


CANARY_EXAMPLE = "CANARY-5071"
CANARY_SESSIONS, CANARY_TURNS = 10, 3  # per agent, per session


def test_sessions_never_see_each_others_canaries(mux):
    """300 concurrent turns: 10 agents x 10 sessions x 3 turns, each turn carrying its own canary.
    One worked example makes the model echo the code (9 tokens), so a canary that leaked into
    another session's prompt, or an answer that went to the wrong request, shows in an answer."""
    agents = mux.keys.agents
    sessions = [(a, f"iso-{s}") for a in agents for s in range(CANARY_SESSIONS)]
    canaries = {(a.name, s): [] for a, s in sessions}
    unique = iter(n for n in random.sample(range(10000), len(sessions) * CANARY_TURNS + 1) if n != 5071)
    echoed = []

    async def session_run(client, agent, session):
        for _ in range(CANARY_TURNS):
            canary = f"CANARY-{next(unique):04d}"
            canaries[(agent.name, session)].append(canary)
            # Queueing 100 sessions on a shared CI box can outlast the default deadline.
            r = await client.post(f"{mux.url}/v1/chat/completions",
                                  headers={"Authorization": f"Bearer {agent.key}", "X-Session-Id": session,
                                           "X-Deadline-S": "900"},
                                  json={"model": "m", "max_tokens": 12, "temperature": 0, "messages": [
                                      {"role": "system", "content": "Repeat the code."},
                                      {"role": "user", "content": CANARY_EXAMPLE},
                                      {"role": "assistant", "content": CANARY_EXAMPLE},
                                      {"role": "user", "content": canary}]})
            assert r.status_code == 200, r.text
            answer = r.json()["choices"][0]["message"]["content"]
            echoed.append(canary in answer)
            others = [c for k, cs in canaries.items() if k != (agent.name, session) for c in cs]
            assert not any(c in answer for c in others), answer

    async def run():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=900, limits=limits) as client:
            await asyncio.gather(*(session_run(client, a, s) for a, s in sessions))

    asyncio.run(run())
    assert sum(echoed) >= len(echoed) // 2, f"the model echoed {sum(echoed)} of {len(echoed)} canaries"
    turns = 0
    for agent, session in sessions:
        view = httpx.get(f"{mux.url}/v1/sessions/{session}",
                         headers={"Authorization": f"Bearer {agent.key}"}).json()
        turns += view["turns"]
        text = json.dumps(view["history"])
        mine = canaries[(agent.name, session)]
        users = [m["content"] for m in view["history"] if m["role"] == "user"]
        assert [u for u in users if u != CANARY_EXAMPLE] == mine
        foreign = [c for k, cs in canaries.items() if k != (agent.name, session) for c in cs]
        assert not any(c in text for c in foreign)
    assert turns == len(sessions) * CANARY_TURNS


def test_one_sessions_turns_run_in_order(mux):
    """Six turns sent 0.15 s apart, each decoding longer than that, so they queue on the session:
    they are answered one at a time and stored in the order they were sent."""
    key = mux.key("developer")
    sent, answered = [], []

    async def turn(client, i):
        sent.append((time.monotonic(), i))
        r = await client.post(f"{mux.url}/v1/chat/completions",
                              headers={"Authorization": f"Bearer {key}", "X-Session-Id": "ordered"},
                              json={"model": "m", "max_tokens": 24, "ignore_eos": True,
                                    "messages": [{"role": "user", "content": f"turn {i}"}]})
        assert r.status_code == 200, r.text
        answered.append((time.monotonic(), i))

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            tasks = []
            for i in range(6):
                tasks.append(asyncio.create_task(turn(client, i)))
                await asyncio.sleep(0.15)
            await asyncio.gather(*tasks)

    asyncio.run(run())
    view = httpx.get(f"{mux.url}/v1/sessions/ordered", headers={"Authorization": f"Bearer {key}"}).json()
    users = [m["content"] for m in view["history"] if m["role"] == "user"]
    assert users == [f"turn {i}" for i in range(6)] and view["turns"] == 6
    assert [m["role"] for m in view["history"]] == ["user", "assistant"] * 6
    assert [i for _, i in sorted(answered)] == list(range(6))
    sent_at, answered_at = dict((i, t) for t, i in sent), dict((i, t) for t, i in answered)
    assert any(sent_at[i] < answered_at[i - 1] for i in range(1, 6)), "no turn had to wait for another"


def test_every_roles_allowed_and_denied_tools(mux):
    roles = load_roles()
    args = {"workspace.read": {"path": "perm/x"}, "workspace.write": {"path": "perm/x", "append": "."},
            "taskboard.append": {"item": "perm"}, "shell.run": {"argv": ["echo", "ok"]},
            "knowledge.query": {"query": "gpu"}, "kb.search": {"query": "gpu"},
            "kb.add": {"source": "perm.md", "text": "# perm\nallowed"},
            "onto.query": {"sparql": "ASK { ?s ?p ?o }"},
            "onto.assert": {"turtle": "<urn:perm:a> <urn:perm:b> <urn:perm:c> ."}}
    sessions = []
    for ident in mux.keys.agents[:7]:
        allowed = set(roles[ident.role].tools)
        allowed |= {"knowledge.query"} if "kb.search" in allowed else set()
        for tool in TOOLS:
            sessions.append(f"sess-{secrets.token_hex(6)}")
            r = httpx.post(f"{mux.url}/v1/tools/call", headers={"Authorization": f"Bearer {ident.key}"},
                           json={"tool": tool, "args": args[tool], "session": sessions[-1]})
            if tool in allowed:
                assert r.status_code == 200 and r.json()["ok"], (ident.role, tool, r.text)
            else:
                assert r.status_code == 403 and r.json()["outcome"] == "denied", (ident.role, tool)
    sessions.append(f"sess-{secrets.token_hex(6)}")
    assert chat(mux.url, mux.key("developer"), "hi", session=sessions[-1], max_tokens=1).status_code == 200
    metrics = httpx.get(f"{mux.url}/metrics").text
    assert 'outcome="denied",tool="shell.run"' in metrics
    assert [s for s in sessions if s in metrics] == [], "session ids must not become metric labels"


def test_malformed_oversized_and_unauthorised_requests_get_4xx(mux):
    key = mux.key("developer")
    h = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    url = f"{mux.url}/v1/chat/completions"
    assert httpx.post(url, headers=h, content=b"{not json").status_code == 400
    assert httpx.post(url, headers=h, content=b"[]").status_code == 400
    assert httpx.post(url, headers=h, json={"messages": [{"role": "robot"}]}).status_code == 400
    assert httpx.post(url, headers=h, content=b"x" * (2 << 20)).status_code == 413
    assert httpx.post(url, headers={"Authorization": "Bearer nope"}, json={}).status_code == 401
    assert httpx.post(url, headers=h | {"X-Session-Id": "../../etc"}, json={
        "messages": [{"role": "user", "content": "x"}]}).status_code == 400
    assert httpx.get(f"{mux.url}/v1/sessions/bad%20id", headers=h).status_code == 400
    for deadline in ("soon", "nan", "-1"):
        assert httpx.post(url, headers=h | {"X-Deadline-S": deadline}, json={
            "messages": [{"role": "user", "content": "x"}]}).status_code == 400
    assert httpx.get(f"{mux.url}/health").status_code == 200
    assert chat(mux.url, key, "still up?").status_code == 200


def test_tool_using_clients_conversations_pass_and_bad_content_is_named(mux):
    key = mux.key("developer")
    client = openai.OpenAI(base_url=f"{mux.url}/v1", api_key=key, max_retries=0)
    # What LangChain, CrewAI and AutoGen send once a tool has run: a developer message, content
    # parts, an assistant turn with null content and tool_calls, and the tool's result.
    reply = client.chat.completions.create(
        model="any", max_tokens=8, extra_body={"ignore_eos": True}, messages=[
        {"role": "developer", "content": "Answer in five words."},
        {"role": "user", "content": [{"type": "text", "text": "What is the weather in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call-1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "sunny, 21 C"},
        {"role": "user", "content": "So, how is it?"}])
    assert reply.choices[0].message.content
    bad = httpx.post(f"{mux.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                     json={"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": 42}]})
    assert bad.status_code == 400 and "messages[1].content" in bad.json()["error"]["message"]


def test_queue_overflow_gets_429_and_the_service_stays_up(backend, tmp_path):
    small = start_mux(tmp_path, [("one", backend.base_url, 1)], queue_max=2)
    try:
        key = small.key("developer")

        async def flood():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(client.post(
                    f"{small.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                    json={"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
                    for _ in range(12)))

        codes = [r.status_code for r in asyncio.run(flood())]
        rejected = [r for r in codes if r == 429]
        assert rejected and set(codes) <= {200, 429} and codes.count(200) >= 3
        assert httpx.get(f"{small.url}/health").status_code == 200
        assert chat(small.url, key, "after the flood").status_code == 200
        assert 'dgxready_mux_rejections_total{reason="queue_full"}' in httpx.get(f"{small.url}/metrics").text
    finally:
        small.mux.stop()


def wait_until(check, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_a_client_that_hangs_up_mid_stream_frees_its_backend_slot(backend, tmp_path):
    one = start_mux(tmp_path, [("one", backend.base_url, 1)], rate_limits=False)
    try:
        key = one.key("developer")
        decodes = lambda: next(float(ln.split()[1]) for ln in httpx.get(f"{backend.base_url}/metrics").text  # noqa: E731
                               .splitlines() if ln.startswith("llamacpp:n_decode_total"))
        before = decodes()
        body = {"model": "m", "stream": True, "max_tokens": 384, "ignore_eos": True,
                "messages": [{"role": "user", "content": "Count to a thousand."}]}
        with httpx.stream("POST", f"{one.url}/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.status_code == 200
            next(line for line in resp.iter_lines() if line.startswith("data:"))
        # Hung up after the first token of a 384-token answer (several seconds of decoding here).
        outstanding = lambda: httpx.get(f"{one.url}/health").json()["backends"]["one"]["outstanding"]  # noqa: E731
        idle = lambda: not any(s["is_processing"] for s in httpx.get(f"{backend.base_url}/slots").json())  # noqa: E731
        assert wait_until(lambda: outstanding() == 0)
        assert wait_until(idle)
        assert decodes() - before < 384, "llama-server decoded the whole answer for a client that had gone"
        assert 'status="client_gone"' in httpx.get(f"{one.url}/metrics").text
        assert chat(one.url, key, "still there?", max_tokens=4).status_code == 200
    finally:
        one.mux.stop()


def test_a_backend_killed_mid_run_loses_and_duplicates_nothing(isolated, backend, tmp_path):
    doomed = start_backend(isolated, parallel=4)
    both = start_mux(tmp_path, [("doomed", doomed.base_url, 4), ("main", backend.base_url, 8)])
    try:
        agents = both.keys.agents

        async def one(client, i):
            agent = agents[i % len(agents)]
            try:
                text, finish, _ = await stream_turn(client, both.url, agent.key, f"kill-{i}",
                                                    "Tell me a long story about a GPU.", 96)
                return ("ok", finish)
            except AssertionError as err:
                return ("error", str(err)[:200])

        async def run():
            async with httpx.AsyncClient(timeout=300) as client:
                tasks = [asyncio.create_task(one(client, i)) for i in range(16)]
                await asyncio.sleep(1.5)
                os.kill(doomed.pid, signal.SIGKILL)
                return await asyncio.gather(*tasks)

        results = asyncio.run(run())
        assert len(results) == 16
        for status, detail in results:
            assert status == "ok" or "failed mid-stream" in detail or "backend" in detail, detail
        after = [chat(both.url, agents[i].key, "are you there?", max_tokens=4).status_code for i in range(4)]
        assert after == [200] * 4
        metrics = httpx.get(f"{both.url}/metrics").text
        assert 'dgxready_mux_backend_cooldowns_total{backend="doomed"}' in metrics
        ok_lines = [ln for ln in metrics.splitlines() if ln.startswith("dgxready_mux_requests_total")]
        served = sum(float(ln.split()[-1]) for ln in ok_lines if 'status="ok"' in ln or "failed" in ln)
        assert served == 16 + 4 + 0, ok_lines  # each request answered exactly once
    finally:
        both.mux.stop()
        stop(port=doomed.port, settings=isolated)


def test_sessions_survive_a_multiplexer_crash(backend, tmp_path):
    keys = write_keys(tmp_path / "keys.yaml", 7, ROLE_ORDER)
    port = free_port()
    cfg = tmp_path / "mux.yaml"
    backends = [{"name": "main", "url": backend.base_url, "max_concurrency": 8}]
    cfg.write_text(yaml.safe_dump({"port": port, "keys_file": str(tmp_path / "keys.yaml"),
                                   "state_db": str(tmp_path / "mux.db"), "backends": backends}))
    url = f"http://127.0.0.1:{port}"
    key = keys.agents[3].key

    def start():
        """Up to a minute: a loaded 2-core CI box takes over 10 s to import the service."""
        proc = subprocess.Popen([sys.executable, "-m", "agents.service", "--config", str(cfg)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return proc
            except httpx.HTTPError:
                time.sleep(0.1)
        proc.kill()
        raise AssertionError(f"multiplexer did not start (exit {proc.poll()})")

    proc = start()
    try:
        for i in range(2):
            assert chat(url, key, f"remember turn {i}", session="durable").status_code == 200
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = start()
        view = httpx.get(f"{url}/v1/sessions/durable", headers={"Authorization": f"Bearer {key}"}).json()
        assert view["turns"] == 2
        assert [m["content"] for m in view["history"] if m["role"] == "user"] == [
            "remember turn 0", "remember turn 1"]
        assert chat(url, key, "turn 2", session="durable").status_code == 200
        view = httpx.get(f"{url}/v1/sessions/durable", headers={"Authorization": f"Bearer {key}"}).json()
        assert view["turns"] == 3
    finally:
        proc.kill()
        proc.wait()


def test_role_rate_limit_answers_429_with_retry_after(backend, tmp_path):
    limited = start_mux(tmp_path, [("main", backend.base_url, 8)])
    try:
        key = limited.key("ux-researcher")  # 30 requests per minute
        started = time.monotonic()

        async def burst():
            # All at once, so the bucket has no time to refill however slow the box is; each one
            # answered, by the multiplexer's 300-s deadline at the latest (120 s ran out once on a
            # loaded 2-core box, with 30 prompts queued for 8 slots).
            async with httpx.AsyncClient(timeout=330, limits=httpx.Limits(max_connections=40)) as client:
                return await asyncio.gather(*(client.post(
                    f"{limited.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                    json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}) for _ in range(40)))

        codes = asyncio.run(burst())
        refilled = (time.monotonic() - started) * 30 / 60
        served = [c for c in codes if c.status_code == 200]
        limited_out = [c for c in codes if c.status_code == 429]
        assert 30 <= len(served) <= 30 + refilled + 1 and len(served) + len(limited_out) == 40
        assert limited_out and all(int(c.headers["Retry-After"]) >= 1 for c in limited_out)
        other = limited.key("developer")
        assert chat(limited.url, other, "unaffected").status_code == 200
    finally:
        limited.mux.stop()
