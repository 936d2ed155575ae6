"""What bench.all shows: the SLO verdict, the summary outside a terminal, the plots, and a short
real run piped through a log (order of parts, no 30 s silence, a recorded llama.cpp build)."""
from __future__ import annotations

import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from invoke.exceptions import Exit
from rich.console import Console

from bench import plots
from bench.metrics import RequestRecord
from bench.report import load_baseline
from bench.serving import CapacityResult, LevelResult, judge, level_from
from bench.summary import level_line, print_verdict
from bench.tasks import check_verdict_options, check_workloads
from bench.verdict import judge_target
from dgxready.settings import REPO_ROOT

SYNTHETIC = {"name": "synthetic", "seed": 0, "input_words": [64, 256], "output_tokens": [96, 128]}
AGENTS = {"name": "agents", "seed": 0, "max_tokens": 128}
RUN = plots.RunLabel("benchbox", "smollm2-135m", "2025-01-02T03:04:05Z")


def fake_level(concurrency: int, e2el_s: float) -> LevelResult:
    records = [RequestRecord(sent_at=i * 0.1, prompt_tokens=100, output_tokens=50, ttft=e2el_s / 10,
                             e2el=e2el_s * (1 + i / 40), itl=[0.01] * 40 + [0.5], success=True,
                             finish_reason="length", ended_at=i * 0.1 + e2el_s) for i in range(20)]
    return level_from(records, concurrency, None, 2, None)


def fake_capacity(passing_up_to: int, tested: tuple[int, ...],
                  bounds: tuple[int | None, int | None] = (None, None)) -> CapacityResult:
    levels = [judge(fake_level(c, 6.0 * c / (passing_up_to + 0.5)), 6.0) for c in tested]
    return CapacityResult(6.0, AGENTS, passing_up_to, levels, 32, *bounds, 0.9 if bounds[0] else None)


def plain_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=1000, soft_wrap=True), buffer


def test_a_capacity_below_the_target_is_told_as_not_met_with_the_levers_to_pull():
    verdict = judge_target(fake_capacity(4, (1, 2, 4, 8, 6, 5)), target_agents=10)
    out, buffer = plain_console()
    print_verdict(verdict, out, Path("bench/baselines/vm/20261122T064752Z.json"))
    text = buffer.getvalue()
    assert not verdict.met and verdict.exit_code == 1
    run = "bench/baselines/vm/20261122T064752Z.json"
    own_question = "--workload agents --agents 10 --slo-p95-e2e 6 --max-tokens 128`"
    assert f"bench.predict --profile measured --baseline {run} {own_question}" in text
    assert "The 10-agent SLO is not met on this host: only 4 concurrent agents meet P95 E2EL <= 6 s" in text
    assert "agents workload, max_tokens 128" in text
    assert "runbooks/serving.md" in text and "model.plan" in text and "quantiz" in text


def test_a_host_where_no_level_meets_the_slo_says_not_even_one_agent_does():
    verdict = judge_target(fake_capacity(0, (1,)), target_agents=10)
    assert verdict.headline == ("The 10-agent SLO is not met on this host: not even one agent meets "
                                "P95 E2EL <= 6 s (agents workload, max_tokens 128)")


def test_a_capacity_at_the_target_meets_it():
    verdict = judge_target(fake_capacity(10, (1, 2, 4, 8, 16, 12, 10, 11)), target_agents=10)
    assert verdict.met and verdict.exit_code == 0
    assert verdict.headline.startswith("The 10-agent SLO is met on this host: 10 concurrent agents")


def test_a_target_inside_the_capacity_range_is_undecided_and_fails_the_ci_exit():
    verdict = judge_target(fake_capacity(10, (1, 2, 4, 8, 16, 12, 10, 11), bounds=(9, 11)), 10)
    out, buffer = plain_console()
    print_verdict(verdict, out)
    assert verdict.outcome == "undecided" and verdict.exit_code == 1
    expected = "The 10-agent SLO is undecided on this host: 10 (range 9-11) concurrent agents"
    assert expected in buffer.getvalue()
    assert judge_target(fake_capacity(10, (1, 2, 4, 8, 16), bounds=(10, 12)), 10).outcome == "met"
    assert judge_target(fake_capacity(8, (1, 2, 4, 8, 16), bounds=(7, 9)), 10).outcome == "not met"


