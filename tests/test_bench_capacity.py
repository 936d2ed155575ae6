"""Capacity search and its range, on deterministic fake levels (no server involved)."""
import numpy as np
import pytest

from bench.metrics import RequestRecord, compute_metrics
from bench.serving import (
    CapacityLevel,
    LevelResult,
    PooledLevel,
    binomial_cdf,
    capacity_bounds,
    capacity_search,
    decidable,
    judge,
    level_from,
    level_verdict,
    misses_early,
    records_until,
    wilson_interval,
)


def rec(sent, ttft, e2el, tokens, itl=()):
    return RequestRecord(sent_at=sent, prompt_tokens=10, output_tokens=tokens, ttft=ttft, e2el=e2el,
                         itl=list(itl), success=True, finish_reason="stop", ended_at=sent + e2el)


def test_metrics_follow_vllm_definitions():
    records = [rec(0.0, 0.5, 2.5, 5, [0.5] * 4), rec(1.0, 1.0, 3.0, 3, [1.0, 1.0]),
               RequestRecord(sent_at=0.5, error="http 500", ended_at=0.6)]
    m = compute_metrics(records)
    assert m.completed == 2 and m.failed == 1
    assert m.duration_s == pytest.approx(4.0)
    assert m.tpot.mean == pytest.approx(((2.5 - 0.5) / 4 + (3.0 - 1.0) / 2) / 2)
    assert m.itl.count == 6 and m.itl.mean == pytest.approx(4.0 / 6)
    assert m.output_throughput == pytest.approx(8 / 4.0)
    assert m.total_token_throughput == pytest.approx(28 / 4.0)
    assert m.errors == {"http 500": 1}


def level_of(c, e2el, stop=None):
    records = [rec(i * 0.1, 0.1, x, 10) for i, x in enumerate(e2el)]
    return level_from(records_until(records, stop), c, None, 0, None)


def steady(p95_at, n=16):
    """A fake runner whose every round at concurrency c has the same, tight latencies."""
    return lambda plan: level_of(plan.concurrency, [p95_at(plan.concurrency)] * n, plan.stop)


class RoundRunner:
    """A fake runner whose latencies at each level are a fixed spread, drawn anew (seeded) every
    round, as a real level's are; it remembers the levels it was asked for."""

    def __init__(self, median_at, spread=0.15, n=16):
        self.median_at, self.spread, self.n = median_at, spread, n
        self.rng = np.random.default_rng(7)
        self.asked = []
        self.plans = []

    def __call__(self, plan):
        c = plan.concurrency
        self.asked.append(c)
        self.plans.append(plan)
        e2el = self.median_at(c) * np.exp(self.rng.normal(0, self.spread, self.n))
        return level_of(c, e2el.tolist(), plan.stop)


def test_capacity_doubles_bisects_then_settles_the_undecided_boundary_level():
    seen = []

    def measure(plan):
        seen.append(plan.concurrency)
        return steady(lambda c: 0.5 * c)(plan)   # P95 = c/2 s, so c <= 12 meets a 6 s SLO

    result = capacity_search(measure, 6.0, {"name": "synthetic"}, limit=64)
    assert result.max_concurrency_meeting_slo == 12
    # 16 requests all within the SLO cannot show it is met, 64 can; 13 misses at once.
    assert seen == [1, 2, 4, 8, 16, 12, 14, 13, 12, 12, 12]
    assert {lv.concurrency: (lv.rounds, lv.verdict) for lv in result.levels}[12] == (4, "meets")
    assert (result.capacity_low, result.capacity_high) == (12, 12)
    assert result.range_text == "12"


def test_capacity_zero_when_even_one_agent_misses_and_limit_when_all_pass():
    none = capacity_search(steady(lambda c: 9.0), 6.0, {})
    assert (none.max_concurrency_meeting_slo, none.capacity_low, none.capacity_high) == (0, 0, 0)
    every = capacity_search(steady(lambda c: 1.0), 6.0, {}, limit=10)
    assert (every.max_concurrency_meeting_slo, every.capacity_low, every.capacity_high) == (10, 10, 10)


