"""The chat path's shortcuts give what the long way gives: a key remembered by its raw header only
in its canonical form, a one-message body taken as it came within the same limit, messages checked
by a fast pass and else named as before, and a session stream's text read by one regex where every
content is a delta's head, else by parsing every event."""
import asyncio
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.asgi import ApiError, read_body
from agents.benchmarks.logic_cost import AGENT, canned_mux, http_scope, mux_handler, one_request
from agents.messages import valid_messages
from agents.proxy import delta_texts

LIMIT = 64


@pytest.fixture
def mux(tmp_path):
    mux, key = canned_mux(tmp_path)
    mux.bench_key = key
    yield mux
    mux.store.close()


@given(pad=st.lists(st.sampled_from([" ", "\t"]), min_size=1, max_size=4).map("".join),
       scheme=st.sampled_from(["Bearer", "bearer", "BEARER"]))
def test_a_padded_or_recased_key_authenticates_but_only_the_canonical_header_is_remembered(tmp_path_factory,
                                                                                          pad, scheme):
    mux, key = canned_mux(tmp_path_factory.mktemp("mux"))
    try:
        for header in (f"{scheme} {pad}{key}", f"{scheme} {key}{pad}", f"{scheme} {key}"):
            ident, _ = mux.identify_header(header.encode())
            assert ident.name == AGENT
        canonical = f"Bearer {key}".encode()
        assert set(mux.known_headers) <= {canonical}
        assert mux.identify_header(canonical)[0].name == AGENT
        assert set(mux.known_headers) == {canonical}
    finally:
        mux.store.close()


def test_an_unknown_key_is_refused_and_not_remembered(mux):
    for header in (b"Bearer not-a-key", b"", b"Basic " + mux.bench_key.encode()):
        with pytest.raises(ApiError) as refused:
            mux.identify_header(header)
        assert refused.value.status == 401
    assert mux.known_headers == {}


def receiving(*messages: dict):
    queue = list(messages)

    async def receive() -> dict:
        return queue.pop(0)
    return receive


def body_of(*messages: dict, declared: bytes | None = None) -> bytes:
    return asyncio.run(read_body(receiving(*messages), declared, LIMIT))


def part(body: bytes, more: bool = False) -> dict:
    return {"type": "http.request", "body": body, "more_body": more}


def test_a_body_in_one_message_is_taken_as_it_came_and_parts_are_joined():
    assert body_of(part(b"x" * LIMIT)) == b"x" * LIMIT
    assert body_of(part(b"ab", more=True), part(b"cd", more=True), part(b"e")) == b"abcde"
    assert body_of({"type": "http.request"}) == b""


@pytest.mark.parametrize("messages", [
    [part(b"x" * (LIMIT + 1))],
    [part(b"x" * LIMIT, more=True), part(b"y")],
])
def test_a_body_over_the_limit_is_refused_whether_it_came_in_one_message_or_several(messages):
    with pytest.raises(ApiError) as refused:
        body_of(*messages)
    assert refused.value.status == 413


def test_a_body_declared_over_the_limit_is_refused_before_it_is_read():
    with pytest.raises(ApiError) as refused:
        body_of(declared=str(LIMIT + 1).encode())
    assert refused.value.status == 413


def test_a_client_gone_while_sending_its_body_is_refused():
    with pytest.raises(ApiError) as refused:
        body_of(part(b"ab", more=True), {"type": "http.disconnect"})
    assert refused.value.status == 400


@pytest.mark.parametrize(("messages", "named"), [
    ([{"role": "user", "content": "ok"}, {"role": "bogus", "content": "x"}], "messages[1].role"),
    ([{"role": "user", "content": "ok"}, "not an object"], "messages[1].role"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "system", "content": "ok"}, {"role": "user", "content": [{"text": "no type"}]}],
     "messages[1].content"),
])
def test_a_message_the_fast_pass_does_not_know_is_checked_and_named(messages, named):
    with pytest.raises(ApiError) as refused:
        valid_messages({"messages": messages})
    assert refused.value.status == 400 and named in refused.value.message


def test_messages_the_fast_pass_does_not_know_may_still_be_valid():
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]
    assert valid_messages({"messages": messages}) is messages


def parsed_texts(whole: bytes) -> list[str]:
    """The long way: every data line parsed, the first choice's delta content kept."""
    texts = []
    for line in whole.split(b"\n"):
        choices = json.loads(line[6:])["choices"] if line.startswith(b"data: {") else []
        content = choices[0]["delta"].get("content") if choices else None
        if isinstance(content, str):
            texts.append(content)
    return texts


def event(delta: dict, compact: bool) -> bytes:
    chunk = {"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    text = json.dumps(chunk, separators=(",", ":") if compact else None, ensure_ascii=compact)
    return f"data: {text}\n\n".encode()


@given(contents=st.lists(st.text(), min_size=1, max_size=8), compact=st.booleans(), with_role=st.booleans())
def test_a_streams_text_read_by_one_regex_is_what_parsing_every_event_reads(contents, compact, with_role):
    first = {"role": "assistant", "content": contents[0]} if with_role else {"content": contents[0]}
    whole = event(first, compact) + b"".join(event({"content": c}, compact) for c in contents[1:]) + \
        b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\ndata: [DONE]\n\n'
    assert delta_texts(whole) == parsed_texts(whole) == contents


@pytest.mark.parametrize("odd", [
    {"content": None},
    {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{\"content\": \"no\"}"}}],
     "content": "after the calls"},
    {"refusal": None, "content": "after another key"},
])
def test_a_content_that_is_not_a_string_at_a_deltas_head_sends_the_stream_the_long_way(odd):
    whole = event({"content": "a"}, True) + event(odd, True) + event({"content": "b"}, False)
    assert delta_texts(whole) == parsed_texts(whole)


@pytest.mark.parametrize(("value", "status"), [(b"", 200), (b"30", 200), (b"0", 400), (b"soon", 400)])
def test_an_empty_deadline_header_takes_the_default_and_a_bad_one_is_refused(mux, value, status):
    scope = http_scope(mux.bench_key)
    scope["headers"].append((b"x-deadline-s", value))
    assert asyncio.run(one_request(mux_handler(mux), scope))[0]["status"] == status


def test_both_ways_keep_every_choices_content_in_order():
    at_head = b'data: {"choices":[{"delta":{"content":"a"}},{"delta":{"content":"b"}}]}\n\n'
    long_way = b'data: {"choices":[{"delta":{"content":"a"}},{"delta":{"refusal":null,"content":"b"}}]}\n\n'
    assert delta_texts(at_head) == delta_texts(long_way) == ["a", "b"]
