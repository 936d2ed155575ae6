"""The last part of validation, on hosts that have a Docker engine: build the reproducibility
image (repro/docker: the CUDA one on a DGX Spark, the CPU one elsewhere) from the controller's
checkout, labelled with the build context's digest, so an unchanged checkout builds nothing. Hosts
without Docker skip it: the images are optional, the host's own services do not run in them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from provision.core import Changes, Host, Step, StepFailed, changes, q
from provision.facts import CommandExists, DockerImageLabel, NvidiaHardware
from provision.steps.base import upload_file

CONTEXT_LABEL = "org.dgxready.context-sha256"
DOCKERFILES = {"cpu": "repro/docker/Dockerfile.cpu", "cuda": "repro/docker/Dockerfile.cuda"}


@dataclass(frozen=True)
class ReproContext:
    """The checkout's files that the Dockerfiles' .dockerignore lets in, as one reproducible
    tarball (sorted, no times or owners)."""
    tarball: Path
    sha256: str


@dataclass(frozen=True)
class BuildImage:
    tag: str
    dockerfile: str
    context_sha256: str

    def describe(self) -> str:
        return f"docker build {self.tag} from {self.dockerfile} (context {self.context_sha256[:12]})"


def image_variant(host: Host) -> str:
    """Dockerfile.cuda is built for the Spark (aarch64, sm_121); every other host gets the CPU image."""
    return "cuda" if host.vars.profile == "dgx-spark" and host.fact(NvidiaHardware()) else "cpu"


class ReproImage(Step):
    name = "repro-image"

    def __init__(self, context: ReproContext):
        self.context = context

    def skip_reason(self, host: Host) -> str | None:
        if not host.fact(CommandExists("docker")):
            return "no Docker engine on the host: the repro/docker image is not built"
        return None

    def check(self, host: Host) -> Changes:
        variant = image_variant(host)
        tag = f"dgxready:{variant}"
        built_from = host.fact(DockerImageLabel(tag, CONTEXT_LABEL))
        wanted = BuildImage(tag, DOCKERFILES[variant], self.context.sha256)
        return changes(None if built_from == self.context.sha256 else wanted)

    def apply(self, host: Host, todo: Changes) -> str:
        prefix = host.vars.prefix
        for build in todo.of(BuildImage):
            remote = f"{prefix}/repro/context-{build.context_sha256[:16]}.tar.gz"
            upload_file(host, self.context.tarball, remote, sha256=build.context_sha256)
            log = f"{prefix}/log/repro-image.log"
            label = f"{CONTEXT_LABEL}={build.context_sha256}"
            # A gzipped tarball on stdin is docker's build context; -f names a file inside it.
            code, _, _ = host.sh(f"mkdir -p {q(prefix + '/log')} && docker build --label {q(label)} "
                                 f"-f {q(build.dockerfile)} -t {q(build.tag)} - < {q(remote)} > {q(log)} 2>&1",
                                 check=False)
            if code:
                tail = host.sh(f"tail -n 20 {q(log)}", check=False)[1]
                raise StepFailed(f"{host.name}: docker build {build.tag} failed (exit {code}); "
                                 f"{log} ends:\n{tail}")
            host.sh(f"find {q(prefix + '/repro')} -name 'context-*.tar.gz' ! -path {q(remote)} -delete")
        return f"built {', '.join(b.tag for b in todo.of(BuildImage))}; log {prefix}/log/repro-image.log"
