"""Provisioning without hosts or root, the pyinfra way: captured command output -> fact, and
facts -> typed changes (empty when the host is converged). Nothing here opens a connection."""
from __future__ import annotations

import json
import re
import string
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dgxready.errors import ConfigError, DgxReadyError
from model.catalog import load_catalog
from model.plan import shape_from_catalog
from provision import facts as F
from provision.core import Host, StepFailed, q, run_step
from provision.inventory import ADDRESS, NAME, HostEntry, HostVars, Inventory, Target, load_inventory, select
from provision.run import engines_for, provision
from provision.steps import engine, modelfiles, services, system, validate
from provision.steps.base import InstallPackages, sha256_text
from provision.steps.system import SSHD_CONF, SSHD_HARDENING

GB10_SMI = "NVIDIA GB10, 580.95.05, 12.1, [N/A], [N/A]\n"
H100_SMI = "NVIDIA H100 80GB HBM3, 570.86.15, 9.0, 81559, 80000\n"
MEMINFO = "MemTotal:       125000000 kB\nMemAvailable:   120000000 kB\n"


def target(**vars_) -> Target:
    return Target(name="box", entry=HostEntry(address="127.0.0.61", vars=HostVars(**vars_)))


def offline(facts: dict, **vars_) -> Host:
    return Host.offline(target(**vars_), facts)


# Facts: captured output -> typed value.

def test_deb_packages_counts_only_fully_installed_ones():
    out = ("curl 7.88.1-10 installed\nsudo 1.9.13 config-files\nprocps 2:4.0.2-3 half-configured\n"
           "libssl3:amd64 3.0.15-1 installed\n")
    assert F.DebPackages(("curl", "sudo")).process(1, out) == {"curl": "7.88.1-10", "libssl3": "3.0.15-1"}
    assert F.DebPackages(("curl",)).process(1, "") == {}


def test_nvidia_smi_reads_gb10_unified_memory_as_unknown():
    state = F.NvidiaSmi().process(0, GB10_SMI)
    assert state.answered and state.gpus[0].compute_capability == (12, 1)
    assert state.gpus[0].memory_total_bytes is None and state.gpus[0].memory_free_bytes is None


def test_nvidia_smi_reads_discrete_gpu_memory_in_bytes():
    gpu = F.NvidiaSmi().process(0, H100_SMI).gpus[0]
    assert gpu.memory_total_bytes == 81559 * 1024 * 1024 and gpu.compute_capability == (9, 0)


def test_nvidia_smi_reports_a_driver_mismatch_and_odd_output():
    broken = F.NvidiaSmi().process(18, "Failed to initialize NVML: Driver/library version mismatch\n")
    assert not broken.answered and broken.driver_mismatch
    odd = F.NvidiaSmi().process(0, "something unexpected\n")
    assert not odd.answered and "unexpected nvidia-smi line" in odd.error
    assert not F.NvidiaSmi().process(127, "bash: nvidia-smi: command not found").driver_mismatch


def test_meminfo_needs_both_lines():
    assert F.MemInfo().process(0, MEMINFO) == (125000000 * 1024, 120000000 * 1024)
    with pytest.raises(ValueError, match="MemAvailable"):
        F.MemInfo().process(0, "MemTotal: 1 kB\n")


def test_sha256s_lists_only_files_that_exist():
    digest = "a" * 64
    out = f"{digest}  /opt/x/bin/llama-server\n"
    assert F.Sha256s(("/opt/x/bin/llama-server", "/opt/x/bin/llama-bench")).process(1, out) == {
        "/opt/x/bin/llama-server": digest}


def test_python_distributions_normalise_names_and_miss_a_missing_venv():
    out = "PyYAML 6.0.2\nprometheus_client 0.21.0\n"
    assert F.PythonDistributions("/v/bin/python").process(0, out) == {"pyyaml": "6.0.2",
                                                                      "prometheus-client": "0.21.0"}
    assert F.PythonDistributions("/v/bin/python").process(1, "") is None


