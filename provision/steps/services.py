"""The services on the host: the engine (vLLM or llama-server) bound to loopback unless the
inventory says otherwise, and the multiplexer in front of it with agent keys made on the host.
Each is a systemd unit; where PID 1 is not systemd the unit is still installed and the service
runs as a supervised process with a pidfile, and the step says so."""
from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass, field

import yaml

from model.backend import BackendChoice, VllmInstall
from model.gpu import GpuFacts
from model.memory import DROP_PAGE_CACHE_SH, MemoryBudget, budget_from
from model.plan import engine_kv_dtype, make_plan, require_fit
from model.serve import llamacpp_command, vllm_command
from model.systemd import render_unit
from provision.core import Changes, Host, Step, StepFailed, changes, q
from provision.facts import FileExists, FileText, HttpStatus, MemInfo, NvidiaSmi, Service, SystemdIsInit
from provision.steps.base import upload_text
from provision.steps.modelfiles import ModelFiles, host_engine

VOLATILE_FLAGS = ("--gpu-memory-utilization",)


@dataclass(frozen=True)
class ServiceSpec:
    unit: str
    description: str
    argv: tuple[str, ...]
    user: str | None
    health_url: str
    environment: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: int = 60
    revision: str = field(default="", metadata={"doc": "what else a restart depends on (binary, code)"})

    def identity(self) -> str:
        """What a restart depends on; values sized from free memory at start are left out, so
        a running engine is not restarted because it now holds that memory."""
        argv = list(self.argv)
        for i, arg in enumerate(argv[:-1]):
            if arg in VOLATILE_FLAGS:
                argv[i + 1] = "*"
        doc = {"argv": argv, "user": self.user, "env": self.environment, "revision": self.revision,
               "files": {p: hashlib.sha256(t.encode()).hexdigest() for p, t in sorted(self.files.items())}}
        return json.dumps(doc, sort_keys=True)

    def unit_text(self) -> str:
        return render_unit(self.unit, self.description, list(self.argv), user=self.user,
                           environment=self.environment)


def unit_path(unit: str) -> str:
    return f"/etc/systemd/system/{unit}.service"


def stamp_path(host: Host, unit: str) -> str:
    return f"{host.vars.prefix}/etc/{unit}.identity"


def pidfile(host: Host, unit: str) -> str:
    return f"{host.vars.prefix}/run/{unit}.pid"


def log_path(host: Host, unit: str) -> str:
    return f"{host.vars.prefix}/log/{unit}.log"


def masked(argv: tuple[str, ...]) -> tuple[str, ...]:
    return tuple("*" if i > 0 and argv[i - 1] in VOLATILE_FLAGS else a for i, a in enumerate(argv))


@dataclass(frozen=True)
class InstallService:
    unit: str

    def describe(self) -> str:
        return f"install {unit_path(self.unit)} and its files"


@dataclass(frozen=True)
class StartService:
    unit: str
    reason: str

    def describe(self) -> str:
        return f"start {self.unit} ({self.reason})"


def service_changes(host: Host, spec: ServiceSpec) -> Changes:
    installed = (host.fact(FileText(stamp_path(host, spec.unit))) or "") == spec.identity()
    proc = host.fact(Service(spec.unit, pidfile(host, spec.unit)))
    if not proc.alive:
        start = StartService(spec.unit, "not running")
    elif not installed:
        start = StartService(spec.unit, "restart: its command, files or unit changed")
    elif masked(proc.argv) != masked(spec.argv):
        start = StartService(spec.unit, "restart: the running process is not the unit's command")
    else:
        start = None
    return changes(None if installed else InstallService(spec.unit), start)


def install_service(host: Host, spec: ServiceSpec) -> None:
    v = host.vars
    for path, text in spec.files.items():
        upload_text(host, path, text, "0640", owner=f"root:{v.service_user}")
    upload_text(host, unit_path(spec.unit), spec.unit_text())
    host.sh(f"install -d -o {q(v.service_user)} {q(v.prefix + '/run')} {q(v.prefix + '/log')} "
            f"{q(v.prefix + '/state')}")
    upload_text(host, stamp_path(host, spec.unit), spec.identity())


