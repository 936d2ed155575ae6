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


class HostVars(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    profile: Profile = "cpu-only"
    model: str = Field("smollm2-135m", pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    prefix: str = Field("/opt/dgxready", pattern=r"^/[A-Za-z0-9._/-]{1,200}$",
                        description="where the toolkit, binaries and models live on the host")
    serve_port: int = Field(8080, ge=1, le=65535)
    serve_host: str | None = Field(None, description="address llama-server binds (default: the host's)")
    parallel: int = Field(4, ge=1, le=256)
    ctx_per_slot: int = Field(2048, ge=256)
    threads: int | None = Field(None, ge=1, le=1024,
                                description="llama-server -t (default: all cores)")
    llamacpp: Literal["auto", "ship", "build"] = Field(
        "auto", description="ship the controller's build (same arch), or build on the host")
    service_user: str = Field("dgxready", pattern=r"^[a-z_][a-z0-9_-]{0,31}$")

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