def test_service_process_is_alive_only_with_a_live_pid():
    out = "pid=4242\nalive\n/opt/bin/llama-server\n-m\n/m.gguf\n"
    proc = F.Service("u", "/p").process(0, out)
    assert proc.alive and proc.pid == 4242 and proc.argv == ("/opt/bin/llama-server", "-m", "/m.gguf")
    assert not F.Service("u", "/p").process(0, "pid=4242\n").alive
    assert F.Service("u", "/p").process(0, "pid=0\n") == F.ServiceProcess(None, False)
    assert F.Service("u", "/p").process(0, "pid=\n") == F.ServiceProcess(None, False)


def test_small_facts_parse_their_answers():
    assert F.Machine().process(0, "aarch64\n") == "aarch64"
    assert F.SystemdIsInit().process(0, "systemd\n") and not F.SystemdIsInit().process(0, "sshd\n")
    assert F.UserExists("dgx").process(0, "998\n") and not F.UserExists("dgx").process(1, "")
    assert F.FileText("/x").process(1, "") is None and F.FileText("/x").process(0, "v1") == "v1"
    assert F.HttpStatus("http://x").process(7, "000") is None
    assert F.HttpStatus("http://x").process(0, "401") == 401
    assert F.TcpAccepts("127.0.0.1", 1).process(1, "") is False
    assert F.MultiplexerChat("/p", "u", "k").process(0, "OK\n") == F.ChatReply(True, "OK")
    assert not F.MultiplexerChat("/p", "u", "k").process(1, "HTTPError: 401").ok


def test_every_fact_command_quotes_its_arguments():
    hostile = "/opt/x; touch /tmp/pwned"
    for fact in (F.FileText(hostile), F.Sha256s((hostile,)), F.IsDirectory(hostile), F.UserExists(hostile),
                 F.DebPackages((hostile,)), F.DockerImage(hostile), F.Service(hostile, hostile)):
        assert q(hostile) in fact.command()


# Steps: facts -> changes.

def converged_base() -> dict:
    return {F.DebPackages((*system.BASE_PACKAGES, *system.SSL_PACKAGES)):
            {p: "1" for p in (*system.BASE_PACKAGES, "libssl3t64")}}


def test_base_packages_install_only_what_is_missing():
    assert not system.BasePackages().check(offline(converged_base()))
    todo = system.BasePackages().check(offline({
        F.DebPackages((*system.BASE_PACKAGES, *system.SSL_PACKAGES)): {"curl": "1"},
        F.AptHasPackage("libssl3t64"): False}))
    (change,) = todo.of(InstallPackages)
    assert "curl" not in change.packages and "sudo" in change.packages and change.packages[-1] == "libssl3"


def test_user_and_sshd_changes_are_typed_and_vanish_when_converged():
    v = HostVars()
    done = {F.UserExists(v.service_user): True, F.IsDirectory(v.prefix): True,
            F.Sha256s((SSHD_CONF,)): {SSHD_CONF: sha256_text(SSHD_HARDENING)}}
    assert not system.UserAndSsh().check(offline(done))
    fresh = {F.UserExists(v.service_user): False, F.IsDirectory(v.prefix): False, F.Sha256s((SSHD_CONF,)): {}}
    kinds = [type(c) for c in system.UserAndSsh().check(offline(fresh))]
    assert kinds == [system.CreateUser, system.CreateDirectory, system.WriteSshdHardening]


def test_nvidia_driver_skips_cpu_hosts_and_fails_on_a_mismatch():
    step = system.NvidiaDriver()
    assert "cpu-only" in step.skip_reason(offline({}))
    assert "no NVIDIA GPU" in step.skip_reason(offline({F.NvidiaHardware(): False}, profile="generic-nvidia"))
    mismatch = offline({F.NvidiaSmi(): F.NvidiaSmi().process(18, "Driver/library version mismatch")},
                       profile="generic-nvidia")
    with pytest.raises(StepFailed, match="box: driver/NVML version mismatch: reboot"):
        step.check(mismatch)
    missing = F.NvidiaSmi().process(127, "command not found")
    assert step.check(offline({F.NvidiaSmi(): missing}, profile="generic-nvidia")).of(system.InstallDriver)
    with pytest.raises(StepFailed, match="DGX OS should ship the driver"):
        step.check(offline({F.NvidiaSmi(): missing}, profile="dgx-spark"))
    assert not step.check(offline({F.NvidiaSmi(): F.NvidiaSmi().process(0, GB10_SMI)}, profile="dgx-spark"))


