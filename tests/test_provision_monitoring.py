"""The monitoring step without hosts: captured output -> facts, and facts -> typed changes (none
when converged, only the drifted part otherwise); the generated configs pass promtool and amtool."""
from __future__ import annotations

import fnmatch
import tarfile
from pathlib import Path

import pytest
import yaml

from model.catalog import load_catalog
from model.plan import shape_from_catalog
from monitoring.alloy import AlloyTargets
from monitoring.promtool import check_alertmanager_config, check_config
from monitoring.settings import AlertParams, MonitoringSettings
from provision import facts as F
from provision.artifacts import app_bundle
from provision.core import Host, StepFailed, q, run_step
from provision.inventory import HostEntry, HostVars, Target
from provision.steps import modelfiles, services
from provision.steps import monitoring as M
from provision.steps.base import InstallPackages, sha256_text

ON = {"monitoring": {"enabled": True}}


def formats(tmp_path: Path) -> dict[str, modelfiles.ModelFiles]:
    entry = load_catalog().model("smollm2-135m")
    fmt = next(iter(entry.formats))
    spec = entry.formats[fmt]
    files = tuple(modelfiles.ModelFile(tmp_path / f.name, f.name, f.sha256) for f in spec.files)
    return {"llamacpp": modelfiles.ModelFiles("smollm2-135m", fmt, files, spec,
                                              shape_from_catalog(entry.architecture))}


def host(facts: dict, **vars_) -> Host:
    entry = HostEntry(address="127.0.0.61", vars=HostVars(**(ON | vars_)))
    return Host.offline(Target(name="box", entry=entry), facts)


def gpu_facts(dcgm: bool = False) -> dict:
    return {F.NvidiaHardware(): True, F.HttpStatus("http://127.0.0.1:9400/metrics"): 200 if dcgm else None}


def converged(step: M.MonitoringStep, base: dict | None = None, systemd: bool = False, **vars_) -> dict:
    """The facts of a host where every package is installed and every service runs as generated."""
    facts = dict(base or {})
    specs = step.specs(host(facts, **vars_))
    prefix = HostVars(**(ON | vars_)).prefix
    facts |= {F.DebPackages(M.MONITORING_PACKAGES): {p: "2.42" for p in M.MONITORING_PACKAGES},
              F.SystemdIsInit(): systemd,
              F.Sha256s(tuple(p for s in specs for p in s.files)): {
                  p: sha256_text(t) for s in specs for p, t in s.files.items()}}
    if systemd:
        facts[F.SystemdUnits(M.PACKAGE_UNITS)] = {u: F.UnitState(False, False) for u in M.PACKAGE_UNITS}
    for s in specs:
        facts[F.FileText(f"{prefix}/etc/{s.unit}.identity")] = s.identity()
        facts[F.Service(s.unit, f"{prefix}/run/{s.unit}.pid")] = F.ServiceProcess(4242, True, s.argv)
    return facts


def spec_of(step: M.MonitoringStep, h: Host, unit: str) -> services.ServiceSpec:
    return next(s for s in step.specs(h) if s.unit == unit)


def kinds(todo) -> list[tuple[str, str]]:
    return [(type(c).__name__, getattr(c, "unit", "")) for c in todo]


# Facts

def test_systemd_units_reads_enabled_and_active_and_takes_an_unknown_unit_for_neither():
    fact = F.SystemdUnits(("prometheus", "prometheus-node-exporter", "nosuch"))
    out = "prometheus|enabled|active\nprometheus-node-exporter|disabled|inactive\nnosuch||\n"
    assert fact.process(0, out) == {"prometheus": F.UnitState(True, True),
                                    "prometheus-node-exporter": F.UnitState(False, False),
                                    "nosuch": F.UnitState(False, False)}
    assert fact.process(1, "") == {u: F.UnitState(False, False) for u in fact.units}


def test_systemd_units_quotes_the_unit_names():
    hostile = "x; touch /tmp/pwned"
    assert q(hostile) in F.SystemdUnits((hostile,)).command()


# When the step runs

def test_a_cpu_only_host_gets_no_monitoring_unless_the_inventory_turns_it_on(tmp_path):
    step = M.MonitoringStep(formats(tmp_path))
    plain = Host.offline(Target(name="box", entry=HostEntry(address="127.0.0.61")), {})
    assert "vars.monitoring.enabled" in step.skip_reason(plain)
    assert step.skip_reason(host({})) is None
    assert step.skip_reason(host({}, profile="dgx-spark", monitoring={})) is None
    assert "is false" in step.skip_reason(host({}, profile="dgx-spark", monitoring={"enabled": False}))


