"""Progress and output outside a terminal: periodic plain lines, whole values, and the 30 s rule
(no 30 s without a progress line) for the llama.cpp build, on a fake, scaled-down build."""
from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import sys
import textwrap
import threading
import time

from rich.console import Console

from dgxready import progress
from dgxready.progress import PlainProgress, count_text, new_table, percent_text
from dgxready.settings import REPO_ROOT

FAKE_CMAKE = """\
#!/usr/bin/env python3
import sys, time
def say(text):
    print(text, flush=True)
for pct in (0, 5, 10, 20, 30):
    say(f"[{pct:3d}%] Building CXX object ggml/src/file{pct}.cpp.o")
    time.sleep(0.1)
time.sleep(SILENCE)
say("[ 60%] Linking CXX static library libllama.a")
say("[100%] Built target llama-server")
say("[  4%] Built target ggml-base")
say("[ 96%] Built target llama-quantize")
"""


def console_buffer() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=1000, soft_wrap=True), buffer


def timestamped_lines(cmd: list[str], env: dict[str, str]) -> tuple[int, list[tuple[float, str]]]:
    """Run `cmd` with stdout and stderr on one pipe; each line with the second it arrived."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=REPO_ROOT)
    lines = [(time.monotonic() - started, line.rstrip("\n")) for line in proc.stdout]
    return proc.wait(), lines


def longest_silence(lines: list[tuple[float, str]]) -> float:
    times = [t for t, _ in lines]
    return max(b - a for a, b in zip(times, times[1:], strict=False))


def test_a_silent_step_still_prints_a_line_every_interval():
    out, buffer = console_buffer()
    with PlainProgress(out, count_text, interval_s=0.1) as progress:
        progress.add_task("serve c=4", total=8)
        time.sleep(0.65)
    lines = buffer.getvalue().splitlines()
    assert len(lines) >= 4
    assert all(re.fullmatch(r"serve c=4: 0/8 \(0s\)", line) for line in lines)


def test_frequent_updates_print_at_most_one_line_per_interval():
    out, buffer = console_buffer()
    with PlainProgress(out, percent_text, interval_s=5) as progress:
        task = progress.add_task("llama.cpp build", total=100)
        for pct in range(100):
            progress.update(task, completed=pct)
    assert buffer.getvalue() == ""


def test_a_finished_or_removed_task_prints_no_more_lines():
    out, buffer = console_buffer()
    with PlainProgress(out, count_text, interval_s=0.05) as progress:
        done = progress.add_task("done", total=2)
        progress.advance(done, 2)
        gone = progress.add_task("gone", total=2)
        progress.remove_task(gone)
        time.sleep(0.3)
    assert buffer.getvalue() == ""


def test_output_to_a_pipe_keeps_long_lines_and_table_cells_whole():
    script = textwrap.dedent("""
        from dgxready.cli import out
        from dgxready.progress import console, new_table
        out.print("capacity search: P95 E2EL <= 6 s, agents workload, max_tokens 128, " * 3)
        table = new_table(out, "serving: smollm2-135m at http://127.0.0.1:40000 (synthetic workload)")
        for col in ("conc.", "ok", "fail", "out tok/s", "req/s", "TTFT mean", "TPOT mean", "E2EL p95"):
            table.add_column(col, justify="right")
        table.add_row("16", "32", "0", "1234.5", "3.21", "0.123", "0.0456", "5.67")
        out.print(table)
        console.print("building llama.cpp (0.3.36-x86_64-cpu-3a718bf73c) with 2 jobs; log: " + "/x" * 40)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                         env={**os.environ, "COLUMNS": "80"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0].count("max_tokens 128") == 3
    header = next(line for line in run.stdout.splitlines() if "conc." in line)
    assert all(col in header for col in ("out tok/s", "req/s", "TTFT mean", "TPOT mean", "E2EL p95"))
    assert "…" not in run.stdout
    assert len(run.stderr.splitlines()) == 1 and run.stderr.rstrip().endswith("/x" * 40)


def rendered_table(out: Console, buffer: io.StringIO) -> list[str]:
    table = new_table(out, "t")
    table.add_column("conc.")
    table.add_row("4")
    out.print(table)
    return buffer.getvalue().splitlines()


def test_tables_in_a_terminal_are_box_drawn_and_in_a_log_are_markdown():
    buffer = io.StringIO()
    terminal = rendered_table(Console(file=buffer, force_terminal=True, width=40), buffer)
    log = rendered_table(*console_buffer())
    assert any("━" in line for line in terminal)
    assert [line.strip() for line in log[1:] if line.strip()] == ["| conc. |", "|-------|", "| 4     |"]


def fake_build(tmp_path, cmake_text: str, interval_s: float) -> tuple[int, list[tuple[float, str]], list[int]]:
    """compile_with_progress over a fake `cmake`, piped: its exit code, timestamped lines and the
    percentages it showed."""
    fake = tmp_path / "cmake"
    fake.write_text(cmake_text)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    script = ("from pathlib import Path; from model.llamacpp_build import compile_with_progress; "
              f"compile_with_progress([{str(fake)!r}], Path({str(tmp_path / 'build.log')!r}))")
    env = {**os.environ, "DGXREADY_PROGRESS_INTERVAL_S": str(interval_s)}
    rc, lines = timestamped_lines([sys.executable, "-c", script], env)
    percents = [int(m.group(1)) for _, text in lines if (m := re.match(r"llama\.cpp build: (\d+)% ", text))]
    return rc, lines, percents


def test_the_build_shows_progress_at_least_every_interval_when_piped(tmp_path):
    # The 30 s rule, scaled down: lines every 0.5 s at most 1.5 s apart, through a 3 s silence.
    rc, lines, percents = fake_build(tmp_path, FAKE_CMAKE.replace("SILENCE", "3"), 0.5)
    assert rc == 0, lines
    assert longest_silence(lines) <= 1.5, lines
    assert len(percents) >= 4 and percents == sorted(percents) and max(percents) < 100, lines
    assert "[ 96%] Built target llama-quantize" in (tmp_path / "build.log").read_text()


def test_the_build_reads_ninjas_counts_as_a_rising_percentage(tmp_path):
    ninja = ("#!/bin/sh\nfor n in 1 50 107 150 213 214; do echo \"[$n/214] Building CXX object x$n.o\"; "
             "sleep 0.2; done\n")
    rc, lines, percents = fake_build(tmp_path, ninja, 0.05)
    assert rc == 0, lines
    assert percents == sorted(percents) and 50 in percents and max(percents) == 99, lines


def test_the_heartbeat_thread_ends_with_its_progress():
    before = threading.active_count()
    out, _ = console_buffer()
    with PlainProgress(out, count_text, interval_s=0.05) as progress:
        progress.add_task("x", total=1)
    assert threading.active_count() == before


def test_waiting_in_a_log_says_it_still_waits(monkeypatch, capsys):
    quiet = progress.make_console(stderr=True)
    monkeypatch.setattr(progress, "console", quiet)
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.2)
    with progress.waiting("waiting for llamacpp on 127.0.0.1:1"):
        time.sleep(0.7)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("waiting for llamacpp")]
    assert len(lines) >= 2 and lines[0].endswith(")")
