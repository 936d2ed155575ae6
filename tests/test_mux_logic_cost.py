"""The logic-cost benchmark's harness: its canned transports drive the multiplexer's real chat path
(simulated: the backend's HTTP client and the client's ASGI connection), which relays the canned
stream byte for byte and accounts for it as it would a real one."""
import asyncio

from agents.benchmarks.logic_cost import (
    AGENT,
    SSE,
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


def test_the_bytecode_count_of_a_request_is_the_same_from_one_count_to_the_next(tmp_path):
    mux, key = canned_mux(tmp_path)
    handler, scope = mux_handler(mux), http_scope(key)
    counts = [asyncio.run(opcodes_per_request(handler, scope, requests=5)) for _ in range(3)]
    assert counts[0] > 0 and len(set(counts)) == 1
    mux.store.close()
