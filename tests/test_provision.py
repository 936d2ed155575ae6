"""Provisioning real disposable Debian hosts (debootstrap rootfs + sshd on 127.0.0.N) over SSH."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from openai import OpenAI

from provision import lab
from provision.inventory import load_inventory, select
from provision.keys import fetch_keys
from provision.run import provision

pytestmark = pytest.mark.skipif(lab.available() is not None, reason=f"test hosts: {lab.available()}")


@pytest.fixture
def hosts(tmp_path, isolated):
    made = []

    def make(*names_and_addresses):
        entries = {}
        for name, address in names_and_addresses:
            h = lab.make_host(tmp_path / name, name, address)
            made.append(h)
            h.start()
            entries[name] = {"address": address, "key": str(h.key), "vars": lab.lab_vars()}
        inv = tmp_path / "inventory.yaml"
        inv.write_text(yaml.safe_dump({"hosts": entries, "groups": {"lab": list(entries)}}))
        return inv, made

    yield make
    for h in made:
        h.destroy()


def statuses(record, host):
    return {r.step: r.status for r in record.results if r.host == host}


def refuses(conn_from, address: str, port: int) -> bool:
    probe = f"timeout 3 bash -c 'exec 3<>/dev/tcp/{address}/{port}'"
    return conn_from.run(probe, warn=True, hide=True, in_stream=False).failed


def test_two_bare_hosts_serve_agents_through_their_own_multiplexer_then_a_rerun_changes_nothing(hosts):
    inv, (lima, mike) = hosts(("lima", "127.0.0.31"), ("mike", "127.0.0.30"))
    targets = select(load_inventory(inv), "lab")
    dry, _ = provision(targets, dry_run=True)
    plan = {(r.host, r.step): r for r in dry.results}
    assert plan[("lima", "base-packages")].status == "would change"
    assert plan[("lima", "base-packages")].changes[0].startswith("install ")
    assert plan[("lima", "nvidia-driver")].status == "skipped"
    assert any(c.startswith("generate 10 agent keys") for c in plan[("mike", "multiplexer")].changes)
    assert not (lima.root / "opt/dgxready").exists(), "a dry run changed the host"

    first, path = provision(targets)
    for name in ("lima", "mike"):
        s = statuses(first, name)
        assert s["validate"] == "ok" and "failed" not in s.values(), first.results
        assert s["nvidia-driver"] == "skipped" and s["vllm"] == "skipped"
    for step in ("engine", "multiplexer"):
        assert "supervised process with a pidfile" in next(r for r in first.results if r.step == step).detail
    assert json.loads(path.read_text())["finished"] is True

    for target, other in ((targets[0], mike), (targets[1], lima)):
        v = target.entry.vars
        keys = yaml.safe_load(fetch_keys(target).read_text())
        client = OpenAI(base_url=f"http://{target.entry.address}:{v.mux_port}/v1",
                        api_key=keys["agents"][0]["key"])
        reply = client.chat.completions.create(model="any", max_tokens=8, extra_body={"ignore_eos": True},
                                               messages=[{"role": "user", "content": "Say OK."}])
        assert reply.choices[0].message.content.strip()
        other_conn = other.connection()
        assert refuses(other_conn, target.entry.address, v.serve_port), f"{target.name}'s engine is reachable"
        assert not refuses(other_conn, target.entry.address, v.mux_port)
        other_conn.close()
    key_file = (lima.root / "opt/dgxready/etc/agent-keys.yaml")
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"

    again, _ = provision(targets)
    for name in ("lima", "mike"):
        assert first.counts(name)["changed"] >= 7
        moved = [(r.step, r.status, r.detail) for r in again.results if r.host == name and r.status != "ok"
                 and r.status != "skipped"]
        assert not moved, moved


def test_a_run_killed_mid_step_converges_when_rerun(hosts, isolated, tmp_path, processes):
    inv, _ = hosts(("bravo", "127.0.0.32"))
    record_dir = isolated.state_dir / "provision"
    proc = processes.start([sys.executable, "-m", "invoke", "provision", "--host", "bravo", "--inventory",
                            str(inv), "--yes"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    killed_after = None
    while time.monotonic() < deadline and proc.poll() is None:
        for f in record_dir.glob("*.json"):
            steps = [r["step"] for r in json.loads(f.read_text())["results"]]
            if "llama.cpp" in steps:
                killed_after = steps[-1]
                proc.send_signal(signal.SIGKILL)
                break
        if killed_after:
            break
        time.sleep(0.05)
    proc.wait()
    assert killed_after, "the run finished before it could be killed"
    record, _ = provision(select(load_inventory(inv), "bravo"))
    s = statuses(record, "bravo")
    assert s["validate"] == "ok" and "failed" not in s.values()
    assert s["base-packages"] == "ok" and s["llama.cpp"] == "ok"


def test_one_host_down_does_not_stop_the_other(hosts):
    inv, (up, down) = hosts(("charlie", "127.0.0.33"), ("delta", "127.0.0.34"))
    down.stop()
    record, _ = provision(select(load_inventory(inv), "lab"))
    assert statuses(record, "charlie")["validate"] == "ok"
    failed = [r for r in record.results if r.host == "delta"]
    assert len(failed) == 1 and failed[0].status == "failed" and failed[0].step == "connect"
    assert "delta (127.0.0.34:22): cannot connect" in failed[0].detail


def test_undo_restores_the_earlier_state(hosts):
    inv, (h,) = hosts(("echo", "127.0.0.35"))
    targets = select(load_inventory(inv), "echo")
    provision(targets, only="base-packages")
    provision(targets, only="user-ssh")
    conf = h.root / "etc/ssh/sshd_config.d/50-dgxready.conf"
    assert conf.exists() and "dgxready:" in (h.root / "etc/passwd").read_text()
    undone, _ = provision(targets, undo="user-ssh")
    assert statuses(undone, "echo") == {"user-ssh": "undone"}
    assert not conf.exists() and "dgxready:" not in (h.root / "etc/passwd").read_text()
    again, _ = provision(targets, only="user-ssh", dry_run=True)
    assert statuses(again, "echo")["user-ssh"] == "would change"


def test_check_reports_one_line_per_check_with_exit_codes(hosts):
    inv, _ = hosts(("foxtrot", "127.0.0.36"))
    fresh = subprocess.run([sys.executable, "-m", "invoke", "provision.check", "--host", "foxtrot",
                            "--inventory", str(inv), "--json"], capture_output=True, text=True)
    assert fresh.returncode == 1
    doc = json.loads(fresh.stdout)
    assert {c["check"] for c in doc["failed"]} >= {"base-packages", "llama.cpp", "model"}
    usage = subprocess.run([sys.executable, "-m", "invoke", "provision.check", "--host", "foxtrot",
                            "--inventory", str(inv), "--bogus"], capture_output=True, text=True)
    assert usage.returncode != 0


def test_an_ssh_config_alias_works_as_host(hosts, tmp_path, isolated):
    _, (h,) = hosts(("golf", "127.0.0.37"))
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh/config").write_text(h.ssh_config_entry().replace("Host golf", "Host lab-golf"))
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(isolated.cache_dir.parent)}
    run = subprocess.run([sys.executable, "-m", "invoke", "provision.check", "--host", "lab-golf",
                          "--inventory", str(tmp_path / "none.yaml"), "--json"],
                         capture_output=True, text=True, env=env)
    doc = json.loads(run.stdout)
    assert run.returncode == 1 and {c["host"] for c in doc["checks"]} == {"lab-golf"}
    assert any(c["check"] == "base-packages" and c["status"] == "would change" for c in doc["checks"])
