"""The multiplexer's tools: shell.run's allowlist and sandbox against a corpus of hostile argv,
leases that every mutation respects, and idempotency keys with a retry window and a retention."""
import os
import secrets
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest

from agents.config import load_config
from agents.sandbox import ArgvPattern, Sandbox, SandboxLimits
from agents.state import StateStore
from agents.tools import ToolCall, ToolRegistry, ToolSettings
from dgxready.errors import ConfigError
from dgxready.roles import load_roles
from tests.agents_helpers import start_mux

LIMITS = SandboxLimits(wall_s=3.0, output_bytes=16 * 1024, memory_bytes=128 << 20)
DEAD_BACKEND = [("dead", "http://127.0.0.1:9", 1)]


@dataclass
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Canary:
    secret: str
    keys_file: Path


@pytest.fixture
def canary(tmp_path, monkeypatch) -> Canary:
    """A secret in an agent-keys file outside the workspace and in the multiplexer's environment."""
    secret = f"canary-{secrets.token_hex(16)}"
    keys_file = tmp_path / "agent-keys.yaml"
    keys_file.write_text(f"agents:\n  - {{name: developer-1, role: developer, key: {secret}}}\n")
    monkeypatch.setenv("DGXREADY_CANARY", secret)
    return Canary(secret, keys_file)


def registry(tmp_path, clock=None, **settings) -> ToolRegistry:
    base = ToolSettings(sandbox=LIMITS, clock=clock or Clock())
    return ToolRegistry(StateStore(tmp_path / "s.db"), replace(base, **settings))


def caller(reg: ToolRegistry, role: str = "developer"):
    role_ = load_roles()[role]

    def call(agent, tool, args, session="s", key=None):
        return reg.call(ToolCall(agent, role_, session, tool, args, key))
    return call


def sandboxed_pids() -> set[int]:
    """Live processes in a pid namespace other than this one's: sandboxes still running."""
    ours = os.readlink("/proc/self/ns/pid")
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "pid") != ours:
                found.add(int(entry.name))
        except OSError:
            continue
    return found


