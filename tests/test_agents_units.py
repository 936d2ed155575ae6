"""Scheduler, roles, keys and tools without any server."""
import asyncio
import inspect
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import orjson
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from invoke import Context
from invoke.exceptions import Exit
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from agents.asgi import server_cycle
from agents.backends import BackendPool
from agents.config import BackendConfig, load_keys, team_roles, write_keys
from agents.deadlines import DeadlineWatch
from agents.messages import message_chars, message_text
from agents.metrics import LATENCY_BUCKETS, KnownLabels, LoopCollector, LoopFamily, MuxMetrics
from agents.mux import SessionLocks
from agents.policy import ToolScope
from agents.proxy import SseTally, backend_error
from agents.scheduler import DeadlineExceeded, FairScheduler, QueueFull
from agents.tasks import serve
from dgxready.errors import ConfigError
from dgxready.roles import ROLE_ORDER, ROLES_DIR, load_roles


def pool(cap=1):
    return BackendPool.of([BackendConfig(name="b", url="http://127.0.0.1:9", max_concurrency=cap)], 10)


def test_wfq_shares_slots_by_weight_and_priority_goes_first():
    async def run():
        sched = FairScheduler(pool(1), queue_max=1000)
        order = []

        async def client(agent, weight, priority, n):
            for _ in range(n):
                grant = await sched.acquire(agent, weight, priority, 100, time.monotonic() + 60)
                order.append(agent)
                await asyncio.sleep(0)
                sched.release(grant.backend)

        backlogged = [client(a, w, 1, 10) for a, w in (("heavy", 2.0), ("light", 1.0)) for _ in range(4)]
        await asyncio.gather(*backlogged, client("urgent", 1.0, 0, 5))
        return order

    order = asyncio.run(run())
    # A priority-0 request is served at the next free slot: never more than one grant between.
    urgent_at = [i for i, a in enumerate(order) if a == "urgent"]
    assert urgent_at[-1] <= 10 and all(b - a <= 2 for a, b in zip(urgent_at, urgent_at[1:], strict=False))
    window = [a for a in order if a != "urgent"][:30]
    assert 18 <= window.count("heavy") <= 22


def test_queue_bound_and_deadline():
    async def run():
        sched = FairScheduler(pool(1), queue_max=1)
        first = await sched.acquire("a", 1, 1, 10, time.monotonic() + 5)
        waiting = asyncio.create_task(sched.acquire("a", 1, 1, 10, time.monotonic() + 0.2))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await sched.acquire("b", 1, 1, 10, time.monotonic() + 5)
        with pytest.raises(DeadlineExceeded):
            await waiting
        sched.release(first.backend)
        assert sched.depth == 0
        again = await sched.acquire("b", 1, 1, 10, time.monotonic() + 1)
        assert again.backend.outstanding == 1

    asyncio.run(run())


def test_roles_and_keys_validate(tmp_path):
    roles = load_roles()
    assert list(roles) == list(ROLE_ORDER)
    bad = tmp_path / "developer.yaml"
    bad.write_text((ROLES_DIR / "developer.yaml").read_text()
                   .replace("shell.run", "shell.rm"))
    with pytest.raises(ConfigError, match=r"developer.yaml: tools\[3\]: Input should be 'workspace.read'"):
        load_roles(tmp_path)
    keys = write_keys(tmp_path / "keys.yaml", 10, ROLE_ORDER)
    assert [a.role for a in keys.agents][7:] == ["developer", "qa-specialist", "developer"]
    assert (tmp_path / "keys.yaml").stat().st_mode & 0o777 == 0o600
    assert len(load_keys(tmp_path / "keys.yaml", set(roles))) == 10
    assert team_roles(7, ROLE_ORDER) == list(ROLE_ORDER)


def test_a_waiter_that_gives_up_never_holds_a_slot():
    async def run():
        sched = FairScheduler(pool(1), queue_max=10)
        first = await sched.acquire("a", 1, 1, 10, time.monotonic() + 5)
        waiter = asyncio.create_task(sched.acquire("b", 1, 1, 10, time.monotonic() + 5))
        await asyncio.sleep(0.01)
        assert sched.depth == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert sched.depth == 0
        sched.release(first.backend)
        assert first.backend.outstanding == 0
        again = await sched.acquire("c", 1, 1, 10, time.monotonic() + 1)
        assert again.backend.outstanding == 1 and again.queue_wait_s == 0.0

    asyncio.run(run())


