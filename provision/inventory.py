"""The inventory (inventory.yaml or --inventory): hosts, groups and per-host variables,
validated at load; `--host` takes a host, a group, a comma-separated list, or an ssh alias."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dgxready.config import load_yaml
from dgxready.errors import ConfigError

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
ADDRESS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:_-]{0,252}$")
Profile = Literal["dgx-spark", "generic-nvidia", "cpu-only"]


MD_DEVICE = r"^/dev/md(/[A-Za-z0-9_.-]{1,32}|[0-9]{1,3})$"
BLOCK_DEVICE = re.compile(r"^/dev/[A-Za-z0-9_.:/-]{1,120}$")
MOUNT_OPTION = re.compile(r"^[A-Za-z0-9_.:=-]{1,64}$")
MIN_ARRAY_DEVICES = {0: 2, 1: 2, 4: 3, 5: 3, 6: 4, 10: 2}


class ArrayRequest(BaseModel):
    """An md array for the model store, mounted at <prefix>/models; created only while it does
    not exist and none of its devices holds a signature, a partition, a holder or a mount."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=MD_DEVICE, description="/dev/mdN or /dev/md/NAME")
    level: Literal[0, 1, 4, 5, 6, 10]
    devices: tuple[str, ...]
    filesystem: Literal["ext4", "xfs"] = "ext4"

    @field_validator("devices")
    @classmethod
    def _device_paths(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for d in v:
            if not BLOCK_DEVICE.match(d) or ".." in d.split("/"):
                raise ValueError(f"{d!r} is not a device path under /dev")
        if len(set(v)) != len(v):
            raise ValueError("a device is listed twice")
        return v

    @model_validator(mode="after")
    def _enough_devices(self) -> ArrayRequest:
        need = MIN_ARRAY_DEVICES[self.level]
        if len(self.devices) < need:
            raise ValueError(f"RAID {self.level} needs at least {need} devices, {len(self.devices)} given")
        return self


class StorageVars(BaseModel):
    """What the volume under the model store must be; nothing here is changed on the host
    unless `remount` or `array` asks for it."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    mount_options: tuple[str, ...] = Field((), description="options the store's mount needs, e.g. [noatime]")
    remount: bool = Field(False, description="remount the store's filesystem to add missing mount_options")
    filesystem: str | None = Field(None, pattern=r"^[a-z0-9]{2,16}$",
                                   description="the filesystem type the store must be on")
    min_free_gib: float = Field(0, ge=0, description="free space to keep beyond the model's needs")
    array: ArrayRequest | None = None
    bench: bool = Field(True, description="record a short storage benchmark of the store's mount")

    @field_validator("mount_options")
    @classmethod
    def _options(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for o in v:
            if not MOUNT_OPTION.match(o):
                raise ValueError(f"{o!r} is not a single mount option")
        return v

    @model_validator(mode="after")
    def _one_filesystem(self) -> StorageVars:
        if self.array and self.filesystem and self.filesystem != self.array.filesystem:
            raise ValueError(f"filesystem {self.filesystem} differs from the array's {self.array.filesystem}")
        return self


MONITORING_PORTS = ("prometheus_port", "alertmanager_port", "node_exporter_port", "exporter_port",
                    "webhook_port", "dcgm_port")


class MonitoringVars(BaseModel):
    """The monitoring step: Prometheus, Alertmanager, node_exporter, the dgxready exporter and the alert
    webhook as services on the host, bound to `bind`; Grafana, Loki and Alloy from Grafana's apt
    repository when `grafana` is on."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool | None = Field(None, description="install the monitoring stack (default: on for the "
                                                   "NVIDIA profiles, off for cpu-only)")
    bind: str = Field("127.0.0.1", pattern=r"^[A-Za-z0-9.:_-]{1,253}$",
                      description="address the monitoring services listen on")
    prometheus_port: int = Field(9090, ge=1, le=65535)
    alertmanager_port: int = Field(9093, ge=1, le=65535)
    node_exporter_port: int = Field(9100, ge=1, le=65535)
    exporter_port: int = Field(9401, ge=1, le=65535,
                               description="the dgxready exporter (dcgm-exporter keeps 9400)")
    webhook_port: int = Field(9095, ge=1, le=65535, description="the alert webhook Alertmanager posts to")
    dcgm_port: int = Field(9400, ge=1, le=65535,
                           description="dcgm-exporter on 127.0.0.1, scraped on NVIDIA hosts where it answers")
    grafana: bool = Field(False, description="Grafana, Loki and Alloy from Grafana's apt repository "
                                             "(needs systemd and the network to apt.grafana.com)")

    @model_validator(mode="after")
    def _distinct_ports(self) -> MonitoringVars:
        seen: dict[int, str] = {}
        for name in MONITORING_PORTS:
            port = getattr(self, name)
            if port in seen:
                raise ValueError(f"{name} {port} is also {seen[port]}")
            seen[port] = name
        return self


class HostVars(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    profile: Profile = "cpu-only"
    model: str = Field("smollm2-135m", pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    model_format: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
                                     description="the catalog format to serve, e.g. fp8 (default: the "
                                                 "first one for the host's engine)")
    prefix: str = Field("/opt/dgxready", pattern=r"^/[A-Za-z0-9._/-]{1,200}$",
                        description="where the toolkit, binaries and models live on the host")
    serve_port: int = Field(8080, ge=1, le=65535)
    serve_host: str | None = Field(None, pattern=r"^[A-Za-z0-9.:_-]{1,253}$",
                                   description="address the engine binds (default 127.0.0.1: only the "
                                               "multiplexer reaches it); llama-server then needs an API key")
    mux_host: str | None = Field(None, pattern=r"^[A-Za-z0-9.:_-]{1,253}$",
                                 description="address the multiplexer binds (default: the host's address)")
    mux_port: int = Field(8090, ge=1, le=65535, description="the port the host exposes to agents")
    agents: int = Field(10, ge=1, le=1000, description="agent keys generated on the host")
    kv_dtype: Literal["f16", "bf16", "fp8", "q8_0", "q4_0"] = "f16"
    vllm: Literal["container", "venv"] = Field(
        "container", description="vLLM from the NGC image, or from a venv at <prefix>/vllm-venv")
    parallel: int = Field(4, ge=1, le=256)
    ctx_per_slot: int = Field(2048, ge=256)
    threads: int | None = Field(None, ge=1, le=1024,
                                description="llama-server -t (default: all cores)")
    llamacpp: Literal["auto", "ship", "build"] = Field(
        "auto", description="ship the controller's build (same arch), or build on the host")
    service_user: str = Field("dgxready", pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    storage: StorageVars = StorageVars()
    monitoring: MonitoringVars = MonitoringVars()

    @field_validator("prefix")
    @classmethod
    def _no_dotdot(cls, v: str) -> str:
        if ".." in v.split("/"):
            raise ValueError("must not contain '..'")
        return v


class HostEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    address: str
    user: str = Field("root", pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    port: int = Field(22, ge=1, le=65535)
    key: Path | None = None
    sudo: bool = False
    vars: HostVars = HostVars()

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        if not ADDRESS.match(v):
            raise ValueError("not a host name or IP address")
        return v


class Inventory(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hosts: dict[str, HostEntry] = Field(default_factory=dict)
    groups: dict[str, list[str]] = Field(default_factory=dict)
    vars: dict = Field(default_factory=dict, description="defaults for every host's vars")

    @field_validator("hosts", "groups")
    @classmethod
    def _names(cls, v: dict) -> dict:
        for name in v:
            if not re.match(NAME, name):
                raise ValueError(f"{name!r} is not a valid name (letters, digits, ._-)")
        return v

    @model_validator(mode="after")
    def _groups_name_hosts(self) -> Inventory:
        for group, members in self.groups.items():
            for i, member in enumerate(members):
                if member not in self.hosts:
                    raise ValueError(f"groups.{group}[{i}]: unknown host {member!r}")
        return self


class Target(BaseModel):
    """One host to provision, with its variables resolved."""
    model_config = ConfigDict(frozen=True)
    name: str
    entry: HostEntry


def load_inventory(path: Path) -> Inventory:
    inv = load_yaml(path, Inventory)
    if inv.vars:
        try:
            merged = {n: h.model_copy(update={"vars": HostVars.model_validate(
                inv.vars | h.vars.model_dump(exclude_unset=True))}) for n, h in inv.hosts.items()}
        except ValueError as exc:
            raise ConfigError(f"{path.name}: vars: {exc}") from None
        inv = inv.model_copy(update={"hosts": merged})
    return inv


def select(inv: Inventory, spec: str, source: str = "inventory") -> list[Target]:
    """Hosts, groups, comma lists; a name the inventory lacks is taken as an ssh alias."""
    out: list[Target] = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item in inv.groups:
            names = inv.groups[item]
        elif item in inv.hosts:
            names = [item]
        elif ADDRESS.match(item) and re.match(NAME, item):
            out.append(Target(name=item, entry=HostEntry(address=item)))
            continue
        else:
            raise ConfigError(f"{source}: --host {item!r}: not a host, a group or a valid ssh alias")
        out += [Target(name=n, entry=inv.hosts[n]) for n in names]
    if not out:
        raise ConfigError(f"{source}: --host {spec!r} selects no host")
    seen: dict[str, Target] = {}
    for t in out:
        seen.setdefault(t.name, t)
    return list(seen.values())