def test_docker_wants_the_toolkit_only_on_nvidia_hardware():
    step = system.Docker()
    gpu = {F.CommandExists("docker"): True, F.NvidiaHardware(): True, F.CommandExists("nvidia-ctk"): False}
    assert step.check(offline(gpu, profile="dgx-spark")).of(system.InstallContainerToolkit)
    none = {F.CommandExists("docker"): False, F.NvidiaHardware(): False}
    assert [c.packages for c in step.check(offline(none, profile="generic-nvidia")).of(InstallPackages)] == [
        ("docker.io",)]
    assert step.skip_reason(offline({})) == "profile cpu-only: containers not used"


def test_python_env_installs_missing_and_outdated_pins_and_ships_changed_code(tmp_path):
    app = system.AppBundle(tmp_path / "app.tar.gz", "b" * 64)
    step = system.PythonEnv(("pyyaml==6.0.2", "orjson==3.10.0"), app)
    py, stamp = "/opt/dgxready/venv/bin/python", "/opt/dgxready/app/.bundle-sha256"
    have = {F.PythonDistributions(py): {"pyyaml": "6.0.2", "orjson": "3.9.0"}, F.FileText(stamp): "b" * 64}
    (pip,) = step.check(offline(have)).of(system.PipInstall)
    assert pip.pins == ("orjson==3.10.0",)
    fresh = step.check(offline({F.PythonDistributions(py): None, F.FileText(stamp): None}))
    assert [type(c) for c in fresh] == [system.CreateVenv, system.PipInstall, system.ShipApp]
    have[F.PythonDistributions(py)] = {"pyyaml": "6.0.2", "orjson": "3.10.0"}
    assert not step.check(offline(have))


@pytest.fixture
def llama_build(tmp_path) -> engine.LlamaBuild:
    for name in engine.TARGETS:
        (tmp_path / name).write_bytes(name.encode())
    return engine.LlamaBuild(tmp_path, "x86_64", tmp_path / "llama_cpp_python-0.3.36.tar.gz")


def test_llama_cpp_ships_only_stale_binaries_to_a_same_arch_host(llama_build):
    step = engine.LlamaCpp(llama_build)
    paths = tuple(f"/opt/dgxready/bin/{b}" for b in engine.TARGETS)
    good = {p: step.digests[b] for p, b in zip(paths, engine.TARGETS, strict=True)}
    host = offline({F.Machine(): "x86_64", F.Sha256s(paths): good})
    assert not step.check(host)
    stale = dict(good, **{paths[0]: "0" * 64})
    (ship,) = step.check(offline({F.Machine(): "x86_64", F.Sha256s(paths): stale})).of(engine.ShipBinaries)
    assert ship.names == ("llama-server",)


def test_llama_cpp_builds_on_a_host_of_another_architecture(llama_build):
    step = engine.LlamaCpp(llama_build)
    paths = tuple(f"/opt/dgxready/bin/{b}" for b in engine.TARGETS)
    host = offline({F.Machine(): "aarch64", F.Sha256s(paths): {},
                    F.FileText("/opt/dgxready/bin/.llama-build"): None})
    (build,) = step.check(host).of(engine.BuildOnHost)
    assert build.sdist == "llama_cpp_python-0.3.36.tar.gz"
    built = {F.Machine(): "aarch64", F.Sha256s(paths): {p: "c" * 64 for p in paths},
             F.FileText("/opt/dgxready/bin/.llama-build"): "llama_cpp_python-0.3.36.tar.gz"}
    assert not step.check(offline(built))


def test_vllm_image_is_pulled_only_where_vllm_serves_from_it():
    step = engine.VllmImage("nvcr.io/nvidia/vllm:25.10-py3")
    assert step.skip_reason(offline({})) and step.skip_reason(offline({}, profile="dgx-spark", vllm="venv"))
    host = offline({F.DockerImage(step.image): False}, profile="dgx-spark")
    assert step.check(host).of(engine.PullImage)


def model_formats(tmp_path: Path, *engines: str) -> dict[str, modelfiles.ModelFiles]:
    catalog = load_catalog()
    out = {}
    wanted = {"llamacpp": ("smollm2-135m", None), "vllm": ("mistral-7b-instruct-v0.3", "fp8")}
    for eng, (model, fmt) in wanted.items():
        if eng not in engines:
            continue
        entry = catalog.model(model)
        fmt = fmt or next(iter(entry.formats))
        spec = entry.formats[fmt]
        files = tuple(modelfiles.ModelFile(tmp_path / f.name, f.name, f.sha256) for f in spec.files)
        out[eng] = modelfiles.ModelFiles(model, fmt, files, spec,
                                         shape_from_catalog(entry.architecture))
    return out