def test_the_inventory_refuses_two_monitoring_services_on_one_port():
    with pytest.raises(ValueError, match="exporter_port 9090 is also prometheus_port"):
        HostVars(monitoring={"exporter_port": 9090})


# Changes

def test_a_bare_host_gets_the_packages_then_every_service_in_start_order(tmp_path):
    step = M.MonitoringStep(formats(tmp_path))
    facts = {F.DebPackages(M.MONITORING_PACKAGES): {}, F.SystemdIsInit(): False}
    specs = step.specs(host({}))
    prefix = "/opt/dgxready"
    facts[F.Sha256s(tuple(p for s in specs for p in s.files))] = {}
    for s in specs:
        facts[F.FileText(f"{prefix}/etc/{s.unit}.identity")] = None
        facts[F.Service(s.unit, f"{prefix}/run/{s.unit}.pid")] = F.ServiceProcess(None, False)
    todo = step.check(host(facts))
    (packages,) = todo.of(InstallPackages)
    assert packages.packages == M.MONITORING_PACKAGES
    assert [c.unit for c in todo.of(services.StartService)] == list(M.UNITS)
    assert [c.unit for c in todo.of(services.InstallService)] == list(M.UNITS)
    assert not todo.of(M.DisablePackageUnits)


def test_a_converged_host_has_nothing_to_do(tmp_path):
    step = M.MonitoringStep(formats(tmp_path))
    result = run_step(step, host(converged(step)), dry_run=True)
    assert (result.status, result.detail) == ("ok", "no change")


def test_a_hand_edited_prometheus_config_restarts_only_prometheus(tmp_path):
    step = M.MonitoringStep(formats(tmp_path))
    facts = converged(step)
    config = "/opt/dgxready/etc/monitoring/prometheus.yml"
    (sha_fact,) = [f for f in facts if isinstance(f, F.Sha256s)]
    facts[sha_fact] = facts[sha_fact] | {config: "0" * 64}
    todo = step.check(host(facts))
    assert kinds(todo) == [("InstallService", M.PROMETHEUS_UNIT), ("StartService", M.PROMETHEUS_UNIT)]
    assert "differs from the generated one" in todo.of(services.StartService)[0].reason


def test_a_lowered_slo_rewrites_the_rules_and_restarts_only_prometheus(tmp_path):
    facts = converged(M.MonitoringStep(formats(tmp_path)))
    lowered = M.MonitoringStep(formats(tmp_path),
                               settings=MonitoringSettings(alerts=AlertParams(slo_p95_e2e_s=2)))
    todo = lowered.check(host(facts))
    assert kinds(todo) == [("InstallService", M.PROMETHEUS_UNIT), ("StartService", M.PROMETHEUS_UNIT)]
    assert "command, files or unit changed" in todo.of(services.StartService)[0].reason


def test_a_stopped_exporter_is_started_and_nothing_else(tmp_path):
    step = M.MonitoringStep(formats(tmp_path))
    facts = converged(step) | {F.Service(M.EXPORTER_UNIT, f"/opt/dgxready/run/{M.EXPORTER_UNIT}.pid"):
                               F.ServiceProcess(None, False)}
    assert kinds(step.check(host(facts))) == [("StartService", M.EXPORTER_UNIT)]


def test_new_toolkit_code_restarts_the_exporter_and_the_webhook_only(tmp_path):
    facts = converged(M.MonitoringStep(formats(tmp_path), "a" * 64))
    todo = M.MonitoringStep(formats(tmp_path), "b" * 64).check(host(facts))
    assert {c.unit for c in todo.of(services.StartService)} == {M.EXPORTER_UNIT, M.WEBHOOK_UNIT}


def test_a_missing_package_is_installed_without_touching_the_running_services(tmp_path):
    step = M.MonitoringStep(formats(tmp_path))
    facts = converged(step) | {F.DebPackages(M.MONITORING_PACKAGES): {"prometheus": "2.42"}}
    assert kinds(step.check(host(facts))) == [("InstallPackages", "")]
    assert step.check(host(facts)).of(InstallPackages)[0].packages == M.MONITORING_PACKAGES[1:]


def test_debians_own_units_are_stopped_on_a_systemd_host(tmp_path):
    step = M.MonitoringStep(formats(tmp_path))
    facts = converged(step, systemd=True)
    assert not step.check(host(facts))
    facts[F.SystemdUnits(M.PACKAGE_UNITS)] = {"prometheus": F.UnitState(True, True),
                                              "prometheus-alertmanager": F.UnitState(False, False),
                                              "prometheus-node-exporter": F.UnitState(True, False)}
    (disable,) = step.check(host(facts))
    assert disable == M.DisablePackageUnits(("prometheus", "prometheus-node-exporter"))