def test_a_level_whose_p95_interval_straddles_the_slo_makes_the_answer_a_range():
    # The P95 at c=4 sits at the SLO: its rounds fall either side of it, as in the 4-then-3 runs.
    runner = RoundRunner(lambda c: {1: 1.5, 2: 2.6, 3: 3.6, 4: 4.7}.get(c, 4.7 + 2.0 * (c - 4)))
    result = capacity_search(runner, 6.0, {"name": "agents"}, limit=16)
    verdicts = {lv.concurrency: lv.verdict for lv in result.levels}
    assert verdicts[3] == "meets" and verdicts[4] == "undecided"
    assert result.capacity_low == 3 and result.capacity_high >= 4
    assert result.capacity_low <= result.max_concurrency_meeting_slo <= result.capacity_high
    assert result.range_text == f"3\u2013{result.capacity_high}"


def test_the_range_runs_from_the_largest_level_that_meets_to_the_last_before_one_that_misses():
    def level(c, verdict):
        return CapacityLevel(c, 64, 0, 1.0, 1.0, 1.0, 0.1, 10.0, 1.0, (0.9, 1.0), verdict != "misses", "",
                             (0.95, 1.0), verdict, 2)

    judged = {c: level(c, v) for c, v in
              {1: "undecided", 2: "meets", 4: "undecided", 3: "meets", 5: "undecided", 6: "misses",
               8: "undecided"}.items()}
    assert capacity_bounds(judged, point=4) == (3, 5)
    assert capacity_bounds({1: level(1, "misses")}, point=0) == (0, 0)


def test_a_level_meets_misses_or_is_undecided_by_the_interval_of_its_attainment():
    assert level_verdict(0, (0.95, 1.0)) == "meets"
    assert level_verdict(0, (0.90, 0.99)) == "undecided"
    assert level_verdict(0, (0.70, 0.94)) == "misses"
    assert level_verdict(1, (0.95, 1.0)) == "misses"


def test_52_requests_all_within_the_slo_are_the_fewest_that_meet_it_with_confidence():
    assert judge(level_of(4, [1.0] * 52), 6.0).verdict == "meets"
    assert judge(level_of(4, [1.0] * 51), 6.0).verdict == "undecided"
    assert judge(level_of(4, [1.0] * 63 + [7.0]), 6.0).verdict == "undecided"
    assert judge(level_of(4, [7.0] * 8), 6.0).verdict == "misses"


def test_failures_fail_a_level_even_when_fast():
    records = [rec(0, 0.1, 0.2, 5)] * 19 + [RequestRecord(sent_at=0, error="timeout", ended_at=1)]
    level = LevelResult(4, None, 20, 0, compute_metrics(records), [0.2] * 19)
    result = capacity_search(lambda plan: level, 6.0, {}, limit=4)
    assert result.max_concurrency_meeting_slo == 0 and result.capacity_high == 0
    assert result.levels[0].reason == "1 of 20 requests failed" and result.levels[0].rounds == 1
    assert result.levels[0].verdict == "misses"


def test_a_level_measured_again_is_judged_on_all_its_rounds():
    runner = RoundRunner(lambda c: 3.0, spread=0.1, n=16)
    result = capacity_search(runner, 6.0, {}, start=4, limit=4)
    assert runner.asked == [4, 4, 4, 4]
    assert result.levels[0].num_requests == 64 and result.levels[0].rounds == 4


def test_a_capacity_level_keeps_each_request_s_e2el_and_ttft_round_after_round():
    rounds = (level_of(2, [1.0, 2.0, 3.0]), level_of(2, [4.0, 5.0]))
    level = judge(PooledLevel(2, rounds), 6.0)
    assert level.e2el_samples == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert level.ttft_samples == [0.1] * 5 and level.num_requests == 5


def test_wilson_interval():
    lo, hi = wilson_interval(19, 20)
    assert lo == pytest.approx(0.7639, abs=1e-3) and hi == pytest.approx(0.9911, abs=1e-3)


def test_a_round_at_a_level_far_beyond_the_slo_stops_after_two_requests():
    result = capacity_search(steady(lambda c: 9.0), 6.0, {})
    level = result.levels[0]
    assert (level.concurrency, level.num_requests, level.verdict) == (1, 2, "misses")


