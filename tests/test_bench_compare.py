"""bench.compare tells noise from change: seeded synthetic runs with the noise measured on the 2-core
VM, the false alarms reported between two identical runs, planted changes, older baselines."""
import dataclasses
import json

import numpy as np
import pytest
from rich.console import Console
from rich.table import Table

from bench.benchmarks.noise import NOISE_BUSY_2CORE_VM, NOISE_QUIET_HOST, Spread, synthetic_baseline, wrap
from bench.compare import compare, comparison_table, regressions, table_title
from bench.net import NetResult
from bench.report import Micro, load_baseline, write_baseline
from bench.serving import CapacityResult
from bench.storage import IoResult, StorageResult
from bench.stream import StreamResult
from dgxready.errors import DgxReadyError


def verdicts(rows):
    return {row.metric: row.verdict for row in rows}


SAME_DISTRIBUTION = dataclasses.replace(
    NOISE_BUSY_2CORE_VM, stream=Spread(0.0, 0.30), storage=Spread(0.0, 0.33), net_gbps=Spread(0.0, 0.40),
    latency=Spread(0.0, 0.20))


@pytest.mark.parametrize("seed", range(5))
def test_two_runs_drawn_from_the_same_distribution_are_not_flagged(seed):
    rng = np.random.default_rng(seed)
    before, after = synthetic_baseline(rng, SAME_DISTRIBUTION), synthetic_baseline(rng, SAME_DISTRIBUTION)
    assert regressions(compare(before, after)) == []


def test_a_planted_30_percent_change_is_flagged_in_most_quiet_host_comparisons():
    # 20 seeded pairs without a capacity search (its rounds would shift every later draw); the
    # same rates at 100 pairs are in bench/benchmarks/compare_false_alarms.py's docstring.
    families = {"stream": lambda m: m.startswith("stream "), "storage": lambda m: m.startswith("storage "),
                "E2EL": lambda m: "E2EL" in m}
    detected = dict.fromkeys(families, 0)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        before = synthetic_baseline(rng, NOISE_QUIET_HOST, with_capacity=False)
        after = synthetic_baseline(rng, NOISE_QUIET_HOST, 0.3, with_capacity=False)
        rows = verdicts(compare(before, after, run_spread=NOISE_QUIET_HOST.latency.run))
        regressed = [metric for metric, verdict in rows.items() if verdict == "regressed"]
        for family, member in families.items():
            detected[family] += any(member(m) for m in regressed)
        assert rows["serve c=16 output tok/s"] == "inconclusive"   # a lone figure cannot tell
    assert detected["stream"] == 20 and detected["storage"] >= 18 and detected["E2EL"] >= 14, detected


def test_a_planted_30_percent_change_in_host_figures_is_not_called_on_a_host_as_noisy_as_the_busy_vm():
    rng = np.random.default_rng(12)
    rows = verdicts(compare(synthetic_baseline(rng), synthetic_baseline(rng, worse_by=0.3)))
    assert {rows[f"stream {op} GB/s"] for op in ("copy", "scale", "add", "triad")} <= {"inconclusive",
                                                                                     "unchanged"}


def stream(copy_reps):
    return StreamResult(64 << 20, 2, len(copy_reps), {"copy": max(copy_reps)}, None, {"copy": copy_reps})


def capacity(point, low, high):
    return CapacityResult(6.0, {"name": "agents"}, point, [], 32, low, high, 0.9)


def test_the_changes_seen_between_two_identical_runs_are_inconclusive_not_regressions():
    # As reported: capacity 4 then 3, STREAM copy best -10.8%, loopback RTT +288%.
    before = wrap(Micro(stream=stream([14.0, 13.1, 12.2, 13.5, 12.9, 11.8, 13.3, 12.5, 12.0, 13.0]),
                        network=[NetResult("127.0.0.1:1", 11, 12.0, 80, 2,
                                           [11.0] * 10, [8, 12, 12, 61, 12, 8, 12, 65, 12, 12])]),
                  capacity=capacity(4, 3, 4))
    after = wrap(Micro(stream=stream([12.1, 12.4, 11.9, 13.0, 12.6, 12.2, 11.7, 12.9, 12.3, 12.8]),
                       network=[NetResult("127.0.0.1:1", 11, 46.5, 80, 2,
                                          [11.0] * 10, [62, 12, 66, 8, 60, 12, 64, 12, 63, 31])]),
                 capacity=capacity(3, 3, 4))
    rows = compare(before, after)
    assert verdicts(rows) == {"stream copy GB/s": "unchanged", "net 127.0.0.1 Gbit/s": "unchanged",
                              "net 127.0.0.1 RTT p50 us": "inconclusive",
                              "capacity (agents within SLO)": "inconclusive"}
    assert regressions(rows) == []


def storage(qd16_windows):
    job = IoResult("rand_read_4k_qd16", 4096, 16, "direct", 1.0, float(np.mean(qd16_windows)), 1, 1, 3.0,
                   qd16_windows)
    return StorageResult("/store", 1 << 30, "direct", [job])


