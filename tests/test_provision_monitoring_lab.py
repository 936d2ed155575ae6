"""The monitoring step on a real disposable Debian host (debootstrap rootfs + sshd on 127.0.0.N, no
systemd): it converges, a second run changes nothing, and the host's Prometheus is ready and
scrapes every target. Grafana stays off: the lab has no way to apt.grafana.com."""
from __future__ import annotations

import time

import httpx
import pytest
import yaml

from dgxready.ports import free_port
from provision import lab
from provision.inventory import load_inventory, select
from provision.run import provision

pytestmark = pytest.mark.skipif(lab.available() is not None, reason=f"test hosts: {lab.available()}")

ADDRESS = "127.0.0.41"
JOBS = {"engine", "multiplexer", "dgxready-exporter", "node", "alertmanager"}


@pytest.fixture
def kilo(tmp_path, isolated):
    host = lab.make_host(tmp_path / "kilo", "kilo", ADDRESS)
    host.start()
    yield host
    host.destroy()


def monitoring_vars() -> dict:
    """Ports of their own: the lab hosts share this machine's network."""
    ports: set[int] = set()
    while len(ports) < 5:
        ports.add(free_port())
    names = ("prometheus_port", "alertmanager_port", "node_exporter_port", "exporter_port", "webhook_port")
    return {"enabled": True, **dict(zip(names, sorted(ports), strict=True))}


def target_health(prometheus: str) -> dict[str, str]:
    active = httpx.get(f"{prometheus}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    return {t["labels"]["job"]: t["health"] for t in active}


def wait_all_up(prometheus: str, timeout_s: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    health = {}
    while time.monotonic() < deadline:
        health = target_health(prometheus)
        if set(health) == JOBS and set(health.values()) == {"up"}:
            break
        time.sleep(1)
    return health


def test_the_monitoring_step_converges_then_changes_nothing_and_prometheus_scrapes_every_target(
        kilo, tmp_path, monkeypatch):
    config = tmp_path / "monitoring.yaml"
    config.write_text(yaml.safe_dump({"scrape_interval_s": 2, "evaluation_interval_s": 2}))
    monkeypatch.setenv("DGXREADY_MONITORING_CONFIG", str(config))
    mon = monitoring_vars()
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(yaml.safe_dump({"hosts": {"kilo": {
        "address": ADDRESS, "key": str(kilo.key), "vars": lab.lab_vars() | {"monitoring": mon}}}}))
    targets = select(load_inventory(inventory), "kilo")

    first, _ = provision(targets)
    results = {r.step: r for r in first.results}
    assert all(r.status != "failed" for r in first.results), [(r.step, r.detail) for r in first.results]
    assert results["monitoring"].status == "changed"
    assert "supervised process with a pidfile" in results["monitoring"].detail

    again, _ = provision(targets)
    moved = [(r.step, r.status, r.detail) for r in again.results if r.status not in ("ok", "skipped")]
    assert not moved, moved

    prometheus = f"http://127.0.0.1:{mon['prometheus_port']}"
    assert httpx.get(f"{prometheus}/-/ready", timeout=5).status_code == 200
    health = wait_all_up(prometheus)
    assert set(health) == JOBS and set(health.values()) == {"up"}, health
    assert (kilo.root / "opt/dgxready/etc/monitoring/prometheus.yml").exists()