def test_a_deep_queue_is_not_charged_in_advance():
    """One agent queues 40 requests at once, two others keep one each in flight; every estimate is
    ten times the real usage. Charged at dispatch, the deep queue is neither starved (charged in
    advance, it got 3 of the first 43 slots) nor allowed to take more than the other two together."""
    async def run():
        sched = FairScheduler(pool(1), queue_max=1000)
        served = {"deep": 0, "b": 0, "c": 0}

        async def one(agent):
            grant = await sched.acquire(agent, 1.0, 1, 100, time.monotonic() + 60)
            served[agent] += 1
            await asyncio.sleep(0)
            sched.settle(agent, 1.0, 100, 10)
            sched.release(grant.backend)

        async def loop(agent):
            for _ in range(20):
                await one(agent)

        deep = [asyncio.create_task(one("deep")) for _ in range(40)]
        await asyncio.sleep(0)
        await asyncio.gather(loop("b"), loop("c"))
        share = served["deep"]
        await asyncio.gather(*deep)
        return share

    assert 15 <= asyncio.run(run()) <= 40


def test_session_locks_serialise_a_session_and_are_dropped_when_idle():
    async def run():
        locks, order = SessionLocks(), []

        async def turn(session, n):
            async with locks.hold("dev", session):
                order.append((session, n, "in"))
                await asyncio.sleep(0.01)
                order.append((session, n, "out"))

        await asyncio.gather(turn("s", 1), turn("s", 2), turn("t", 1))
        return locks.held, order

    held, order = asyncio.run(run())
    s_events = [e for e in order if e[0] == "s"]
    assert s_events == [("s", 1, "in"), ("s", 1, "out"), ("s", 2, "in"), ("s", 2, "out")]
    assert order.index(("t", 1, "in")) < order.index(("s", 1, "out"))  # other sessions run alongside
    assert held == {}


def test_a_turn_cancelled_while_it_waits_for_its_session_leaves_no_lock_behind():
    async def run():
        locks = SessionLocks()
        release = asyncio.Event()

        async def turn():
            async with locks.hold("dev", "s"):
                await release.wait()

        first = asyncio.create_task(turn())
        await asyncio.sleep(0)
        waiting = asyncio.create_task(turn())
        await asyncio.sleep(0)
        assert locks.waiting("dev", "s") == 1
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert locks.waiting("dev", "s") == 0 and ("dev", "s") in locks.held
        release.set()
        await first
        return locks.held

    assert asyncio.run(run()) == {}


def test_a_turn_cancelled_just_as_it_is_handed_its_session_passes_it_on():
    async def run():
        locks, order, tasks = SessionLocks(), [], {}
        release = asyncio.Event()

        async def turn(n):
            async with locks.hold("dev", "s"):
                order.append(n)
                await release.wait()
            if n == 1:
                tasks[2].cancel()  # handed the session by the exit above, and not yet run

        tasks[1] = asyncio.create_task(turn(1))
        await asyncio.sleep(0)
        tasks[2], tasks[3] = asyncio.create_task(turn(2)), asyncio.create_task(turn(3))
        await asyncio.sleep(0)
        release.set()
        await asyncio.wait_for(asyncio.gather(*tasks.values(), return_exceptions=True), 5)
        return order, tasks[2].cancelled(), locks.held

    order, cancelled, held = asyncio.run(run())
    assert order == [1, 3] and cancelled and held == {}


def test_a_hang_up_is_read_off_the_servers_request_cycle_where_it_has_one_and_else_left_to_receive():
    class Cycle:
        disconnected = False

        async def send(self, message):
            pass

    async def plain_send(message):
        pass

    cycle = Cycle()
    watched = server_cycle(cycle.send)
    assert watched is cycle and watched.disconnected is False
    cycle.disconnected = True
    assert watched.disconnected is True
    assert server_cycle(plain_send) is None, "without the flag, relay watches receive() instead"
    assert "self.disconnected = False" in inspect.getsource(RequestResponseCycle.__init__), \
        "uvicorn's request cycle still carries the flag (the test of a real hang-up uses it)"


def test_every_known_agent_is_exported_at_zero_before_its_first_request_so_rate_counts_that_request():
    metrics = MuxMetrics(KnownLabels(agents=frozenset({"developer-1", "qa-specialist-1"}),
                                     backends=frozenset({"local"})))
    text = generate_latest(metrics.registry).decode()
    for agent in ("developer-1", "qa-specialist-1"):
        assert f'dgxready_mux_requests_total{{agent="{agent}",backend="local",status="ok"}} 0.0' in text
        assert f'dgxready_mux_request_duration_seconds_count{{agent="{agent}"}} 0.0' in text
        assert f'dgxready_mux_tokens_total{{agent="{agent}",direction="completion"}} 0.0' in text
    assert 'agent="unknown"' not in text


