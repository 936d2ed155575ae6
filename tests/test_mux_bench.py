"""The overhead benchmark's own harness: the CPU accounting reads /proc as the kernel means it, and the
bare pass-through proxy forwards requests and answers byte for byte."""
import asyncio
import contextlib
import gzip
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from agents.benchmarks.drive import Target
from agents.benchmarks.fixtures import Bar, stop, write_bench_keys
from agents.benchmarks.overhead import BARE, DIRECT, MUX, SESSION, Settings, measured_round, start_sides
from agents.benchmarks.passthrough import PassThrough
from agents.benchmarks.procstat import CLK_TCK, parse_stat, read_stat, run_ns, tree_cpu_seconds
from dgxready.ports import free_port

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_parse_stat_counts_fields_after_the_last_parenthesis():
    # A command name may hold spaces and ')': fields are counted from the last ')'.
    ticks = f"{3 * CLK_TCK} {CLK_TCK} {2 * CLK_TCK} 0"
    line = f"4242 (we ird) name) S 17 4242 4242 0 -1 4194304 10 0 0 0 {ticks} 20 0"
    st = parse_stat(line)
    assert (st.pid, st.ppid) == (4242, 17)
    assert (st.utime, st.stime, st.cutime, st.cstime) == (3.0, 1.0, 2.0, 0.0)
    assert st.own == 4.0 and st.reaped_children == 2.0


def test_own_stat_agrees_with_os_times():
    exec(BURN.format(s=0.2))
    st, t = read_stat(os.getpid()), os.times()
    assert st is not None
    assert abs(st.own - (t.user + t.system)) <= 3 / CLK_TCK


def test_tree_cpu_counts_live_grandchildren_and_schedstat_is_finer():
    # The parent sleeps; its child burns 0.3 s of CPU and then sleeps too.
    grandchild = BURN.format(s=0.3) + "time.sleep(30)"
    child = (f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {grandchild!r}])\n"
             "time.sleep(30)")
    parent = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.monotonic() + 20
        while tree_cpu_seconds(parent.pid) - read_stat(parent.pid).own < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        own = read_stat(parent.pid).own
        tree = tree_cpu_seconds(parent.pid)
        assert own < 0.2, "the parent only sleeps"
        assert tree - own >= 0.3 - 2 / CLK_TCK
    finally:
        parent.kill()
        parent.wait()
    before = run_ns(os.getpid())
    exec(BURN.format(s=0.05))
    assert 0.045e9 <= run_ns(os.getpid()) - before < 1e9


def test_tree_cpu_of_a_missing_process_raises():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(ProcessLookupError):
        tree_cpu_seconds(proc.pid)


@dataclass
class Seen:
    method: str = ""
    path: str = ""
    query: bytes = b""
    body: bytes = b""
    headers: dict | None = None


CHUNKS = [b"data: {\"a\": 1}\n\n", bytes(range(256)), gzip.compress(b"x" * 1000), b"data: [DONE]\n\n"]


def upstream_app(seen: Seen):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        seen.method, seen.path, seen.query = scope["method"], scope["path"], scope["query_string"]
        seen.body = body
        seen.headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        await send({"type": "http.response.start", "status": 207,
                    "headers": [(b"content-type", b"application/octet-stream"), (b"content-encoding", b"gzip"),
                                (b"x-upstream", b"yes")]})
        for chunk in CHUNKS:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    return app


@contextlib.contextmanager
def serving(app):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_passthrough_forwards_request_and_answer_bytes_unchanged():
    seen = Seen()
    body = b"\x00\x01 raw body \xff" * 100
    with serving(upstream_app(seen)) as up, serving(PassThrough(up)) as proxy:
        with httpx.Client() as client, client.stream(
                "POST", f"{proxy}/v1/some/path?x=1&y=%20z", content=body,
                headers={"Authorization": "Bearer k", "X-Session-Id": "s-1"}) as resp:
            got = b"".join(resp.iter_raw())
            status, headers = resp.status_code, resp.headers
    assert (seen.method, seen.path, seen.query, seen.body) == ("POST", "/v1/some/path", b"x=1&y=%20z", body)
    assert seen.headers["authorization"] == "Bearer k" and seen.headers["x-session-id"] == "s-1"
    assert status == 207
    assert headers["content-encoding"] == "gzip" and headers["x-upstream"] == "yes"
    assert got == b"".join(CHUNKS), "the bytes come back as sent, not decompressed, not re-framed"


def test_session_target_names_one_session_per_stream():
    t = Target("mux+session", "http://h", "key", session_prefix="s16")
    assert t.headers(3)["X-Session-Id"] == "s16-3"
    assert "X-Session-Id" not in Target("mux", "http://h", "key").headers(3)


def test_a_bar_this_machine_cannot_measure_has_no_verdict():
    bar = Bar("p50", 12.0, 1.0, False, "", "overhead", not_applicable="2 cores")
    assert bar.met is None and bar.verdict == "n/a"
    assert Bar("x", 1.3, 1.2, False, "").verdict == "MISSED"


def test_the_overhead_sides_stream_answers_of_the_length_asked_a_token_a_chunk(tmp_path):
    keys = write_bench_keys(tmp_path / "keys.yaml")
    settings = Settings(answer_tokens=12, token_interval_ms=1.0, litellm=False)
    sides = start_sides(tmp_path, keys, tmp_path / "keys.yaml", settings)
    try:
        for side in (DIRECT, BARE, MUX, SESSION):
            rnd, cpu = measured_round(sides, side, 2, 0.5)
            assert rnd.completed and not rnd.failed, side
            assert {r.output_tokens for r in rnd.records} == {12}, side
            # A token every millisecond: each streamed answer takes at least the 11 gaps.
            assert min(r.e2el for r in rnd.records) >= 0.011, side
            assert cpu["backend"] > 0
    finally:
        stop(*sides.procs)
