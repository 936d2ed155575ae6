"""backup.yaml (or $DGXREADY_BACKUP_CONFIG, or --config): where the repository is, where its
password comes from, what is captured, the schedule and the retention. Defaults are in code;
the repository and the password may come from restic's own environment variables instead.
Secrets are never part of this document: it names a password *file* or relies on the environment."""
from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agents.config import load_config
from dgxready.config import load_yaml
from dgxready.errors import ConfigError
from dgxready.settings import REPO_ROOT, Settings, load_settings

DB_NAME = r"^[a-z0-9][a-z0-9_-]{0,40}$"
# agents.service.DEFAULT_CONFIG; importing that module would bring the whole multiplexer (and its
# knowledge store's libraries) into `python -m backup` on the hosts.
MUX_CONFIG = REPO_ROOT / "agents" / "multiplexer.yaml"
HOURLY = 60
MINUTES_PER_DAY = 24 * 60


class Retention(BaseModel):
    """`restic forget --prune` after each scheduled backup: the newest snapshot of each of the
    last N hours, days and weeks is kept."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    keep_hourly: int = Field(24, ge=0, description="hourly snapshots kept")
    keep_daily: int = Field(7, ge=0, description="daily snapshots kept")
    keep_weekly: int = Field(8, ge=0, description="weekly snapshots kept")
    keep_monthly: int = Field(0, ge=0, description="monthly snapshots kept")

    def flags(self) -> list[str]:
        pairs = (("--keep-hourly", self.keep_hourly), ("--keep-daily", self.keep_daily),
                 ("--keep-weekly", self.keep_weekly), ("--keep-monthly", self.keep_monthly))
        flags = [f"{flag}={n}" for flag, n in pairs if n]
        return flags or ["--keep-last=1"]


def check_schedule(minutes: int) -> int:
    if minutes < HOURLY and HOURLY % minutes:
        raise ValueError(f"{minutes} minutes: below an hour it must divide 60 (5, 10, 15, 20, 30)")
    if minutes >= HOURLY and (minutes % HOURLY or MINUTES_PER_DAY % minutes):
        raise ValueError(f"{minutes} minutes: from an hour up it must be whole hours dividing 24")
    return minutes


class HostBackup(BaseModel):
    """What the `backup` provisioning step sets up on every host. `{prefix}` and `{host}` in the
    repository are filled in per host; the password is generated on the host (mode 600) and never
    leaves it."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    repository: str = Field("{prefix}/backup/restic", description="restic repository on or from the host")
    schedule_minutes: int = Field(HOURLY, ge=1, le=MINUTES_PER_DAY, description="minutes between backups")
    retention: Retention = Retention()
    weights: bool = Field(False, description="also back up the model store (it can be pulled again)")

    @field_validator("schedule_minutes")
    @classmethod
    def _schedule(cls, v: int) -> int:
        return check_schedule(v)

    @field_validator("repository")
    @classmethod
    def _repository_is_one_word(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9{}._:/@+=-]{1,400}$", v):
            raise ValueError("letters, digits and {}._:/@+=- only")
        return v


class BackupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    repository: str | None = Field(None, description="restic repository (a path, sftp:, rest:, s3:, ...); "
                                   "default $RESTIC_REPOSITORY, else <data dir>/dgxready/restic")
    password_file: Path | None = Field(None, description="file holding the repository password; default "
                                       "$RESTIC_PASSWORD_FILE or $RESTIC_PASSWORD")
    databases: dict[str, Path] | None = Field(None, description="SQLite files captured with the backup API "
                                              "(absent ones are skipped); default: the multiplexer's state, "
                                              "the team runner's, and the knowledge store's")
    paths: list[Path] | None = Field(None, description="files and folders copied as they are (any SQLite file "
                                     "found in them is captured with the backup API instead)")
    exclude: list[str] = Field(["servers", "logs", "*.pid", "*.tmp", ".*.partial", ".partial", ".quarantine"],
                               description="file or folder names (globs) left out of `paths`")
    weights: bool = Field(False, description="also back up the model store's weights")
    staging_dir: Path | None = Field(None, description="where captures and restores are staged "
                                     "(default <cache dir>/backup)")
    cache_dir: Path | None = Field(None, description="restic's cache (default <cache dir>/restic)")
    restic: str = Field("restic", description="the restic binary")
    schedule_minutes: int = Field(HOURLY, ge=1, le=MINUTES_PER_DAY,
                                  description="minutes between scheduled backups (the RPO it implies)")
    retention: Retention = Retention()
    rto_target_s: float = Field(3600.0, gt=0, description="recovery time objective")
    rpo_target_s: float = Field(3600.0, gt=0, description="recovery point objective")
    hosts: HostBackup = HostBackup()

    @field_validator("schedule_minutes")
    @classmethod
    def _schedule(cls, v: int) -> int:
        return check_schedule(v)

    @field_validator("databases")
    @classmethod
    def _database_names(cls, v: dict[str, Path] | None) -> dict[str, Path] | None:
        for name in v or {}:
            if not re.match(DB_NAME, name):
                raise ValueError(f"{name!r}: lower-case letters, digits, _ and - only")
        return v


def data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share")


def default_databases(settings: Settings) -> dict[str, Path]:
    """Where agents/multiplexer.yaml puts the multiplexer's state and the knowledge store (beside
    it unless the config says otherwise), and the team runner's state."""
    mux = load_config(MUX_CONFIG)
    state_db = mux.state_db or settings.state_dir / "multiplexer.db"
    return {"multiplexer": state_db, "knowledge": mux.knowledge.db or state_db.with_name("knowledge.db"),
            "team": settings.state_dir / "runs" / "team.db"}


def default_paths(settings: Settings) -> list[Path]:
    """The state folder (agent keys, transcripts under runs/, provisioning run records, fetched
    host keys), the configs, the inventory, the model catalog with its checksums and the bench
    baselines."""
    repo = [REPO_ROOT / p for p in ("dgxready.yaml", "backup.yaml", "inventory.yaml", "lab.yaml",
                                     "agents/multiplexer.yaml", "agents/roles", "model/models.yaml",
                                     "bench/baselines")]
    return [settings.state_dir, *repo]


class Resolved(BaseModel):
    """The configuration with every default filled in from the settings."""
    model_config = ConfigDict(frozen=True)
    config: BackupConfig
    databases: dict[str, Path]
    paths: tuple[Path, ...]
    staging_dir: Path
    cache_dir: Path


def resolve(config: BackupConfig, settings: Settings | None = None) -> Resolved:
    settings = settings or load_settings()
    paths = list(config.paths if config.paths is not None else default_paths(settings))
    if config.weights:
        paths.append(settings.models_dir)
    databases = config.databases if config.databases is not None else default_databases(settings)
    return Resolved(config=config, databases=databases, paths=tuple(paths),
                    staging_dir=config.staging_dir or settings.cache_dir / "backup",
                    cache_dir=config.cache_dir or settings.cache_dir / "restic")


def config_path(explicit: Path | None = None) -> Path | None:
    if explicit:
        return explicit
    env = os.environ.get("DGXREADY_BACKUP_CONFIG")
    if env:
        return Path(env)
    local = REPO_ROOT / "backup.yaml"
    return local if local.exists() else None


def load_backup_config(explicit: Path | None = None) -> BackupConfig:
    path = config_path(explicit)
    if path is None:
        return BackupConfig()
    if not path.exists():
        raise ConfigError(f"{path}: no such backup config")
    return load_yaml(path, BackupConfig)