# What Prometheus and Alertmanager are given

def scrape_jobs_docs(step: M.MonitoringStep, h: Host) -> list[dict]:
    spec = spec_of(step, h, M.PROMETHEUS_UNIT)
    return yaml.safe_load(spec.files["/opt/dgxready/etc/monitoring/prometheus.yml"])["scrape_configs"]


def scrape_jobs(step: M.MonitoringStep, h: Host) -> dict[str, list[str]]:
    return {j["job_name"]: [t for c in j["static_configs"] for t in c["targets"]]
            for j in scrape_jobs_docs(step, h)}


def test_prometheus_scrapes_the_hosts_engine_multiplexer_exporter_node_exporter_and_alertmanager(tmp_path):
    step = M.MonitoringStep(formats(tmp_path))
    jobs = scrape_jobs(step, host({}, serve_port=8123, mux_port=8191))
    assert jobs == {"dgxready-exporter": ["127.0.0.1:9401"], "node": ["127.0.0.1:9100"],
                    "multiplexer": ["127.0.0.61:8191"], "alertmanager": ["127.0.0.1:9093"],
                    "engine": ["127.0.0.1:8123"]}


def test_dcgm_exporter_is_scraped_only_on_an_nvidia_host_where_it_answers(tmp_path):
    step = M.MonitoringStep(formats(tmp_path))
    assert "dcgm" in scrape_jobs(step, host(gpu_facts(dcgm=True), profile="generic-nvidia"))
    assert "dcgm" not in scrape_jobs(step, host(gpu_facts(dcgm=False), profile="generic-nvidia"))
    assert "dcgm" not in scrape_jobs(step, host({}))


def test_an_exposed_llama_server_is_scraped_with_its_api_key_file(tmp_path):
    step = M.MonitoringStep(formats(tmp_path))
    (engine,) = [j for j in scrape_jobs_docs(step, host({}, serve_host="0.0.0.0")) if j["job_name"] == "engine"]
    assert engine["authorization"]["credentials_file"] == "/opt/dgxready/etc/engine-api-key"
    assert all("authorization" not in j for j in scrape_jobs_docs(step, host({})))


def test_the_generated_configs_pass_promtool_and_amtool(tmp_path):
    prefix = str(tmp_path / "opt")
    step = M.MonitoringStep(formats(tmp_path))
    h = host({}, prefix=prefix, serve_host="0.0.0.0")
    (tmp_path / "opt/etc").mkdir(parents=True)
    (tmp_path / "opt/etc/engine-api-key").write_text("k\n")
    for spec in step.specs(h):
        for path, text in spec.files.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
    prometheus = check_config(Path(prefix) / "etc/monitoring/prometheus.yml")
    assert prometheus.ok, prometheus.describe()
    alertmanager = check_alertmanager_config(Path(prefix) / "etc/monitoring/alertmanager.yml")
    assert alertmanager.ok, alertmanager.describe()


def test_alertmanager_posts_to_the_hosts_webhook(tmp_path):
    step = M.MonitoringStep(formats(tmp_path))
    spec = spec_of(step, host({}, monitoring={"enabled": True, "webhook_port": 9777}), M.ALERTMANAGER_UNIT)
    doc = yaml.safe_load(spec.files["/opt/dgxready/etc/monitoring/alertmanager.yml"])
    assert doc["receivers"][0]["webhook_configs"][0]["url"] == "http://127.0.0.1:9777/alerts"


def test_the_exporter_and_webhook_run_from_the_toolkits_venv_as_the_service_user(tmp_path):
    step = M.MonitoringStep(formats(tmp_path))
    h = host({}, mux_port=8191)
    exporter, webhook = spec_of(step, h, M.EXPORTER_UNIT), spec_of(step, h, M.WEBHOOK_UNIT)
    assert exporter.argv[:3] == ("/opt/dgxready/venv/bin/python", "-m", "monitoring.exporter")
    assert exporter.argv[exporter.argv.index("--mux-url") + 1] == "http://127.0.0.61:8191"
    alerts = webhook.argv[webhook.argv.index("--log") + 1]
    assert fnmatch.fnmatch(alerts, AlloyTargets().log_glob), "Alloy would not ship the alert log to Loki"
    assert {exporter.user, webhook.user} == {"dgxready"}
    assert exporter.environment["PYTHONPATH"] == "/opt/dgxready/app"


