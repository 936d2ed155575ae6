"""Provisioning real disposable Debian hosts (debootstrap rootfs + sshd on 127.0.0.N) over SSH."""
import json
import re
import signal
import string
import subprocess
import sys
import time

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dgxready.errors import ConfigError
from provision.core import q
from provision.inventory import ADDRESS, NAME, load_inventory, select
from provision.run import provision
from tests import testhosts

pytestmark = pytest.mark.skipif(testhosts.available() is not None,
                                reason=f"test hosts: {testhosts.available()}")


@pytest.fixture
def hosts(tmp_path, isolated):
    made = []

    def make(*names_and_addresses):
        entries = {}
        for name, address in names_and_addresses:
            h = testhosts.make_host(tmp_path / name, name, address)
            h.start()
            made.append(h)
            entries[name] = {"address": address, "key": str(h.key)}
        inv = tmp_path / "inventory.yaml"
        inv.write_text(yaml.safe_dump({"hosts": entries, "groups": {"lab": list(entries)}}))
        return inv, made

    yield make
    for h in made:
        h.destroy()


def statuses(record, host):
    return {r.step: r.status for r in record.results if r.host == host}


def test_fresh_host_to_serving_then_a_rerun_changes_nothing(hosts):
    inv, (h,) = hosts(("alpha", "127.0.0.31"))
    targets = select(load_inventory(inv), "alpha")
    dry, _ = provision(targets, dry_run=True)
    assert statuses(dry, "alpha")["base-packages"] == "would change"
    assert statuses(dry, "alpha")["nvidia-driver"] == "skipped"
    assert not (h.root / "opt/dgxready").exists(), "a dry run changed the host"

    first, path = provision(targets)
    s = statuses(first, "alpha")
    assert s["validate"] == "ok" and "failed" not in s.values(), first.results
    assert s["nvidia-driver"] == "skipped" and s["vllm"] == "skipped"
    services = next(r for r in first.results if r.step == "services")
    assert "supervised process with a pidfile" in services.detail
    assert json.loads(path.read_text())["finished"] is True

    again, _ = provision(targets)
    assert first.counts("alpha")["changed"] >= 6
    assert again.counts("alpha")["changed"] == 0 and again.counts("alpha")["failed"] == 0


def test_a_run_killed_mid_step_converges_when_rerun(hosts, isolated, tmp_path):
    inv, _ = hosts(("bravo", "127.0.0.32"))
    record_dir = isolated.state_dir / "provision"
    proc = subprocess.Popen([sys.executable, "-m", "invoke", "provision", "--host", "bravo", "--inventory",
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


def test_bad_inventory_and_unreachable_host_are_clear(tmp_path, isolated):
    bad = tmp_path / "inventory.yaml"
    bad.write_text(yaml.safe_dump({"hosts": {"gpu1": {"address": "10.0.0.5", "port": 70000}}}))
    with pytest.raises(ConfigError, match=r"inventory.yaml: hosts.gpu1.port: Input should be less than"):
        load_inventory(bad)
    bad.write_text(yaml.safe_dump({"hosts": {"gpu1": {"address": "a b"}}, "groups": {"g": ["gpu2"]}}))
    with pytest.raises(ConfigError) as err:
        load_inventory(bad)
    assert "inventory.yaml: hosts.gpu1.address: not a host name or IP address" in str(err.value)
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump({"hosts": {"ghost": {"address": "127.0.0.99", "port": 2299}}}))
    record, _ = provision(select(load_inventory(ok), "ghost"), steps=[])
    assert record.results[0].status == "failed"
    assert "ghost (127.0.0.99:2299): cannot connect" in record.results[0].detail


HOSTILE = st.text(alphabet=string.printable + "ü€", min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(HOSTILE)
def test_hostile_values_never_execute(tmp_path_factory, value):
    """Either validation rejects the value, or it reaches the shell as one inert word."""
    marker = tmp_path_factory.getbasetemp() / "pwned"
    inv = {"hosts": {"h": {"address": "127.0.0.1", "vars": {"model": value, "prefix": "/opt/" + value}}},
           "groups": {"g": ["h"]}}
    path = tmp_path_factory.getbasetemp() / "hostile.yaml"
    path.write_text(yaml.safe_dump(inv))
    try:
        load_inventory(path)
        accepted = True
    except ConfigError:
        accepted = False
    if accepted:
        assert all(c.isalnum() or c in "._-/" for c in value)
    inventory = load_inventory(path) if accepted else _empty()
    for spec in (value, f"g,{value}"):
        try:
            chosen = select(inventory, spec)
        except ConfigError:
            continue
        assert all(re.match(NAME, t.name) and ADDRESS.match(t.entry.address) for t in chosen)
    attack = value + f"; touch {marker}"
    out = subprocess.run(["bash", "-c", f"printf %s {q(attack)}"], capture_output=True)
    assert out.stdout == attack.encode() and not marker.exists()


def _empty():
    from provision.inventory import Inventory

    return Inventory()


def test_an_ssh_config_alias_works_as_host(hosts, tmp_path, isolated):
    import os

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
