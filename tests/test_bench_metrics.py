"""Serving metrics on recorded SSE streams, checked against values worked out by hand from the
arrival times written in each fixture (`: t=SECONDS` before each event)."""
import asyncio
import http.server
import threading
from pathlib import Path

import pytest

from bench import runner
from bench.loadgen import Endpoint, StreamProgress, closed_loop, observe_line
from bench.metrics import RequestRecord, Slo, compute_metrics
from bench.serving import level_from
from bench.workloads import for_round, make_workload

SSE = Path(__file__).parent / "fixtures" / "sse"
SENT_AT = 100.0


def replay(name: str) -> RequestRecord:
    """Feed a recorded stream, line by line, to the load generator's parser at its recorded times."""
    rec = RequestRecord(sent_at=SENT_AT)
    progress = StreamProgress(SENT_AT, [])
    at = SENT_AT
    for line in (SSE / name).read_bytes().splitlines(keepends=True):
        if line.startswith(b": t="):
            at = SENT_AT + float(line[4:])
        observe_line(rec, progress, line, at)
    rec.e2el = progress.last_token_at - SENT_AT
    rec.success, rec.ended_at = True, at
    return rec


def test_ttft_counts_vllms_role_only_first_chunk_and_itl_every_later_chunk():
    rec = replay("vllm_chat_stream.sse")
    assert rec.ttft == pytest.approx(0.250)
    assert rec.itl == pytest.approx([0.050, 0.050, 0.070, 0.080])
    assert rec.e2el == pytest.approx(0.500)
    assert rec.output_tokens == 4 and rec.prompt_tokens == 12 and rec.finish_reason == "length"
    assert rec.tpot == pytest.approx((0.500 - 0.250) / 3)


def test_a_one_token_answer_has_no_tpot_and_meets_any_tpot_bound_in_goodput():
    one = replay("vllm_one_token.sse")
    assert one.ttft == pytest.approx(0.180) and one.itl == pytest.approx([0.060])
    assert one.output_tokens == 1 and one.tpot is None
    m = compute_metrics([one], Slo(tpot_s=0.001))
    assert m.tpot is None
    assert m.goodput == pytest.approx(1 / (one.ended_at - SENT_AT))


def test_goodput_counts_successful_requests_within_every_bound():
    fast, one = replay("vllm_chat_stream.sse"), replay("vllm_one_token.sse")
    failed = RequestRecord(sent_at=SENT_AT, error="http 500", ended_at=SENT_AT + 0.1)
    m = compute_metrics([fast, one, failed], Slo(e2el_p95_s=0.45, ttft_s=0.3, tpot_s=0.1))
    assert m.goodput == pytest.approx(1 / m.duration_s)   # only the one-token answer is within 0.45 s
    assert m.completed == 2 and m.failed == 1


def test_llama_server_stream_is_timed_from_its_role_chunk_to_its_finish_chunk():
    # Recorded from llama-server on a busy 2-core VM, max_tokens 4: the role chunk and the first
    # token arrive together, the finish chunk (empty delta) with the last token, then usage alone.
    rec = replay("llama_server_smollm2.sse")
    assert rec.ttft == pytest.approx(6.1390)
    assert rec.itl == pytest.approx([0.0, 6.5791 - 6.1390, 7.1550 - 6.5791, 8.0310 - 7.1550, 0.0])
    assert rec.e2el == pytest.approx(8.0310)
    assert rec.output_tokens == 4 and rec.prompt_tokens == 34 and rec.finish_reason == "length"
    assert rec.tpot == pytest.approx((8.0310 - 6.1390) / 3)


class ReplayHandler(http.server.BaseHTTPRequestHandler):
    fixture = "vllm_chat_stream.sse"

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write((SSE / self.fixture).read_bytes())


def test_the_load_generator_reads_a_served_recording_as_the_replay_does():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ReplayHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        ep = Endpoint(f"http://127.0.0.1:{srv.server_address[1]}", "m")
        records = asyncio.run(closed_loop(ep, make_workload("synthetic", max_tokens=4), 1, 2))
    finally:
        srv.shutdown()
        srv.server_close()
    assert all(r.success for r in records)
    assert [len(r.itl) for r in records] == [4, 4]
    assert all(r.output_tokens == 4 and r.ttft is not None for r in records)


@pytest.mark.parametrize("name", ["synthetic", "agents"])
def test_each_round_of_a_run_asks_prompts_of_its_own_and_a_round_asks_the_same_ones_again(name):
    def first_prompts(workload) -> list[str]:
        return [workload.session(i).next_request().messages[-1]["content"] for i in range(8)]

    base = make_workload(name, max_tokens=16)
    rounds = [first_prompts(for_round(base, r)) for r in range(3)]
    assert rounds[0] != rounds[1] != rounds[2]
    assert first_prompts(for_round(base, 1)) == rounds[1]
    assert for_round(base, 2).describe() == base.describe()


def test_a_sweep_gives_every_level_a_round_of_its_own(monkeypatch):
    seen = []

    def level(progress, label, ep, workload, concurrency, *rest, **kw):
        seen.append(workload.round_index)
        return level_from([], concurrency, None, 0, None)

    monkeypatch.setattr(runner, "measured_level", level)
    runner.sweep(Endpoint("http://127.0.0.1:1", "m"), "agents", [1, 2, 4], 16, Slo(),
                 runner.Console(quiet=True), stop_when_saturated=False)
    assert seen == [0, 1, 2]
