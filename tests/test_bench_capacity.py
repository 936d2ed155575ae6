"""Capacity search and metric arithmetic on constructed records (no server involved)."""
import pytest

from bench.metrics import RequestRecord, Slo, compute_metrics
from bench.serving import LevelResult, capacity_search, level_from, wilson_interval


def rec(sent, ttft, e2el, tokens, itl=()):
    return RequestRecord(sent_at=sent, prompt_tokens=10, output_tokens=tokens, ttft=ttft, e2el=e2el,
                         itl=list(itl), success=True, finish_reason="stop", ended_at=sent + e2el)


def test_metrics_follow_vllm_definitions():
    records = [rec(0.0, 0.5, 2.5, 5, [0.5] * 4), rec(1.0, 1.0, 3.0, 3, [1.0, 1.0]),
               RequestRecord(sent_at=0.5, error="http 500", ended_at=0.6)]
    m = compute_metrics(records, Slo(e2el_p95_s=2.8))
    assert m.completed == 2 and m.failed == 1
    assert m.duration_s == pytest.approx(4.0)
    assert m.tpot.mean == pytest.approx(((2.5 - 0.5) / 4 + (3.0 - 1.0) / 2) / 2)
    assert m.itl.count == 6 and m.itl.mean == pytest.approx(4.0 / 6)
    assert m.output_throughput == pytest.approx(8 / 4.0)
    assert m.total_token_throughput == pytest.approx(28 / 4.0)
    assert m.goodput == pytest.approx(1 / 4.0)
    assert m.errors == {"http 500": 1}


def fake_level(c, p95_at):
    e2el = [p95_at(c)] * 20
    return level_from([rec(i * 0.1, 0.1, x, 10) for i, x in enumerate(e2el)], c, None, 0, None)


def test_capacity_doubles_then_bisects_to_the_largest_passing_level():
    seen = []

    def measure(c):
        seen.append(c)
        return fake_level(c, lambda c: 0.5 * c)   # P95 = c/2 s, so c <= 12 meets a 6 s SLO

    result = capacity_search(measure, 6.0, {"name": "synthetic"}, limit=64)
    assert result.max_concurrency_meeting_slo == 12
    assert seen == [1, 2, 4, 8, 16, 12, 14, 13]
    assert [lv.passed for lv in result.levels] == [True, True, True, True, False, True, False, False]


def test_capacity_zero_when_even_one_agent_misses_and_limit_when_all_pass():
    assert capacity_search(lambda c: fake_level(c, lambda c: 9.0), 6.0, {}).max_concurrency_meeting_slo == 0
    r = capacity_search(lambda c: fake_level(c, lambda c: 1.0), 6.0, {}, limit=10)
    assert r.max_concurrency_meeting_slo == 10


def test_failures_fail_a_level_even_when_fast():
    records = [rec(0, 0.1, 0.2, 5)] * 19 + [RequestRecord(sent_at=0, error="timeout", ended_at=1)]
    level = LevelResult(4, None, 20, 0, compute_metrics(records), [0.2] * 19)
    result = capacity_search(lambda c: level, 6.0, {}, limit=4)
    assert result.max_concurrency_meeting_slo == 0
    assert "1 of 20 requests failed" in result.levels[0].reason


def test_wilson_interval():
    lo, hi = wilson_interval(19, 20)
    assert lo == pytest.approx(0.7639, abs=1e-3) and hi == pytest.approx(0.9911, abs=1e-3)