def test_the_app_bundle_carries_the_exporter_and_what_it_imports(tmp_path):
    bundle = app_bundle(tmp_path)
    with tarfile.open(bundle.tarball) as tar:
        names = set(tar.getnames())
    assert {"monitoring/exporter.py", "monitoring/webhook.py", "model/serve.py", "model/gpu.py"} <= names
    assert not any("benchmarks" in n for n in names)


# Grafana, Loki and Alloy (untested against a real host: no systemd and no apt.grafana.com here)

def grafana_facts(step: M.MonitoringStep, **state) -> dict:
    h = host({}, monitoring={"enabled": True, "grafana": True})
    files = M.grafana_files(h)
    facts = converged(step, systemd=True) | {
        F.FileText(M.GRAFANA_SOURCES): M.GRAFANA_SOURCE_LINE, F.FileExists(M.GRAFANA_KEYRING): True,
        F.DebPackages(M.GRAFANA_PACKAGES): {p: "1" for p in M.GRAFANA_PACKAGES},
        F.Sha256s(tuple(files)): {p: sha256_text(t) for p, t in files.items()},
        F.SystemdUnits(M.GRAFANA_UNITS): {u: F.UnitState(True, True) for u in M.GRAFANA_UNITS}}
    return facts | state


def grafana_host(facts: dict) -> Host:
    return host(facts, monitoring={"enabled": True, "grafana": True})


def test_grafana_is_refused_where_pid_1_is_not_systemd(tmp_path):
    step = M.MonitoringStep(formats(tmp_path))
    facts = converged(step) | {F.SystemdIsInit(): False}
    with pytest.raises(StepFailed, match="box: vars.monitoring.grafana: .* PID 1 here is not systemd"):
        step.check(grafana_host(facts))


def test_grafana_on_a_systemd_host_gets_the_repository_packages_provisioning_and_units(tmp_path):
    step = M.MonitoringStep(formats(tmp_path))
    bare = grafana_facts(step) | {
        F.FileText(M.GRAFANA_SOURCES): None, F.FileExists(M.GRAFANA_KEYRING): False,
        F.DebPackages(M.GRAFANA_PACKAGES): {}}
    sha_fact = next(f for f in bare if isinstance(f, F.Sha256s) and M.GRAFANA_SOURCES not in f.paths
                    and any(p.startswith("/etc/grafana") for p in f.paths))
    bare[sha_fact] = {}
    bare[F.SystemdUnits(M.GRAFANA_UNITS)] = {u: F.UnitState(False, False) for u in M.GRAFANA_UNITS}
    todo = step.check(grafana_host(bare))
    assert [type(c).__name__ for c in todo] == ["AddGrafanaRepository", "InstallPackages", "UploadFiles",
                                                "StartPackageUnits"]
    (upload,) = todo.of(M.UploadFiles)
    assert "/etc/grafana/provisioning/datasources/dgxready.yaml" in upload.paths
    assert "/var/lib/grafana/dashboards/dgxready/dgxready-overview.json" in upload.paths
    assert todo.of(M.StartPackageUnits)[0].units == M.GRAFANA_UNITS
    assert not step.check(grafana_host(grafana_facts(step)))


def test_a_changed_dashboard_is_uploaded_and_restarts_grafana_only(tmp_path):
    step = M.MonitoringStep(formats(tmp_path))
    facts = grafana_facts(step)
    sha_fact = next(f for f in facts if isinstance(f, F.Sha256s) and any(p.startswith("/etc/grafana")
                                                                         for p in f.paths))
    overview = "/var/lib/grafana/dashboards/dgxready/dgxready-overview.json"
    facts[sha_fact] = facts[sha_fact] | {overview: "0" * 64}
    todo = step.check(grafana_host(facts))
    assert todo.of(M.UploadFiles) == [M.UploadFiles((overview,))]
    assert todo.of(M.StartPackageUnits)[0].units == ("grafana-server",)


def test_grafanas_prometheus_datasource_is_the_hosts_prometheus(tmp_path):
    h = host({}, monitoring={"enabled": True, "grafana": True, "prometheus_port": 9191})
    doc = yaml.safe_load(M.grafana_files(h)["/etc/grafana/provisioning/datasources/dgxready.yaml"])
    urls = {d["type"]: d["url"] for d in doc["datasources"]}
    assert urls == {"prometheus": "http://127.0.0.1:9191", "loki": "http://127.0.0.1:3100"}