def sse(*events: dict) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


# The last event's text looks like a finish and a usage, after the real ones.
TRICKY_STREAM = sse(
    {"choices": [{"index": 0, "delta": {"content": "hello"}, "finish_reason": None}], "usage": None},
    {"choices": [{"index": 0, "delta": {"content": " done"}, "finish_reason": "stop"}], "usage": None},
    {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}},
    {"choices": [{"index": 0, "delta": {"content": ' "finish_reason": "length", "usage": {"x": 1}'},
                  "finish_reason": None}]})


# A malformed event among them is skipped; the others still count.
BROKEN_STREAM = TRICKY_STREAM.replace(b"data: [DONE]", b"data: {not json]\n\ndata: []\n\ndata: [DONE]")


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(BROKEN_STREAM)), max_size=12),
       keep_text=st.booleans(), broken=st.booleans())
def test_the_stream_tally_reads_finish_and_usage_however_the_bytes_are_split_and_whatever_the_text_says(
        cuts, keep_text, broken):
    stream = BROKEN_STREAM if broken else TRICKY_STREAM
    tally = SseTally(keep_text, ToolScope("developer", ()))
    bounds = [0, *sorted(c for c in cuts if c <= len(stream)), len(stream)]
    passed = b"".join(tally.feed(stream[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
    assert passed + tally.pending == stream
    out = tally.result()
    assert (out.finish_reason, out.prompt_tokens, out.completion_tokens) == ("stop", 7, 2)
    assert tally.events == 5 + 2 * broken
    assert out.text == ('hello done "finish_reason": "length", "usage": {"x": 1}' if keep_text else "")


# A backend that ends its stream on its usage event's line, with no newline and no [DONE].
UNENDED_STREAM = sse(*(orjson.loads(e[6:]) for e in TRICKY_STREAM.split(b"\n\n")[:2])).removesuffix(
    b"data: [DONE]\n\n") + b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}'


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(UNENDED_STREAM)), max_size=12),
       keep_text=st.booleans())
def test_a_stream_whose_last_line_has_no_newline_still_has_that_line_read_at_its_end(cuts, keep_text):
    tally = SseTally(keep_text, ToolScope("developer", ()))
    bounds = [0, *sorted(c for c in cuts if c <= len(UNENDED_STREAM)), len(UNENDED_STREAM)]
    passed = b"".join(tally.feed(UNENDED_STREAM[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
    assert passed + tally.feed_end() == UNENDED_STREAM, "the bytes pass on as the backend sent them"
    assert tally.pending == b"" and tally.feed_end() == b""
    out = tally.result()
    assert (out.finish_reason, out.prompt_tokens, out.completion_tokens, tally.events) == ("stop", 7, 2, 3)
    assert out.text == ("hello done" if keep_text else "")


def test_a_tool_call_on_a_streams_unended_last_line_is_screened_like_any_other():
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "shell_exec", "arguments": "{}"}}
    last = {"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": "tool_calls"}]}
    tally = SseTally(False, ToolScope("developer", ()))
    assert tally.feed(b"data: " + orjson.dumps(last)) == b""
    passed = tally.feed_end()
    choice = orjson.loads(passed.removeprefix(b"data: "))["choices"][0]
    assert "tool_calls" not in choice["delta"] and choice["finish_reason"] == "stop"
    assert "blocked: tool 'shell_exec'" in choice["delta"]["content"]
    assert tally.guard.blocked == ["shell_exec"] and tally.finish_reason == "stop"


def test_a_sessions_stream_keeps_only_the_text_deltas_whatever_else_the_events_hold():
    stream = sse({"choices": [1, "x", {"delta": "text"}, {"delta": {"content": ["part"]}}]},
                 {"choices": {"delta": {"content": "not a list"}}}, ["not", "an", "object"],
                 {"choices": [{"delta": {"content": "kept"}, "finish_reason": "stop"}],
                  "usage": [{"usage": {"prompt_tokens": 1}}]})
    tally = SseTally(True, ToolScope("developer", ()))
    assert tally.feed(stream) == stream
    out = tally.result()
    assert (out.text, out.finish_reason, out.prompt_tokens) == ("kept", "stop", 0)


TEXT_PARTS = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
                      max_size=3)
MESSAGES = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]),
     "content": st.one_of(st.none(), st.text(max_size=40), TEXT_PARTS)},
    optional={"tool_calls": st.lists(st.fixed_dictionaries(
        {"function": st.fixed_dictionaries({"name": st.text(max_size=8), "arguments": st.text(max_size=20)})}),
        max_size=2)})