def stop_service(host: Host, unit: str) -> None:
    if host.fact(SystemdIsInit()):
        host.sh(f"systemctl stop {q(unit)} 2>/dev/null || true")
        return
    pid = q(pidfile(host, unit))
    host.sh(f"if test -f {pid}; then kill \"$(cat {pid})\" 2>/dev/null || true; "
            f"for i in $(seq 100); do kill -0 \"$(cat {pid})\" 2>/dev/null || break; sleep 0.1; done; "
            f"kill -9 \"$(cat {pid})\" 2>/dev/null || true; rm -f {pid}; fi")


def start_service(host: Host, spec: ServiceSpec) -> str:
    if host.fact(SystemdIsInit()):
        unit = q(spec.unit)
        host.sh(f"systemctl daemon-reload && systemctl enable {unit} && systemctl restart {unit}")
        return "systemd unit enabled"
    env = ["env", *(f"{k}={val}" for k, val in spec.environment.items())] if spec.environment else []
    # setpriv execs in place (runuser would fork), so the pidfile names the service itself.
    drop = (f"setpriv --reuid {q(spec.user)} --regid \"$(id -g {q(spec.user)})\" --init-groups -- "
            if spec.user else "")
    host.sh(f"setsid {drop}{q(*env, *spec.argv)} > {q(log_path(host, spec.unit))} 2>&1 < /dev/null & "
            f"echo $! > {q(pidfile(host, spec.unit))}")
    return "PID 1 is not systemd: unit installed, runs as a supervised process with a pidfile"


def wait_healthy(host: Host, spec: ServiceSpec) -> None:
    tries = spec.startup_timeout_s * 2
    status = f"curl -s -o /dev/null -m 5 -w '%{{http_code}}' {q(spec.health_url)}"
    script = (f"for i in $(seq {tries}); do test \"$({status})\" = 200 && exit 0; "
              "sleep 0.5; done; exit 1")
    if not host.ok(script):
        tail = host.sh(f"tail -n 15 {q(log_path(host, spec.unit))} 2>/dev/null", check=False)[1]
        raise StepFailed(f"{host.name}: {spec.unit} not healthy at {spec.health_url}:\n{tail}")


class ServiceStep(Step):
    """Install, (re)start and health-check one service; undo stops it and removes its unit."""

    def spec(self, host: Host) -> ServiceSpec:
        raise NotImplementedError

    def check(self, host: Host) -> Changes:
        return service_changes(host, self.spec(host))

    def apply(self, host: Host, todo: Changes) -> str:
        spec = self.spec(host)
        install_service(host, spec)
        stop_service(host, spec.unit)
        self.before_start(host)
        how = start_service(host, spec)
        wait_healthy(host, spec)
        return how

    def before_start(self, host: Host) -> None:
        pass

    def verify(self, host: Host) -> None:
        super().verify(host)
        spec = self.spec(host)
        if host.fact(HttpStatus(spec.health_url)) != 200:
            raise StepFailed(f"{host.name}: {spec.unit} does not answer {spec.health_url}")

    def undo(self, host: Host) -> str | None:
        unit = self.spec(host).unit
        stop_service(host, unit)
        if host.fact(SystemdIsInit()):
            host.sh(f"systemctl disable {q(unit)} 2>/dev/null || true")
        host.sh(f"rm -f {q(unit_path(unit))} {q(stamp_path(host, unit))}")
        return f"stopped {unit} and removed its unit"


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def engine_bind(host: Host) -> str:
    return host.vars.serve_host or "127.0.0.1"


def engine_url(host: Host) -> str:
    bind = engine_bind(host)
    return f"http://{'127.0.0.1' if bind in ('0.0.0.0', '::') else bind}:{host.vars.serve_port}"