def test_slo_exit_refuses_to_run_without_a_capacity_search_that_can_reach_the_target():
    with pytest.raises(Exit, match="--slo-exit needs the capacity search"):
        check_verdict_options(10, 32, skip_capacity=True, slo_exit=True)
    with pytest.raises(Exit, match="--limit 8 is below --target-agents 10"):
        check_verdict_options(10, 8, skip_capacity=False, slo_exit=False)
    check_verdict_options(10, 32, skip_capacity=False, slo_exit=True)


def test_a_misspelt_workload_is_refused_before_anything_is_measured_naming_its_flag():
    with pytest.raises(Exit, match="--sweep-workload 'agent': choose synthetic or agents"):
        check_workloads(workload="agents", sweep_workload="agent")
    check_workloads(workload="synthetic", sweep_workload="agents")


def test_a_sweep_level_line_shows_its_latency_and_throughput():
    line = level_line(fake_level(4, 2.0))
    assert line.startswith("  c=4   20 ok, 0 failed  P95 E2EL ") and "out tok/s" in line


def figure_texts(fig) -> str:
    return " ".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))


def test_every_plot_names_host_model_workload_and_time(tmp_path):
    levels = [fake_level(c, 0.5 * c) for c in (1, 2, 4, 8, 16)]
    cap = fake_capacity(4, (1, 2, 4, 8, 6, 5))
    figures = {"latency": plots.latency_vs_concurrency(levels, SYNTHETIC, 6.0, cap, RUN),
               "throughput": plots.throughput_vs_concurrency(levels, SYNTHETIC, RUN),
               "distributions": plots.ttft_itl_distributions(levels, SYNTHETIC, RUN),
               "capacity": plots.capacity_search_plot(cap, RUN)}
    for name, fig in figures.items():
        workload = "agents workload, max_tokens 128" if name == "capacity" else "synthetic workload"
        text = figure_texts(fig)
        assert all(part in text for part in ("benchbox", "smollm2-135m", workload, "2025-01-02T03:04:05Z"))
        assert plots.save(fig, tmp_path / f"{name}.png").stat().st_size > 10_000


def test_concurrency_axes_tick_the_measured_levels_as_integers():
    levels = [fake_level(c, 0.5 * c) for c in (1, 2, 4, 8, 16)]
    for fig in (plots.latency_vs_concurrency(levels, SYNTHETIC, 6.0, None, RUN),
                plots.throughput_vs_concurrency(levels, SYNTHETIC, RUN)):
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "2", "4", "8", "16"]
    cap = plots.capacity_search_plot(fake_capacity(4, (1, 2, 4, 8, 6, 5)), RUN)
    assert [t.get_text() for t in cap.axes[0].get_xticklabels()] == ["1", "2", "4", "5", "6", "8"]


def test_the_latency_plot_says_its_capacity_line_comes_from_another_workload():
    levels = [fake_level(c, 0.5 * c) for c in (1, 2, 4)]
    fig = plots.latency_vs_concurrency(levels, SYNTHETIC, 6.0, fake_capacity(4, (1, 2, 4, 8)), RUN)
    legend = " ".join(t.get_text() for t in fig.axes[0].get_legend().get_texts())
    assert "capacity 4, measured on the\nagents workload, max_tokens 128 (not this one)" in legend


def test_the_throughput_legend_says_which_axis_each_line_reads_on():
    fig = plots.throughput_vs_concurrency([fake_level(c, 0.5 * c) for c in (1, 2, 4)], SYNTHETIC, RUN)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert [label.endswith(("(left axis)", "(right axis, dashed)")) for label in legend] == [True] * 3


