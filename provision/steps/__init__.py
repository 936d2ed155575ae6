"""The provisioning steps in the order they run; `all_steps` builds them from the controller's
artifacts."""
from __future__ import annotations

from backup.config import load_backup_config
from monitoring.settings import load_monitoring_settings
from provision.core import Step
from provision.steps.backup import BackupStep
from provision.steps.engine import LlamaBuild, LlamaCpp, VllmImage
from provision.steps.modelfiles import ModelFiles, ModelStep
from provision.steps.monitoring import MonitoringStep
from provision.steps.repro_image import ReproContext, ReproImage
from provision.steps.services import EngineService, MultiplexerService
from provision.steps.storage import Storage
from provision.steps.system import AppBundle, BasePackages, Docker, NvidiaDriver, PythonEnv, UserAndSsh
from provision.steps.validate import Validate


def all_steps(llama: LlamaBuild, formats: dict[str, ModelFiles], app: AppBundle, pins: tuple[str, ...],
              vllm_image: str, repro: ReproContext) -> list[Step]:
    llama_cpp = LlamaCpp(llama)
    return [BasePackages(), UserAndSsh(), NvidiaDriver(), Docker(), PythonEnv(pins, app), storage_step(formats),
            llama_cpp, VllmImage(vllm_image), ModelStep(formats),
            EngineService(formats, vllm_image, llama_cpp.digests["llama-server"]),
            MultiplexerService(formats, app.sha256), Validate(),
            MonitoringStep(formats, app.sha256, load_monitoring_settings()),
            BackupStep(load_backup_config().hosts), ReproImage(repro)]


def storage_step(formats: dict[str, ModelFiles]) -> Storage:
    """Room for the largest format any host serves; what a host's store already holds of it
    counts when there is one format."""
    needed = max(f.spec.weight_bytes for f in formats.values())
    only = next(iter(formats.values())) if len(formats) == 1 else None
    return Storage(needed, f"{only.model}/{only.fmt}" if only else None)