def test_model_files_ship_only_what_does_not_verify(tmp_path):
    formats = model_formats(tmp_path, "llamacpp")
    step = modelfiles.ModelStep(formats)
    fmt = formats["llamacpp"]
    remote = tuple(f"{fmt.remote_dir('/opt/dgxready')}/{f.rel}" for f in fmt.files)
    assert step.check(offline({F.Sha256s(remote): {}})).of(modelfiles.ShipModelFiles)
    good = {r: f.sha256 for r, f in zip(remote, fmt.files, strict=True)}
    assert not step.check(offline({F.Sha256s(remote): good}))


def engine_facts(spec: services.ServiceSpec | None = None, smi: str = "", alive: bool = True,
                 prefix: str = "/opt/dgxready") -> dict:
    unit = services.EngineService.unit
    proc = F.ServiceProcess(4242, alive, spec.argv if spec else ())
    return {F.NvidiaSmi(): F.NvidiaSmi().process(0 if smi else 127, smi),
            F.MemInfo(): F.MemInfo().process(0, MEMINFO),
            F.FileText(f"{prefix}/etc/{unit}.identity"): spec.identity() if spec else None,
            F.Service(unit, f"{prefix}/run/{unit}.pid"): proc}


def test_cpu_host_engine_is_llama_server_on_loopback_and_converges(tmp_path):
    step = services.EngineService(model_formats(tmp_path, "llamacpp"), "img")
    spec = step.spec(offline(engine_facts(), parallel=4, threads=1))
    argv = spec.argv
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and "--api-key-file" not in argv
    assert argv[argv.index("-ngl") + 1] == "0" and argv[argv.index("-np") + 1] == "4"
    assert [type(c) for c in step.check(offline(engine_facts(alive=False), parallel=4, threads=1))] == [
        services.InstallService, services.StartService]
    assert not step.check(offline(engine_facts(spec), parallel=4, threads=1))


def test_an_engine_bound_beyond_loopback_gets_an_api_key(tmp_path):
    step = services.EngineService(model_formats(tmp_path, "llamacpp"), "img")
    facts = engine_facts() | {F.FileExists("/opt/dgxready/etc/engine-api-key"): False}
    host = offline(facts, serve_host="0.0.0.0")
    assert "--api-key-file" in step.spec(host).argv
    assert step.check(host).of(services.CreateSecret)


def test_a_changed_model_or_command_restarts_the_engine(tmp_path):
    step = services.EngineService(model_formats(tmp_path, "llamacpp"), "img")
    old = step.spec(offline(engine_facts(), parallel=2))
    todo = step.check(offline(engine_facts(old), parallel=4))
    (start,) = todo.of(services.StartService)
    assert "restart" in start.reason and todo.of(services.InstallService)


def test_dgx_spark_engine_is_vllm_with_the_planned_flags_and_priority_scheduling(tmp_path):
    step = services.EngineService(model_formats(tmp_path, "llamacpp", "vllm"), "nvcr.io/nvidia/vllm:25.10")
    host = offline(engine_facts(smi=GB10_SMI), profile="dgx-spark", model="mistral-7b-instruct-v0.3",
                   parallel=10, ctx_per_slot=4096, kv_dtype="fp8")
    argv = step.spec(host).argv
    assert argv[:2] == ("docker", "run") and argv[argv.index("-p") + 1] == "127.0.0.1:8080:8000"
    flag = lambda name: argv[argv.index(name) + 1]  # noqa: E731
    assert flag("--scheduling-policy") == "priority" and flag("--max-num-seqs") == "10"
    assert flag("--kv-cache-dtype") == "fp8" and flag("--served-model-name") == "mistral-7b-instruct-v0.3"
    util = float(flag("--gpu-memory-utilization"))
    assert 0.05 <= util <= 120000000 / 125000000 * 0.95