@given(MESSAGES)
def test_a_messages_length_for_the_token_estimate_is_the_length_of_its_text(message):
    assert message_chars(message) == len(message_text(message))


def exposition(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


@given(st.lists(st.one_of(st.sampled_from(LATENCY_BUCKETS), st.floats(min_value=0, max_value=100)),
                max_size=30))
def test_the_loop_kept_series_export_as_prometheus_clients_own_would_bucket_bounds_included(values):
    ours = LoopFamily("x_seconds", "help", ("agent",), LATENCY_BUCKETS)
    counted = LoopFamily("x_events", "help", ("agent",))
    registry, reference = CollectorRegistry(), CollectorRegistry()
    registry.register(LoopCollector([ours, counted]))
    theirs = Histogram("x_seconds", "help", ["agent"], buckets=LATENCY_BUCKETS, registry=reference)
    their_count = Counter("x_events", "help", ["agent"], registry=reference)
    for value in values:
        ours.labels("a").observe(value)
        theirs.labels("a").observe(value)
        counted.labels("a").inc(value)
        their_count.labels("a").inc(value)
    assert exposition(registry) == exposition(reference)


@dataclass(eq=False)
class Talk:
    deadline: float
    task: asyncio.Task | None = None
    reading: bool = False
    passed: bool = False
    cancelled: bool = False


def test_a_turns_deadline_cancels_a_backend_read_in_progress_as_a_timeout_and_takes_the_cancel_back():
    async def run():
        watch = DeadlineWatch()
        ticking = asyncio.create_task(watch.run(0.01))
        talk = Talk(time.monotonic() + 0.05)
        watch.begin(talk)
        talk.reading = True
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError as raised:
            exc = backend_error(raised, talk)
        assert isinstance(exc, asyncio.TimeoutError) and talk.passed
        assert asyncio.current_task().cancelling() == 0
        assert not watch.talking
        await asyncio.sleep(0.05)  # nothing cancels the turn again
        ticking.cancel()
        return "went on"
    assert asyncio.run(run()) == "went on"


def test_a_cancellation_that_is_not_the_deadlines_goes_on_up():
    async def run():
        watch = DeadlineWatch()
        talk = Talk(time.monotonic() + 60)
        watch.begin(talk)
        talk.reading = True
        asyncio.get_running_loop().call_later(0.01, asyncio.current_task().cancel)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError as raised:
            with pytest.raises(asyncio.CancelledError):
                backend_error(raised, talk)
        assert asyncio.current_task().cancelling() == 1
        assert watch.expire_due(time.monotonic()) == 0 and not talk.passed
    asyncio.run(run())


def test_a_deadline_that_passes_while_the_turn_writes_to_its_client_only_marks_it():
    async def run():
        watch = DeadlineWatch()
        writing, done = Talk(time.monotonic() + 0.01), Talk(time.monotonic() + 0.01)
        watch.begin(writing)
        watch.begin(done)
        watch.end(done)
        await asyncio.sleep(0.02)
        assert watch.expire_due(time.monotonic()) == 1
        assert writing.passed and not writing.cancelled and not done.passed
        assert asyncio.current_task().cancelling() == 0
    asyncio.run(run())


def test_a_settled_server_process_keeps_its_start_up_objects_out_of_collections_and_collects_less_often():
    script = ("import gc, agents.service; from dgxready.gc_settings import settle_gc; "
              "default = gc.get_threshold()[0]; settle_gc(); "
              "print(default, gc.get_threshold()[0], gc.get_freeze_count())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    default, settled, frozen = map(int, out.split())
    assert settled >= 10 * default and frozen > 10_000


def test_a_multiplexer_port_already_taken_is_refused_naming_the_file_and_port_before_anything_starts(tmp_path):
    write_keys(tmp_path / "keys.yaml", 7, ROLE_ORDER)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "mux.yaml"
        config.write_text(yaml.safe_dump({
            "port": port, "keys_file": str(tmp_path / "keys.yaml"), "state_db": str(tmp_path / "mux.db"),
            "backends": [{"name": "b", "url": "http://127.0.0.1:9", "max_concurrency": 1}]}))
        said = f"{config}: port: {port} on 127.0.0.1 is already in use"
        ran = subprocess.run([sys.executable, "-m", "agents.service", "--config", str(config)],
                             capture_output=True, text=True, timeout=60)
        assert ran.returncode == 1 and ran.stderr.startswith(f"error: {said}")
        with pytest.raises(Exit, match=said):
            serve(Context(), config=str(config))
    assert not (tmp_path / "mux.db").exists(), "nothing was started"