def test_latency_distributions_are_on_log_time_axes():
    fig = plots.ttft_itl_distributions([fake_level(1, 1.0)], SYNTHETIC, RUN)
    assert [ax.get_xscale() for ax in fig.axes] == ["log", "log"]


class FakeOpenAI(http.server.BaseHTTPRequestHandler):
    """A streaming chat endpoint that answers every request in max_tokens events, 2 ms apart."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.reply(b'{"data": [{"id": "fake-model"}]}', "application/json")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        tokens = int(body["max_tokens"])
        events = [{"choices": [{"delta": {"content": "tok "}, "finish_reason": None}]}] * (tokens - 1)
        events += [{"choices": [{"delta": {"content": "end"}, "finish_reason": "length"}]},
                   {"choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": tokens}}]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for event in events:
            self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            self.wfile.flush()
            time.sleep(0.002)
        self.wfile.write(b"data: [DONE]\n\n")

    def reply(self, payload: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def fake_endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def piped_bench_all(args: list[str]) -> tuple[int, list[tuple[float, str]]]:
    """`invoke bench.all ARGS` with stdout and stderr on one pipe, as in a CI log; each line
    with the second it arrived, and a last entry for the process's exit."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "invoke", "bench.all", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "80"})
    lines = [(time.monotonic() - started, line.rstrip("\n")) for line in proc.stdout]
    rc = proc.wait()
    return rc, [(0.0, "(started)"), *lines, (time.monotonic() - started, "(exited)")]


def longest_silence_s(lines: list[tuple[float, str]]) -> float:
    return max(b - a for (a, _), (b, _) in zip(lines, lines[1:], strict=False))


def in_order(text: str, markers: list[str]) -> bool:
    positions = [text.find(marker) for marker in markers]
    return -1 not in positions and positions == sorted(positions)


def test_a_piped_run_prints_each_part_in_measured_order_whole_and_exits_with_the_verdict(
        fake_endpoint, tmp_path):
    args = ["--url", fake_endpoint, "--skip-micro", "--concurrency", "1,2", "--max-tokens", "16",
            "--limit", "4", "--target-agents", "2", "--slo-exit", "--output-dir", str(tmp_path)]
    rc, lines = piped_bench_all(args)
    text = "\n".join(line for _, line in lines)
    assert rc == 0, text
    assert longest_silence_s(lines) < 30, text
    assert in_order(text, ["profile generic", "benchmarking fake-model", "serving sweep", "  c=1 ", "  c=2 ",
                           "| conc. |", "capacity search", "capacity: ", "wrote ", "SLO is met"]), text
    assert "…" not in text and "out tok/s | req/s | TTFT mean" in text
    tight = piped_bench_all([*args[:-1], str(tmp_path / "tight"), "--slo-p95-e2e", "0.001"])
    assert tight[0] == 1 and "SLO is not met" in "\n".join(line for _, line in tight[1])


@pytest.mark.server
def test_a_piped_bench_run_against_llama_server_prints_parts_in_order_and_never_goes_30_s_silent(
        isolated, llama_build, tmp_path):
    rc, lines = piped_bench_all(["--skip-micro", "--concurrency", "1", "--max-tokens", "8", "--limit", "2",
                                 "--target-agents", "2", "--slo-exit", "--output-dir", str(tmp_path)])
    text = "\n".join(line for _, line in lines)
    assert longest_silence_s(lines) < 30, text
    assert in_order(text, ["profile generic", "started llamacpp", "serving sweep", "  c=1 ", "| conc. |",
                           "capacity search", "capacity: ", "wrote ", "agent SLO is "]), text
    assert "…" not in text
    baseline = load_baseline(next(tmp_path.glob("*.json")))
    assert baseline.environment.llama_cpp_build == llama_build.spec.key
    verdict = judge_target(baseline.capacity, 2)
    assert rc == verdict.exit_code and verdict.headline in text