def test_a_running_vllm_is_not_restarted_because_free_memory_moved(tmp_path):
    step = services.EngineService(model_formats(tmp_path, "llamacpp", "vllm"), "img")
    kw = dict(profile="dgx-spark", model="mistral-7b-instruct-v0.3", parallel=10, kv_dtype="fp8")
    running = step.spec(offline(engine_facts(smi=GB10_SMI), **kw))
    later = engine_facts(running, smi=GB10_SMI) | {F.MemInfo(): F.MemInfo().process(
        0, "MemTotal: 125000000 kB\nMemAvailable: 60000000 kB\n")}
    assert not step.check(offline(later, **kw))


def test_multiplexer_generates_keys_once_and_points_at_the_engine(tmp_path):
    step = services.MultiplexerService(model_formats(tmp_path, "llamacpp"))
    unit, prefix = services.MultiplexerService.unit, "/opt/dgxready"
    host = offline({F.FileExists(f"{prefix}/etc/agent-keys.yaml"): False,
                    F.FileText(f"{prefix}/etc/{unit}.identity"): None,
                    F.Service(unit, f"{prefix}/run/{unit}.pid"): F.ServiceProcess(None, False)},
                   serve_port=8123, mux_port=8191)
    todo = step.check(host)
    assert todo.of(services.GenerateAgentKeys)[0].count == 10
    config = yaml.safe_load(step.config_text(host))
    assert config["host"] == "127.0.0.61" and config["port"] == 8191
    backend = config["backends"][0]
    assert backend["url"] == "http://127.0.0.1:8123" and backend["kind"] == "llamacpp"
    assert "api_key_file" not in config["backends"][0]


def test_validate_fails_when_the_engine_port_is_open_outside_loopback():
    facts = {F.TcpAccepts("127.0.0.61", 8080): True}
    with pytest.raises(StepFailed, match="engine port 8080 accepts connections at 127.0.0.61"):
        validate.Validate().check(offline(facts))


def test_validate_chats_through_the_multiplexer_with_an_agent_key():
    chat = F.MultiplexerChat("/opt/dgxready/venv/bin/python", "http://127.0.0.61:8090",
                             "/opt/dgxready/etc/agent-keys.yaml")
    facts = {F.TcpAccepts("127.0.0.61", 8080): False, chat: F.ChatReply(True, "OK")}
    assert not validate.Validate().check(offline(facts))
    facts[chat] = F.ChatReply(False, "HTTPError: HTTP Error 401: Unauthorized")
    with pytest.raises(StepFailed, match="multiplexer at http://127.0.0.61:8090 failed: HTTPError"):
        validate.Validate().check(offline(facts))


def test_run_step_reports_typed_changes_in_a_dry_run_and_ok_when_converged():
    would = run_step(system.BasePackages(), offline({
        F.DebPackages((*system.BASE_PACKAGES, *system.SSL_PACKAGES)): {}, F.AptHasPackage("libssl3t64"): True}),
        dry_run=True)
    assert would.status == "would change" and would.changes[0].startswith("install ca-certificates")
    assert run_step(system.BasePackages(), offline(converged_base()), dry_run=True).status == "ok"


def test_an_offline_host_names_a_fact_it_was_not_given():
    failed = run_step(system.Docker(), offline({}, profile="dgx-spark"), dry_run=True)
    assert failed.status == "failed" and "was not given to the offline host" in failed.detail


# The inventory and hostile values.

def test_bad_inventory_is_reported_with_file_and_field(tmp_path):
    bad = tmp_path / "inventory.yaml"
    bad.write_text(yaml.safe_dump({"hosts": {"gpu1": {"address": "10.0.0.5", "port": 70000}}}))
    with pytest.raises(ConfigError, match=r"inventory.yaml: hosts.gpu1.port: Input should be less than"):
        load_inventory(bad)
    bad.write_text(yaml.safe_dump({"hosts": {"gpu1": {"address": "a b"}}, "groups": {"g": ["gpu2"]}}))
    with pytest.raises(ConfigError) as err:
        load_inventory(bad)
    assert "inventory.yaml: hosts.gpu1.address: not a host name or IP address" in str(err.value)
    bad.write_text(yaml.safe_dump({"hosts": {"h": {"address": "h", "vars": {"serve_host": "1.2.3.4; rm"}}}}))
    with pytest.raises(ConfigError, match="hosts.h.vars.serve_host"):
        load_inventory(bad)


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
        inventory = load_inventory(path)
        assert all(c.isalnum() or c in "._-/" for c in value)
    except ConfigError:
        inventory = Inventory()
    for spec in (value, f"g,{value}"):
        try:
            chosen = select(inventory, spec)
        except ConfigError:
            continue
        assert all(re.match(NAME, t.name) and ADDRESS.match(t.entry.address) for t in chosen)
    attack = value + f"; touch {marker}"
    out = subprocess.run(["bash", "-c", f"printf %s {q(attack)}"], capture_output=True)
    assert out.stdout == attack.encode() and not marker.exists()


