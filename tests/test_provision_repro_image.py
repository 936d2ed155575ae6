"""The repro-image step: on hosts with a Docker engine, validation builds repro/docker's image from
the controller's checkout, once per context digest. Docker cannot run here: the offline tests feed
the facts, and the lab test puts a stand-in `docker` on a real disposable host (it records the
build's arguments and context, and answers `image inspect` with the label it was given), so the
step's own SSH, upload and command path runs for real."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path, PurePosixPath

import pytest
import yaml

from provision import facts as F
from provision import lab
from provision.artifacts import dockerignore_patterns, ignored, repro_context
from provision.core import Host, run_step
from provision.inventory import HostEntry, HostVars, Target, load_inventory, select
from provision.run import provision
from provision.steps.repro_image import CONTEXT_LABEL, BuildImage, ReproContext, ReproImage

CONTEXT = ReproContext(Path("/nonexistent/context.tar.gz"), "ab" * 32)


def offline(facts: dict, **vars_) -> Host:
    target = Target(name="box", entry=HostEntry(address="127.0.0.61", vars=HostVars(**vars_)))
    return Host.offline(target, facts)


def docker_facts(label: str | None, variant: str, nvidia: bool) -> dict:
    return {F.CommandExists("docker"): True, F.NvidiaHardware(): nvidia,
            F.DockerImageLabel(f"dgxready:{variant}", CONTEXT_LABEL): label}


def test_a_host_without_docker_skips_the_image_and_says_why():
    result = run_step(ReproImage(CONTEXT), offline({F.CommandExists("docker"): False}), dry_run=True)
    assert result.status == "skipped" and "no Docker engine" in result.detail


@pytest.mark.parametrize(("profile", "nvidia", "variant"),
                         [("cpu-only", False, "cpu"), ("dgx-spark", True, "cuda")])
def test_the_image_is_built_from_the_dockerfile_that_fits_the_hardware(profile, nvidia, variant):
    host = offline(docker_facts(None, variant, nvidia), profile=profile)
    (build,) = ReproImage(CONTEXT).check(host).of(BuildImage)
    assert build == BuildImage(f"dgxready:{variant}", f"repro/docker/Dockerfile.{variant}", CONTEXT.sha256)


def test_an_image_built_from_the_same_context_is_left_alone_and_another_is_rebuilt():
    same = offline(docker_facts(CONTEXT.sha256, "cpu", False), profile="cpu-only")
    assert not ReproImage(CONTEXT).check(same)
    older = offline(docker_facts("cd" * 32, "cpu", False), profile="cpu-only")
    assert ReproImage(CONTEXT).check(older).of(BuildImage)


def test_the_image_label_fact_reads_a_missing_image_or_label_as_none():
    fact = F.DockerImageLabel("dgxready:cpu", CONTEXT_LABEL)
    assert fact.process(0, "ab12\n") == "ab12"
    assert fact.process(0, "<no value>\n") is None and fact.process(1, "") is None
    assert f'"{CONTEXT_LABEL}"' in fact.command()


def test_dockerignore_patterns_match_from_the_root_or_by_name_for_double_star():
    patterns = [".git", "**/__pycache__", "bench/baselines"]
    assert ignored(PurePosixPath(".git/config"), patterns)
    assert ignored(PurePosixPath("agents/knowledge/__pycache__/x.pyc"), patterns)
    assert ignored(PurePosixPath("bench/baselines/vm/a.json"), patterns)
    assert not ignored(PurePosixPath("tests/fixtures/.gitkeep"), patterns)
    assert not ignored(PurePosixPath("docs/bench/baselines"), patterns)


def test_the_build_context_holds_what_the_dockerfiles_copy_and_nothing_dockerignore_excludes(tmp_path):
    context = repro_context(tmp_path / "a")
    with tarfile.open(context.tarball) as tar:
        members = {m.name: m for m in tar.getmembers()}
    copied = {"pyproject.toml", "uv.lock", "README.md", "repro/docker/Dockerfile.cpu", "repro/run.sh"}
    assert copied <= set(members)
    assert not [n for n in members if ignored(PurePosixPath(n), dockerignore_patterns())]
    assert members["repro/run.sh"].mode == 0o755 and {m.mtime for m in members.values()} == {0}
    assert repro_context(tmp_path / "b").sha256 == context.sha256


FAKE_DOCKER = r"""#!/bin/sh
# Stands in for the Docker CLI on the lab host (no engine can run here).
state=/var/lib/fake-docker
mkdir -p "$state"
case "$1" in
  image) [ -f "$state/label" ] && cat "$state/label" && exit 0; exit 1 ;;
  build)
    if [ -f "$state/fail" ]; then cat > /dev/null; echo "step 3/9: apt-get install failed" >&2; exit 1; fi
    echo "$@" > "$state/argv"; cat > "$state/context.tar.gz"
    for a in "$@"; do case "$a" in org.dgxready.context-sha256=*) echo "${a#*=}" > "$state/label" ;; esac; done
    echo "Successfully tagged dgxready:cpu"; exit 0 ;;
esac
exit 1
"""


@pytest.mark.skipif(lab.available() is not None, reason=f"test hosts: {lab.available()}")
def test_a_lab_host_with_docker_builds_the_image_once_and_a_failed_build_names_its_log(tmp_path, isolated):
    host = lab.make_host(tmp_path / "india", "india", "127.0.0.39")
    try:
        fake = host.root / "usr/local/bin/docker"
        fake.write_text(FAKE_DOCKER)
        fake.chmod(0o755)
        state = host.root / "var/lib/fake-docker"
        state.mkdir(parents=True)
        (state / "fail").touch()
        host.start()
        inv = tmp_path / "inventory.yaml"
        inv.write_text(yaml.safe_dump({"hosts": {"india": {"address": host.address, "key": str(host.key),
                                                           "vars": lab.lab_vars()}}}))
        targets = select(load_inventory(inv), "india")
        failed, _ = provision(targets, only="repro-image")
        assert failed.results[0].status == "failed"
        assert "repro-image.log ends" in failed.results[0].detail
        assert "apt-get install failed" in failed.results[0].stderr_tail
        (state / "fail").unlink()
        built, _ = provision(targets, only="repro-image")
        assert built.results[0].status == "changed", built.results
        argv = (state / "argv").read_text().split()
        assert argv[:2] == ["build", "--label"] and "repro/docker/Dockerfile.cpu" in argv and argv[-1] == "-"
        with tarfile.open(fileobj=io.BytesIO((state / "context.tar.gz").read_bytes())) as tar:
            assert "repro/docker/Dockerfile.cpu" in tar.getnames()
        again, _ = provision(targets, only="repro-image")
        assert again.results[0].status == "ok", again.results
    finally:
        host.destroy()