def wait_for_no_new_sandboxes(before: set[int], within_s: float = 5.0) -> set[int]:
    deadline = time.monotonic() + within_s
    while (left := sandboxed_pids() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def hostile_argv(c: Canary) -> list[list[str]]:
    keys, folder = str(c.keys_file), str(c.keys_file.parent)
    return [
        ["date", "-f", keys], ["date", f"--file={keys}"], ["wc", f"--files0-from={keys}"],
        ["wc", "-l", keys], ["wc", "-l", "../agent-keys.yaml"], ["wc", "-l", "a/../../agent-keys.yaml"],
        ["ls", "/"], ["ls", "-la", folder], ["ls", "/root", "/home", "/etc", "/tmp"],
        ["cat", keys], ["cat", "/proc/self/environ"], ["cat", "/proc/1/environ"],
        ["sh", "-c", "cat /proc/*/environ /proc/*/cmdline"], ["env"], ["printenv"],
        ["sh", "-c", f"cat {keys}; cat /proc/1/root{keys}; set"],
        ["sh", "-c", "ls -la /proc/*/cwd /proc/*/root/ 2>&1"],
        ["echo", "-e", "\\x41"], ["echo", "$DGXREADY_CANARY"],
        ["sh", "-c", "f(){ f | f & }; f; sleep 1"],
        ["sh", "-c", "exec tail /dev/zero"],
        ["yes"], ["sh", "-c", "yes >&2"], ["cat", "/dev/urandom"], ["echo", "x" * 100_000],
        ["sleep", "30"], ["sh", "-c", "sleep 30 & sleep 30 & wait"],
        ["sh", "-c", "echo pwned > /work/f; echo pwned > /tmp/f"],
    ]


def test_allowlist_patterns_match_argv_words_not_program_names():
    wc = ArgvPattern.parse(["wc", "-l?", "<path>+"])
    assert wc.match(["wc", "-l", "docs/a.md", "b"]).paths == ("docs/a.md", "b")
    assert wc.match(["wc", "notes"]).paths == ("notes",)
    for refused in (["wc"], ["wc", "-l"], ["wc", "/etc/passwd"], ["wc", "../x"], ["wc", "a/../../x"],
                    ["wc", "--files0-from=x"], ["wc", "-c", "x"], ["cat", "x"]):
        assert wc.match(refused) is None, refused
    date = ArgvPattern.parse(["date", "-u?", "+<any>?"])
    assert date.match(["date"]) and date.match(["date", "-u", "+%Y-%m-%d"]) and date.match(["date", "+%s"])
    assert date.match(["date", "-f", "/etc/passwd"]) is None and date.match(["date", "+-x", "+y"]) is None
    echo = ArgvPattern.parse(["echo", "<any>*"])
    assert echo.match(["echo", "a", "b c"]) and echo.match(["echo"])
    assert echo.match(["echo", "-e", "x"]) is None
    ls = ArgvPattern.parse(["ls", "<path>*"])
    assert ls.match(["ls"]) == ls.match(["ls"]) and ls.match(["ls"]).takes_paths
    assert ls.match(["ls", "/"]) is None
    head = ArgvPattern.parse(["head", "--lines=<int>", "<path>"])
    assert head.match(["head", "--lines=5", "a"]) and head.match(["head", "--lines=x", "a"]) is None
    assert not ArgvPattern.parse(["date"]).match(["date"]).takes_paths


def test_a_bad_allowlist_entry_is_refused_at_load_naming_file_and_index(tmp_path):
    cases = {
        "[[date], [echo, '<any>*'], [wc, '<file>']]": r"shell_allowlist\[2\]: 'wc'|<file>",
        "[[date], [ls, '-<any>']]": r"shell_allowlist\[1\]: '-<any>': would let any option through",
        "[[/bin/cat, '<path>']]": r"shell_allowlist\[0\]: '/bin/cat': the first word is a program name",
        "[[]]": r"shell_allowlist\[0\]: an empty pattern",
        "[date, [echo]]": r"shell_allowlist\[0\]: 'date': a bare program name would allow any argument",
        "[[wc, 'a<path']]": r"shell_allowlist\[0\]: 'a<path': '<' and '>' only surround a placeholder",
    }
    for allowlist, error in cases.items():
        path = tmp_path / "multiplexer.yaml"
        path.write_text(f"backends: [{{name: b, url: 'http://127.0.0.1:9'}}]\nshell_allowlist: {allowlist}\n")
        with pytest.raises(ConfigError, match=rf"^multiplexer.yaml: .*{error}") as exc:
            load_config(path)
        assert str(exc.value).startswith("multiplexer.yaml: shell_allowlist["), str(exc.value)
    path.write_text("backends: [{name: b, url: 'http://127.0.0.1:9'}]\n"
                    "idempotency_window_s: 120\nidempotency_retention_s: 60\n")
    with pytest.raises(ConfigError, match="idempotency_retention_s .60. is below idempotency_window_s"):
        load_config(path)


def test_no_hostile_command_gets_a_byte_of_the_canary_out_of_the_sandbox(canary):
    """The sandbox alone, with the allowlist bypassed: as if a pattern were too loose."""
    sandbox = Sandbox(LIMITS)
    before = sandboxed_pids()
    started = time.monotonic()
    for argv in hostile_argv(canary):
        t0 = time.monotonic()
        res = sandbox.run(argv, {"notes.md": "one\ntwo\n"})
        took = time.monotonic() - t0
        assert canary.secret not in res.stdout + res.stderr, argv
        # Well under the 30 s a hostile `sleep 30` asks for; the slack is a loaded box's bwrap start.
        assert took < LIMITS.wall_s + 10, (argv, took)
        assert len(res.stdout) + len(res.stderr) <= LIMITS.output_bytes, argv
    assert time.monotonic() - started < 120
    assert not wait_for_no_new_sandboxes(before), "a sandboxed process outlived its command"
    assert sandbox.run(["sleep", "30"], {}).timed_out
    assert sandbox.run(["yes"], {}).truncated
    memory = sandbox.run(["sh", "-c", "exec tail /dev/zero"], {})
    assert memory.exit != 0 and "memory exhausted" in memory.stderr
    bomb = sandbox.run(["sh", "-c", "f(){ f | f & }; f; sleep 0.5; echo survived"], {})
    assert "Cannot fork" in bomb.stderr and not bomb.timed_out
    assert not canary.keys_file.parent.joinpath("f").exists()


def test_the_sandbox_sees_the_workspace_files_read_only_and_nothing_of_the_host(canary):
    sandbox = Sandbox(LIMITS)
    listing = sandbox.run(["ls", "-A", "/"], {}).stdout.split()
    assert set(listing) <= {"bin", "dev", "lib", "lib64", "proc", "usr", "work"}, listing
    umask = os.umask(0o077)
    try:
        counted = sandbox.run(["wc", "-l", "docs/a.md"], {"docs/a.md": "1\n2\n3\n"})
    finally:
        os.umask(umask)
    assert counted.stdout.split() == ["3", "docs/a.md"], counted
    write = sandbox.run(["sh", "-c", "echo x >> docs/a.md || echo x > new"], {"docs/a.md": "1\n"})
    assert write.exit != 0 and "cannot create new: Read-only file system" in write.stderr
    env = sandbox.run(["env"], {}).stdout.split()
    assert sorted(env) == ["LANG=C.UTF-8", "PATH=/usr/bin:/bin", "PWD=/work"]
    interfaces = sandbox.run(["cat", "/proc/net/dev"], {}).stdout
    assert [line.split(":")[0].strip() for line in interfaces.splitlines() if ":" in line] == ["lo"]


def test_shell_run_refuses_what_no_pattern_allows_and_leaks_nothing_even_with_loose_patterns(
        tmp_path, canary):
    strict = caller(registry(tmp_path))
    for argv in hostile_argv(canary):
        res = strict("d1", "shell.run", {"argv": argv})
        if argv[0] == "echo" and not argv[1].startswith("-"):
            assert res.ok and canary.secret not in res.result["stdout"], argv
            continue
        assert not res.ok and ("not allowlisted" in res.error or "matches no shell_allowlist" in res.error), \
            argv
    loose = [ArgvPattern.parse(p) for p in (["date", "<any>*"], ["wc", "<any>*"], ["ls", "<any>*"],
                                            ["cat", "<any>+"], ["env"], ["sh", "-c", "<any>"])]
    call = caller(registry(tmp_path / "loose", shell_allowlist=tuple(loose)))
    cat_keys = call("d1", "shell.run", {"argv": ["cat", str(canary.keys_file)]})
    assert cat_keys.ok and cat_keys.result["exit"] != 0, cat_keys
    for argv in hostile_argv(canary):
        res = call("d1", "shell.run", {"argv": argv})
        assert canary.secret not in str(res.result) + str(res.error), argv


def test_shell_run_sees_the_workspace_files_it_names(tmp_path):
    call = caller(registry(tmp_path))
    assert call("d1", "workspace.write", {"path": "docs/plan.md", "append": "a\nb\n"}).ok
    assert call("d1", "workspace.write", {"path": "notes", "append": "x\n"}).ok
    counted = call("d1", "shell.run", {"argv": ["wc", "-l", "docs/plan.md"]})
    assert counted.ok and counted.result["stdout"].split() == ["2", "docs/plan.md"], counted
    assert call("d1", "shell.run", {"argv": ["ls"]}).result["stdout"].split() == ["docs", "notes"]
    assert call("d1", "shell.run", {"argv": ["ls", "docs"]}).result["stdout"].split() == ["plan.md"]
    assert call("d1", "shell.run", {"argv": ["ls", "-l", "notes"]}).result["exit"] == 0
    assert call("d1", "shell.run", {"argv": ["date", "+%Y"]}).result["stdout"].strip().isdigit()


def test_shell_run_says_so_when_bubblewrap_is_missing_or_a_command_runs_too_long(tmp_path, monkeypatch):
    call = caller(registry(tmp_path, sandbox=replace(LIMITS, wall_s=0.5),
                           shell_allowlist=(ArgvPattern.parse(["sleep", "<int>"]),)))
    slow = call("d1", "shell.run", {"argv": ["sleep", "5"]})
    assert not slow.ok and slow.error == "sleep ran past 0.5 s and was stopped"
    monkeypatch.setenv("PATH", str(tmp_path))
    missing = call("d1", "shell.run", {"argv": ["sleep", "1"]})
    assert not missing.ok and "bubblewrap (bwrap) is not on the multiplexer's PATH" in missing.error
    hidden = tmp_path / "bin" / "bwrap"
    hidden.parent.mkdir(mode=0o700)
    hidden.write_text("#!/bin/sh\nexit 0\n")
    hidden.chmod(0o700)
    monkeypatch.setenv("PATH", f"{hidden.parent}:/usr/bin")
    unreadable = caller(registry(tmp_path / "a", shell_allowlist=(ArgvPattern.parse(["true"]),)))
    if os.geteuid() == 0:
        assert unreadable("d1", "shell.run", {"argv": ["true"]}).error.startswith("shell.run: cannot start ")
    with tempfile.TemporaryDirectory() as shared:
        broken = Path(shared) / "bwrap"
        broken.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
        broken.chmod(0o755)
        Path(shared).chmod(0o755)
        monkeypatch.setenv("PATH", f"{shared}:/usr/bin")
        fresh = caller(registry(tmp_path / "b", shell_allowlist=(ArgvPattern.parse(["true"]),)))
        refused = fresh("d1", "shell.run", {"argv": ["true"]})
    assert refused.error == ("shell.run: bwrap cannot build a sandbox here (exit 1): "
                             "bwrap: No permissions to create new namespace")


def test_workspace_paths_and_stale_fencing_tokens(tmp_path):
    clock = Clock()
    reg = registry(tmp_path, clock, lease_ttl_s=30)
    call = caller(reg)
    assert call("d1", "workspace.read", {"path": "../etc/passwd"}).error.startswith("path")
    first = call("d1", "workspace.read", {"path": "doc", "lease": True}).result["token"]
    assert not call("d2", "workspace.read", {"path": "doc", "lease": True}).ok
    clock.now += 31
    second = call("d2", "workspace.read", {"path": "doc", "lease": True}).result["token"]
    assert second > first
    stale = call("d1", "workspace.write", {"path": "doc", "content": "old", "token": first})
    assert not stale.ok and "stale fencing token" in stale.error
    assert call("d2", "workspace.write", {"path": "doc", "content": "new", "token": second}).ok
    assert call("d1", "workspace.read", {"path": "doc"}).result["content"] == "new"
    assert any(r[3] == "error" and "stale" in r[4] for r in reg.store.audit_rows())


def test_an_append_to_a_path_another_agent_holds_is_refused_and_the_holder_may_append(tmp_path):
    clock = Clock()
    call = caller(registry(tmp_path, clock, lease_ttl_s=30))
    assert call("d2", "workspace.write", {"path": "plan", "append": "start\n"}).ok
    token = call("d1", "workspace.read", {"path": "plan", "lease": True}).result["token"]
    refused = call("d2", "workspace.write", {"path": "plan", "append": "d2 line\n"})
    assert not refused.ok and refused.error.startswith("plan: leased by another agent for 30.0 s more")
    assert "d1" not in refused.error
    assert call("d1", "workspace.write", {"path": "plan", "append": "d1 line\n"}).ok
    assert call("d1", "workspace.write", {"path": "plan", "content": "start\nrewritten\n", "token": token}).ok
    assert call("d2", "workspace.write", {"path": "plan", "append": "d2 line\n"}).ok
    assert call("d2", "workspace.read", {"path": "plan"}).result["content"] == "start\nrewritten\nd2 line\n"


def test_an_append_after_a_lease_expires_lands_and_the_late_holders_write_is_refused(tmp_path):
    clock = Clock()
    call = caller(registry(tmp_path, clock, lease_ttl_s=30))
    token = call("d1", "workspace.read", {"path": "plan", "lease": True}).result["token"]
    clock.now += 31
    assert call("d2", "workspace.write", {"path": "plan", "append": "kept\n"}).ok
    late = call("d1", "workspace.write", {"path": "plan", "content": "overwrite", "token": token})
    assert not late.ok and "expired or moved" in late.error
    assert call("d1", "workspace.read", {"path": "plan"}).result["content"] == "kept\n"


def test_an_identical_append_is_a_retry_within_the_window_and_a_new_append_after_it(tmp_path):
    clock = Clock()
    call = caller(registry(tmp_path, clock, idempotency_window_s=60))
    args = {"path": "cases", "append": "add a test case\n"}
    assert not call("d1", "workspace.write", args).replayed
    clock.now += 59
    assert call("d1", "workspace.write", args).replayed
    assert not call("d1", "workspace.write", args, session="other").replayed
    clock.now += 2
    assert not call("d1", "workspace.write", args).replayed
    assert call("d1", "workspace.read", {"path": "cases"}).result["content"] == "add a test case\n" * 3


def test_an_idempotency_key_dedups_for_its_retention_and_only_the_same_call(tmp_path):
    clock = Clock()
    call = caller(registry(tmp_path, clock, idempotency_window_s=60, idempotency_retention_s=3600))
    item = {"item": "ship it"}
    first = call("d1", "taskboard.append", item, session=None, key="req-1")
    clock.now += 3000
    again = call("d1", "taskboard.append", item, session=None, key="req-1")
    assert again.replayed and again.result == first.result
    assert not call("d1", "taskboard.append", item, session=None, key="req-2").replayed
    assert not call("d2", "taskboard.append", item, session=None, key="req-1").replayed
    other = call("d1", "taskboard.append", {"item": "something else"}, session=None, key="req-1")
    assert not other.ok and "was used for a different call" in other.error
    assert not call("d1", "taskboard.append", item, session=None, key="bad key!").ok
    clock.now += 700
    assert not call("d1", "taskboard.append", item, session=None, key="req-1").replayed
    assert not call("d1", "taskboard.append", item, session=None).replayed
    assert not call("d1", "taskboard.append", item, session=None).replayed


def test_idempotency_records_past_their_retention_are_pruned_every_few_calls(tmp_path):
    clock = Clock()
    reg = registry(tmp_path, clock, idempotency_window_s=10, idempotency_retention_s=100, prune_every=3)
    call = caller(reg)

    def keys():
        with reg.store.tx() as db:
            return db.execute("SELECT count(*) FROM idempotency").fetchone()[0]
    call("d1", "taskboard.append", {"item": "old 1"}, key="k1")
    call("d1", "taskboard.append", {"item": "old 2"})
    clock.now += 101
    call("d1", "taskboard.append", {"item": "new 1"})
    assert keys() == 0 + 1
    call("d1", "taskboard.append", {"item": "new 2"})
    call("d1", "taskboard.append", {"item": "new 3"})
    assert keys() == 3


@pytest.fixture
def mux(tmp_path):
    m = start_mux(tmp_path, DEAD_BACKEND, agents=10, rate_limits=False)
    yield m
    m.mux.stop()


def post(client, mux, key, tool, args, session="race", headers=None):
    return client.post(f"{mux.url}/v1/tools/call", headers={"Authorization": f"Bearer {key}"} | (headers or {}),
                       json={"tool": tool, "args": args} | ({"session": session} if session else {})).json()


def test_the_idempotency_key_header_reaches_the_tool(mux):
    key = mux.key("developer")
    with httpx.Client(timeout=30) as client:
        once = {"Idempotency-Key": "req-42"}
        assert not post(client, mux, key, "taskboard.append", {"item": "x"}, None, once)["replayed"]
        assert post(client, mux, key, "taskboard.append", {"item": "x"}, None, once)["replayed"]
        assert not post(client, mux, key, "taskboard.append", {"item": "x"}, None)["replayed"]
        assert not post(client, mux, key, "taskboard.append", {"item": "x"}, None)["replayed"]


def test_tool_races_lose_no_update(mux):
    """Leased read-modify-writes of a counter and of a shared document, appends to that document
    and to a log, and task-board items, from several agents in threads, all at once."""
    roles = load_roles()
    agents = [a for a in mux.keys.agents if {"workspace.write", "taskboard.append"} <= set(roles[a.role].tools)]
    rounds = 8

    def until_ok(client, key, tool, args):
        while True:
            res = post(client, mux, key, tool, args)
            if res["ok"]:
                return res
            assert "leased" in res["error"] or "expired or moved" in res["error"], res
            time.sleep(0.002)

    def leased_update(client, key, path, change):
        while True:
            read = post(client, mux, key, "workspace.read", {"path": path, "lease": True})
            if not read["ok"]:
                time.sleep(0.002)
                continue
            lease = read["result"]
            w = post(client, mux, key, "workspace.write",
                     {"path": path, "content": change(lease["content"]), "token": lease["token"]})
            if w["ok"]:
                return

    def worker(agent):
        with httpx.Client(timeout=120) as client:
            for i in range(rounds):
                leased_update(client, agent.key, "race/counter", lambda c: str(int(c or 0) + 1))
                leased_update(client, agent.key, "race/doc", lambda c, i=i: c + f"write {agent.name}:{i}\n")
                append = {"path": "race/doc", "append": f"append {agent.name}:{i}\n"}
                until_ok(client, agent.key, "workspace.write", append)
                append = {"path": "race/log", "append": f"{agent.name}:{i}\n"}
                res = until_ok(client, agent.key, "workspace.write", append)
                assert not res["replayed"], res
                res = until_ok(client, agent.key, "taskboard.append", {"item": f"{agent.name} item {i}"})
                assert not res["replayed"], res

    with ThreadPoolExecutor(len(agents)) as pool:
        list(pool.map(worker, agents))
    with httpx.Client(timeout=30) as client:
        key = agents[0].key
        read = lambda p: post(client, mux, key, "workspace.read", {"path": p})["result"]["content"]  # noqa: E731
        assert int(read("race/counter")) == rounds * len(agents)
        assert len(read("race/log").splitlines()) == rounds * len(agents)
        expected = {f"{kind} {a.name}:{i}" for a in agents for i in range(rounds)
                    for kind in ("write", "append")}
        doc = read("race/doc").splitlines()
        assert sorted(doc) == sorted(expected), sorted(expected - set(doc))
        again = post(client, mux, key, "taskboard.append", {"item": f"{agents[0].name} item 0"})
        assert again["replayed"], "a retried call must apply once"