def test_an_unreachable_host_is_named_with_its_address(tmp_path, monkeypatch):
    monkeypatch.setenv("DGXREADY_STATE_DIR", str(tmp_path / "state"))
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump({"hosts": {"ghost": {"address": "127.0.0.99", "port": 2299}}}))
    record, _ = provision(select(load_inventory(ok), "ghost"), steps=[])
    assert record.results[0].status == "failed"
    assert "ghost (127.0.0.99:2299): cannot connect" in record.results[0].detail


def test_the_service_identity_is_stable_json():
    spec = services.ServiceSpec("u", "d", ("a", "--gpu-memory-utilization", "0.41"), None, "http://x/health")
    assert json.loads(spec.identity())["argv"] == ["a", "--gpu-memory-utilization", "*"]


def test_an_exposed_vllm_reads_its_key_from_a_file_never_from_argv(tmp_path):
    step = services.EngineService(model_formats(tmp_path, "llamacpp", "vllm"), "img")
    kw = dict(profile="dgx-spark", model="mistral-7b-instruct-v0.3", serve_host="0.0.0.0")
    argv = step.spec(offline(engine_facts(smi=GB10_SMI), **kw)).argv
    assert argv[argv.index("--env-file") + 1] == "/opt/dgxready/etc/engine-api-key.env"
    assert "--api-key" not in argv
    with pytest.raises(StepFailed, match="vLLM venv beyond loopback would run without an API key"):
        step.spec(offline(engine_facts(smi=GB10_SMI), vllm="venv", **kw))


def test_new_code_or_a_new_engine_binary_restarts_its_service(tmp_path):
    formats = model_formats(tmp_path, "llamacpp")
    old_engine = services.EngineService(formats, "img", "1" * 64).spec(offline(engine_facts()))
    new_engine = services.EngineService(formats, "img", "2" * 64)
    assert new_engine.check(offline(engine_facts(old_engine))).of(services.StartService)
    unit, prefix = services.MultiplexerService.unit, "/opt/dgxready"
    host_facts = {F.FileExists(f"{prefix}/etc/agent-keys.yaml"): True}
    old_mux = services.MultiplexerService(formats, "a" * 64).spec(offline(host_facts))
    proc = F.ServiceProcess(7, True, old_mux.argv)
    running = host_facts | {F.FileText(f"{prefix}/etc/{unit}.identity"): old_mux.identity(),
                            F.Service(unit, f"{prefix}/run/{unit}.pid"): proc}
    assert not services.MultiplexerService(formats, "a" * 64).check(offline(running))
    (start,) = services.MultiplexerService(formats, "b" * 64).check(offline(running)).of(services.StartService)
    assert "restart" in start.reason


def test_a_host_can_ask_for_the_fp8_checkpoint_and_a_wrong_or_split_format_names_the_host():
    mistral = "mistral-7b-instruct-v0.3"
    spark = target(profile="dgx-spark", model=mistral, model_format="fp8")
    cpu = target(profile="cpu-only", model=mistral)
    assert engines_for([spark, cpu], mistral) == {"vllm": "fp8", "llamacpp": None}
    with pytest.raises(DgxReadyError, match="box: vars.model_format: .* no vllm format 'gguf-q8_0'"):
        engines_for([target(profile="dgx-spark", model=mistral, model_format="gguf-q8_0")], mistral)
    other = Target(name="spark-2", entry=HostEntry(address="127.0.0.62", vars=HostVars(
        profile="dgx-spark", model=mistral, model_format="safetensors-bf16")))
    with pytest.raises(DgxReadyError, match="spark-2: vars.model_format: one vllm format per run"):
        engines_for([spark, other], mistral)
