"""The logic-cost benchmark's harness: its canned transports drive the multiplexer's real chat path
(simulated: the backend's HTTP client and the client's ASGI connection), which relays the canned
stream byte for byte and accounts for it as it would a real one."""
import asyncio

import aiohttp

from agents.benchmarks.logic_cost import (
    AGENT,
    EVENT_CHUNKS,
    LONG_CHUNKS,
    LONG_TOKENS,
    SSE,
    CannedCycle,
    CannedStream,
    LogicCost,
    answer_body,
    bare_handler,
    canned_mux,
    http_scope,
    logic_cost,
    mux_handler,
    one_request,
    opcodes_per_request,
)
from agents.proxy import CHARGE_EVENTS


def test_the_canned_request_goes_through_the_multiplexers_chat_path_and_is_counted(tmp_path):
    mux, key = canned_mux(tmp_path)
    sent = asyncio.run(one_request(mux_handler(mux), http_scope(key)))
    start = sent[0]
    assert start["type"] == "http.response.start" and start["status"] == 200
    assert (b"content-type", b"text/event-stream") in start["headers"]
    assert answer_body(sent) == SSE
    assert mux.metrics.request(AGENT, "b", "ok").value == 1
    assert mux.scheduler.served_tokens[AGENT] == 5 + 3  # the canned usage settled the fair queue
    mux.store.close()


def test_a_wrong_key_is_refused_on_the_canned_path_as_on_a_real_one(tmp_path):
    mux, _ = canned_mux(tmp_path)
    sent = asyncio.run(one_request(mux_handler(mux), http_scope("not-a-key")))
    assert sent[0]["status"] == 401
    assert mux.metrics.request(AGENT, "b", "ok").value == 0
    mux.store.close()


def test_the_bare_forward_relays_the_same_bytes(tmp_path):
    mux, key = canned_mux(tmp_path)
    assert answer_body(asyncio.run(one_request(bare_handler(mux.client), http_scope(key)))) == SSE
    mux.store.close()


def test_logic_cost_reports_both_paths_and_their_difference():
    cost = logic_cost(requests=40, passes=2)
    assert isinstance(cost, LogicCost) and (cost.requests, cost.passes) == (40, 2)
    assert cost.mux_us > 0 and cost.bare_us > 0
    assert cost.extra_us == cost.mux_us - cost.bare_us
    assert 0 < cost.bare_opcodes < cost.mux_opcodes < cost.session_opcodes
    assert cost.extra_opcodes == cost.mux_opcodes - cost.bare_opcodes
    assert 0 < cost.token_bare_opcodes < cost.token_mux_opcodes
    assert cost.token_extra_us == cost.token_mux_us - cost.token_bare_us


def test_the_bytecode_count_of_a_request_is_the_same_from_one_count_to_the_next(tmp_path):
    mux, key = canned_mux(tmp_path)
    handler, scope = mux_handler(mux), http_scope(key)
    counts = [asyncio.run(opcodes_per_request(handler, scope, requests=5)) for _ in range(3)]
    assert counts[0] > 0 and len(set(counts)) == 1
    mux.store.close()


def recorded_charges(mux, cycle: CannedCycle) -> list[tuple[float, int]]:
    """Each charge of the fair queue from now on, with how many messages the client had by then;
    the charges still reach the queue."""
    charges, charge = [], mux.scheduler.charge

    def recorded(agent: str, weight: float, tokens: float) -> None:
        charges.append((tokens, len(cycle.sent)))
        charge(agent, weight, tokens)
    mux.scheduler.charge = recorded
    return charges


def test_a_long_stream_is_charged_to_its_agent_as_it_arrives_in_steps_and_in_full(tmp_path):
    mux, key = canned_mux(tmp_path)
    mux.client.chunks = LONG_CHUNKS
    cycle = CannedCycle()
    charges = recorded_charges(mux, cycle)
    asyncio.run(mux_handler(mux)(http_scope(key), cycle.receive, cycle.send))
    assert answer_body(cycle.sent) == b"".join(LONG_CHUNKS)
    steps = [tokens for tokens, _ in charges]
    assert sum(steps) == len(LONG_CHUNKS), "every event charged, the usage's and [DONE] too"
    assert set(steps[:-1]) == {CHARGE_EVENTS} and 0 < steps[-1] <= CHARGE_EVENTS
    sent_at = [sent for _, sent in charges]
    assert sent_at == sorted(sent_at) and sent_at[0] < sent_at[-2], "charged while the answer streams"
    assert mux.scheduler.served_tokens[AGENT] == 5 + 3 + LONG_TOKENS  # the usage settled it
    mux.store.close()


def test_a_backend_that_breaks_right_after_its_first_event_still_delivers_and_charges_it(tmp_path, monkeypatch):
    """Simulated: aiohttp's stream raising the connection's error on the read after the first event."""
    mux, key = canned_mux(tmp_path)
    mux.client.chunks = EVENT_CHUNKS
    reads = []

    def read_nowait(self: CannedStream) -> bytes:
        reads.append(1)
        if len(reads) > 1:
            raise aiohttp.ClientPayloadError("connection lost")
        return self.chunks.pop(0)
    monkeypatch.setattr(CannedStream, "read_nowait", read_nowait)
    cycle = CannedCycle()
    charges = recorded_charges(mux, cycle)
    asyncio.run(mux_handler(mux)(http_scope(key), cycle.receive, cycle.send))
    body = answer_body(cycle.sent)
    assert body.startswith(EVENT_CHUNKS[0]), "the event read before the break reaches the client"
    assert b"failed mid-stream: connection lost" in body and body.endswith(b"data: [DONE]\n\n")
    assert mux.metrics.request(AGENT, "b", "failed_midstream").value == 1
    assert [t for t, _ in charges] == [1], "the delivered event is charged; nothing settles a failed stream"
    mux.store.close()


def test_a_backend_that_ends_its_stream_on_an_unended_usage_line_is_relayed_whole_and_settled(tmp_path):
    """Simulated: the canned stream with no [DONE], its usage event's line left without a newline."""
    mux, key = canned_mux(tmp_path)
    unended = b"".join(EVENT_CHUNKS[:-1]).removesuffix(b"\n\n")
    mux.client.chunks = [unended[:40], unended[40:]]
    cycle = CannedCycle()
    asyncio.run(mux_handler(mux)(http_scope(key), cycle.receive, cycle.send))
    assert answer_body(cycle.sent) == unended
    assert mux.metrics.request(AGENT, "b", "ok").value == 1
    assert mux.scheduler.served_tokens[AGENT] == 5 + 3, "the last line's usage settled the fair queue"
    mux.store.close()