def engine_key_path(host: Host) -> str:
    return f"{host.vars.prefix}/etc/engine-api-key"


def host_budget(host: Host) -> MemoryBudget:
    smi = host.fact(NvidiaSmi())
    gpus = [GpuFacts(i, g.name, g.compute_capability, g.memory_total_bytes, g.memory_free_bytes,
                     g.memory_total_bytes is None) for i, g in enumerate(smi.gpus)]
    total, available = host.fact(MemInfo())
    return budget_from(gpus if host.vars.profile != "cpu-only" else [], total, available)


@dataclass(frozen=True)
class CreateSecret:
    path: str

    def describe(self) -> str:
        return f"generate {self.path} (mode 640, never printed)"


class EngineService(ServiceStep):
    name = "engine"
    unit = "dgxready-engine"

    def __init__(self, formats: dict[str, ModelFiles], vllm_image: str, llama_server_sha256: str = ""):
        self.formats = formats
        self.vllm_image = vllm_image
        self.llama_server_sha256 = llama_server_sha256

    def spec(self, host: Host) -> ServiceSpec:
        v = host.vars
        engine = host_engine(host, self.formats)
        fmt = self.formats[engine]
        plan = require_fit(make_plan(v.model, fmt.fmt, fmt.spec, fmt.shape, v.parallel,
                                     min(v.ctx_per_slot, fmt.shape.context_length),
                                     engine_kv_dtype(engine, v.kv_dtype), host_budget(host)))
        model_dir = fmt.remote_dir(v.prefix)
        if engine == "vllm":
            argv = self.vllm_argv(host, fmt, plan.engine_flags, model_dir)
            return ServiceSpec(self.unit, f"dgxready vLLM ({v.model})", argv, None,
                               f"{engine_url(host)}/health", startup_timeout_s=900,
                               revision=",".join(f.sha256 for f in fmt.files))
        extra = (*(("-t", str(v.threads)) if v.threads else ()),
                 *(() if is_loopback(engine_bind(host)) else ("--api-key-file", engine_key_path(host))))
        argv = llamacpp_command(f"{v.prefix}/bin/llama-server", f"{model_dir}/{fmt.entry_rel}", v.model,
                                engine_bind(host), v.serve_port, plan.engine_flags, extra)
        revision = ",".join([self.llama_server_sha256, *(f.sha256 for f in fmt.files)])
        return ServiceSpec(self.unit, f"dgxready llama-server ({v.model})", tuple(argv), v.service_user,
                           f"{engine_url(host)}/health", startup_timeout_s=120, revision=revision)

    def vllm_argv(self, host: Host, fmt: ModelFiles, flags: list[str], model_dir: str) -> tuple[str, ...]:
        v = host.vars
        install = (VllmInstall("venv", f"{v.prefix}/vllm-venv/bin/vllm") if v.vllm == "venv"
                   else VllmInstall("container", self.vllm_image))
        mistral = any(f.name == "tokenizer.model.v3" for f in fmt.spec.files)
        # The multiplexer forwards each role's priority; without this policy vLLM's v0 engine
        # refuses a non-zero priority and v1 ignores it.
        extra = ("--scheduling-policy", "priority")
        argv = tuple(vllm_command(BackendChoice("vllm", "provisioned", install), model_dir, v.model,
                                  engine_bind(host), v.serve_port, flags, mistral, extra))
        if is_loopback(engine_bind(host)):
            return argv
        if v.vllm == "venv":
            raise StepFailed(f"{host.name}: vars.serve_host {engine_bind(host)}: a vLLM venv beyond loopback "
                             "would run without an API key; bind 127.0.0.1 or use the container")
        # vLLM 0.10 has no --api-key-file and --api-key would put the key in argv and the unit;
        # docker reads VLLM_API_KEY from a file of mode 640 instead.
        return (*argv[:2], "--env-file", engine_key_path(host) + ".env", *argv[2:])

    def check(self, host: Host) -> Changes:
        todo = super().check(host)
        if is_loopback(engine_bind(host)) or host.fact(FileExists(engine_key_path(host))):
            return todo
        return Changes((CreateSecret(engine_key_path(host)), *todo.items))

    def apply(self, host: Host, todo: Changes) -> str:
        for secret in todo.of(CreateSecret):
            make_secret(host, secret.path)
        return super().apply(host, todo)

    def before_start(self, host: Host) -> None:
        if host.vars.profile == "dgx-spark":
            host.sh(DROP_PAGE_CACHE_SH)