def test_a_level_within_the_slo_is_never_stopped_early():
    runner = RoundRunner(lambda c: 3.0, spread=0.1, n=16)
    capacity_search(runner, 6.0, {}, start=4, limit=4)
    assert [len(records_until([rec(0, 0.1, 3.0, 1)] * 16, p.stop)) for p in runner.plans] == [16] * 4


def test_a_failed_request_stops_its_round_at_once():
    stop = misses_early(PooledLevel(2, ()), 6.0)
    failed = RequestRecord(sent_at=0, error="http 500", ended_at=1)
    assert len(records_until([rec(0, 0.1, 1.0, 5), failed] + [rec(0, 0.1, 1.0, 5)] * 10, stop)) == 2


def test_the_early_stop_rarely_calls_a_level_that_just_meets_the_slo_a_miss():
    # True attainment exactly at the SLO's 95%: the looks after every request of a 13-request
    # round stop it as a miss in at most a few percent of rounds (one look at 1% each).
    rng = np.random.default_rng(3)
    stop = misses_early(PooledLevel(1, ()), 6.0)
    rounds = [[rec(0, 0.1, 1.0 if rng.random() < 0.95 else 9.0, 5) for _ in range(13)] for _ in range(2000)]
    stopped = sum(len(records_until(r, stop)) < 13 for r in rounds) / len(rounds)
    assert stopped < 0.03


def test_the_early_stop_counts_the_levels_earlier_rounds():
    slow = level_of(2, [9.0] * 3)
    stop = misses_early(PooledLevel(2, (slow,)), 6.0)
    assert stop([rec(0, 0.1, 1.0, 5)])   # 1 of 4 within the SLO: a miss, judged on both rounds
    assert not misses_early(PooledLevel(2, ()), 6.0)([rec(0, 0.1, 1.0, 5)])


def test_a_round_right_after_one_at_the_same_level_skips_the_warm_up():
    runner = RoundRunner(lambda c: {1: 1.0, 2: 6.0}.get(c, 20.0), spread=0.2, n=13)
    capacity_search(runner, 6.0, {}, limit=8)
    plans = [(p.concurrency, p.warm_up) for p in runner.plans]
    assert plans[0] == (1, True)
    assert all(warm == (i == 0 or plans[i - 1][0] != c) for i, (c, warm) in enumerate(plans))
    assert any(not warm for _, warm in plans)


def test_binomial_cdf():
    assert binomial_cdf(0, 2, 0.95) == pytest.approx(0.0025)
    assert binomial_cdf(1, 3, 0.95) == pytest.approx(0.05 ** 3 + 3 * 0.95 * 0.05 ** 2)
    assert binomial_cdf(5, 5, 0.3) == pytest.approx(1.0)


def test_a_level_sitting_at_the_slo_is_not_measured_again_once_52_requests_could_not_decide_it():
    # Round 1 all within; round 2 has two beyond the SLO: 50 of 52 could no longer meet it, and
    # at 92% the rest would not miss it either.
    rounds = iter([[1.0] * 13, [1.0] * 11 + [7.0] * 2, [1.0] * 13, [1.0] * 13])
    asked = []

    def measure(plan):
        asked.append(plan.concurrency)
        return level_of(plan.concurrency, next(rounds) if plan.concurrency == 2 else [1.0] * 13, plan.stop)

    result = capacity_search(measure, 6.0, {}, start=2, limit=2)
    assert asked.count(2) == 2
    level = next(lv for lv in result.levels if lv.concurrency == 2)
    assert (level.num_requests, level.verdict) == (26, "undecided")


def test_a_level_that_could_still_meet_or_miss_the_slo_is_decidable():
    all_within = judge(level_of(1, [1.0] * 13), 6.0)
    assert decidable(all_within, 52)
    mostly_beyond = judge(level_of(1, [1.0] * 10 + [7.0] * 3), 6.0)
    assert decidable(mostly_beyond, 52)
    at_the_slo = judge(level_of(1, [1.0] * 24 + [7.0] * 2), 6.0)
    assert not decidable(at_the_slo, 52)