def test_a_late_start_or_a_ttft_13_percent_slower_is_not_called_a_change():
    # Real QD16 windows: forked readers starting late, then a run where they start together.
    late = storage([0, 37, 1677, 53657, 61370, 59457, 58817, 51397, 55053, 56497])
    prompt = storage([57351, 55980, 55543, 29199, 58967, 59302, 56722, 59678, 66505, 68212])
    rng = np.random.default_rng(4)
    before = synthetic_baseline(rng, SAME_DISTRIBUTION, with_capacity=False)
    after = before.model_copy(deep=True, update={"micro": Micro(storage=prompt)})
    for lv in after.serving.levels:
        lv.ttft_samples = [x * 1.13 for x in lv.ttft_samples]
    rows = verdicts(compare(before.model_copy(update={"micro": Micro(storage=late)}), after))
    assert rows["storage rand_read_4k_qd16 IOPS"] == "unchanged"
    assert {v for m, v in rows.items() if " TTFT " in m} <= {"unchanged", "inconclusive"}


def test_capacity_ranges_that_do_not_overlap_are_a_change():
    rows = compare(wrap(capacity=capacity(12, 10, 12)), wrap(capacity=capacity(6, 5, 7)))
    assert verdicts(rows) == {"capacity (agents within SLO)": "regressed"}
    same = compare(wrap(capacity=capacity(4, 4, 4)), wrap(capacity=capacity(4, 3, 4)))
    assert verdicts(same) == {"capacity (agents within SLO)": "unchanged"}


def without_samples(b):
    """The same figures as a baseline written before samples were kept (schema version 1)."""
    s = b.micro.stream
    return wrap(Micro(stream=dataclasses.replace(s, gbps_samples=None)),
                capacity=dataclasses.replace(b.capacity, capacity_low=None, capacity_high=None))


def test_lone_figures_beyond_the_threshold_are_inconclusive_and_never_fail_the_comparison():
    rng = np.random.default_rng(5)
    before, after = synthetic_baseline(rng, NOISE_QUIET_HOST), synthetic_baseline(rng, NOISE_QUIET_HOST, 0.4)
    rows = verdicts(compare(without_samples(before), without_samples(after)))
    assert all(rows[f"stream {op} GB/s"] == "inconclusive" for op in ("copy", "scale", "add", "triad"))
    assert set(rows.values()) <= {"inconclusive", "unchanged"}


def test_a_version_1_baseline_still_loads_and_compares(tmp_path):
    rng = np.random.default_rng(6)
    path = write_baseline(synthetic_baseline(rng, with_capacity=False), tmp_path)
    doc = json.loads(path.read_text())
    doc["schema"] = "dgxready-bench-baseline/1"
    del doc["micro"]["stream"]["gbps_samples"], doc["micro"]["engine"]
    for net in doc["micro"]["network"]:
        del net["throughput_samples_gbps"], net["rtt_p50_samples_us"]
    for job in doc["micro"]["storage"]["jobs"]:
        del job["iops_samples"]
    for lv in doc["serving"]["levels"]:
        del lv["tpot_samples"], lv["output_token_samples"]
    old = tmp_path / "v1.json"
    old.write_text(json.dumps(doc))
    rows = verdicts(compare(load_baseline(old), load_baseline(path)))
    assert rows["stream copy GB/s"] == "unchanged" and rows["serve c=1 E2EL p50 s"] == "unchanged"


def test_a_version_2_baseline_without_output_token_samples_still_loads_and_compares(tmp_path):
    rng = np.random.default_rng(6)
    path = write_baseline(synthetic_baseline(rng, with_capacity=False), tmp_path)
    doc = json.loads(path.read_text())
    doc["schema"] = "dgxready-bench-baseline/2"
    del doc["micro"]["engine"]
    for lv in doc["serving"]["levels"]:
        del lv["output_token_samples"]
    old = tmp_path / "v2.json"
    old.write_text(json.dumps(doc))
    loaded = load_baseline(old)
    assert all(lv.output_token_samples is None for lv in loaded.serving.levels)
    assert verdicts(compare(loaded, load_baseline(path)))["serve c=1 E2EL p50 s"] == "unchanged"
    doc["serving"]["levels"][0]["output_token_samples"] = [5]
    old.write_text(json.dumps(doc))
    with pytest.raises(DgxReadyError, match=r"v2.json: \$.serving"):
        load_baseline(old)


def test_the_table_gives_every_metric_a_verdict():
    rng = np.random.default_rng(8)
    rows = compare(synthetic_baseline(rng), synthetic_baseline(rng, worse_by=0.3))
    console = Console(record=True, width=250)
    console.print(comparison_table(rows, Table(title=table_title("a", "b", 0.1))))
    text = console.export_text()
    assert all(row.metric in text for row in rows)
    assert text.count("regressed") >= len(regressions(rows)) > 0 and "inconclusive" in text