def make_secret(host: Host, path: str) -> None:
    """A random key in `path`, and `VLLM_API_KEY=<key>` in `path`.env for docker's --env-file;
    both mode 640, group the service user, never on a command line."""
    group, partial, env = q(host.vars.service_user), q(path + ".partial"), q(path + ".env.partial")
    host.sh(f"install -d -m 0755 \"$(dirname {q(path)})\" && umask 077 && "
            f"head -c 32 /dev/urandom | base64 | tr -d '/+=\\n' > {partial} && "
            f"printf 'VLLM_API_KEY=%s\\n' \"$(cat {partial})\" > {env} && "
            f"chgrp {group} {partial} {env} && chmod 0640 {partial} {env} && "
            f"mv -f {env} {q(path + '.env')} && mv -f {partial} {q(path)}")


@dataclass(frozen=True)
class GenerateAgentKeys:
    path: str
    count: int

    def describe(self) -> str:
        return f"generate {self.count} agent keys in {self.path} (mode 600, never printed)"


def keys_path_for(prefix: str) -> str:
    return f"{prefix}/etc/agent-keys.yaml"


def keys_path(host: Host) -> str:
    return keys_path_for(host.vars.prefix)


def mux_host(host: Host) -> str:
    return host.vars.mux_host or host.address


class MultiplexerService(ServiceStep):
    name = "multiplexer"
    unit = "dgxready-mux"

    def __init__(self, formats: dict[str, ModelFiles], app_sha256: str = ""):
        self.formats = formats
        self.app_sha256 = app_sha256

    def config_text(self, host: Host) -> str:
        v = host.vars
        backend = {"name": "engine", "url": engine_url(host), "kind": host_engine(host, self.formats),
                   "max_concurrency": v.parallel}
        if not is_loopback(engine_bind(host)):
            backend["api_key_file"] = engine_key_path(host)
        doc = {"host": mux_host(host), "port": v.mux_port, "backends": [backend],
               "state_db": f"{v.prefix}/state/multiplexer.db", "keys_file": keys_path(host)}
        return yaml.safe_dump(doc, sort_keys=False)

    def spec(self, host: Host) -> ServiceSpec:
        v = host.vars
        config = f"{v.prefix}/etc/multiplexer.yaml"
        argv = (f"{v.prefix}/venv/bin/python", "-m", "agents.service", "--config", config)
        return ServiceSpec(self.unit, "dgxready agent multiplexer", argv, v.service_user,
                           f"http://{mux_host(host)}:{v.mux_port}/health",
                           environment={"PYTHONPATH": f"{v.prefix}/app",
                                        "DGXREADY_STATE_DIR": f"{v.prefix}/state"},
                           files={config: self.config_text(host)}, revision=self.app_sha256)

    def check(self, host: Host) -> Changes:
        todo = super().check(host)
        if host.fact(FileExists(keys_path(host))):
            return todo
        return Changes((GenerateAgentKeys(keys_path(host), host.vars.agents), *todo.items))

    def apply(self, host: Host, todo: Changes) -> str:
        v = host.vars
        for keys in todo.of(GenerateAgentKeys):
            host.sh(f"install -d -m 0755 {q(v.prefix + '/etc')} && "
                    f"PYTHONPATH={q(v.prefix + '/app')} {q(v.prefix + '/venv/bin/python')} -m agents.keygen "
                    f"--count {keys.count} --output {q(keys.path)} --owner {q(v.service_user)}")
        return super().apply(host, todo)
