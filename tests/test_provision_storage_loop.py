"""The storage step against this machine over real SSH (a throwaway sshd from tests/sshd.py):
ext4 on loop devices mounted under a temporary store, and md RAID 1 arrays of loop devices, one
made by the step and one by mdadm, then degraded with `mdadm --fail`. Needs root and a free loop
device; the array tests also need mdadm and a kernel with md. Every loop device, mount and array
made here is undone in teardown, pass or fail; no other device is touched."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fabric import Connection

from dgxready.settings import REPO_ROOT
from provision.core import Host, StepFailed, run_step
from provision.inventory import ArrayRequest, HostEntry, HostVars, StorageVars, Target
from provision.steps.storage import RecordBench, Storage
from provision.storage_facts import BlockAncestors, BlockDevice, MdArrays, MountUnder
from tests.sshd import SSHD, start_sshd

MiB = 1 << 20
GiB = 1 << 30


def loops_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (losetup, mkfs, mount)"
    if not Path(SSHD).exists():
        return "openssh-server is not installed (bootstrap.sh installs it for nox)"
    if shutil.which("losetup") is None or subprocess.run(["losetup", "-f"], capture_output=True).returncode:
        return "no free loop device (losetup -f fails)"
    return None


def md_unavailable() -> str | None:
    if shutil.which("mdadm") is None:
        return "mdadm is not installed (apt-get install --no-install-recommends mdadm)"
    if not Path("/proc/mdstat").exists() and shutil.which("modprobe"):
        subprocess.run(["modprobe", "-q", "raid1"], capture_output=True)
    if not Path("/proc/mdstat").exists():
        return "the kernel has no md driver (no /proc/mdstat, and modprobe raid1 did not add one)"
    return None


pytestmark = pytest.mark.skipif(loops_unavailable() is not None, reason=str(loops_unavailable()))
needs_md = pytest.mark.skipif(md_unavailable() is not None, reason=str(md_unavailable()))


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


@dataclass
class Scratch:
    """Loop devices, mounts and arrays made by one test; `cleanup` undoes them newest first."""
    root: Path
    undo: list[tuple[str, ...]] = field(default_factory=list)

    def loop(self, size_mib: int) -> str:
        image = self.root / f"disk{len(self.undo)}.img"
        run("truncate", "-s", f"{size_mib}M", str(image))
        device = run("losetup", "-f", "--show", str(image))
        self.undo.append(("losetup", "-d", device))
        return device

    def ext4(self, size_mib: int) -> str:
        device = self.loop(size_mib)
        run("mkfs.ext4", "-q", device)
        return device

    def will_stop(self, array: str, devices: tuple[str, ...]) -> None:
        self.undo.append(("mdadm", "--zero-superblock", *devices))
        self.undo.append(("mdadm", "--stop", array))

    def will_unmount(self, target: Path) -> None:
        self.undo.append(("umount", str(target)))

    def mount(self, device: str, target: Path, options: str) -> None:
        target.mkdir(parents=True, exist_ok=True)
        run("mount", "-o", options, device, str(target))
        self.will_unmount(target)

    def cleanup(self) -> None:
        for argv in reversed(self.undo):
            subprocess.run(argv, capture_output=True)


@pytest.fixture
def scratch(tmp_path):
    made = Scratch(tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture(scope="module")
def conn(tmp_path_factory):
    sshd = start_sshd(tmp_path_factory.mktemp("sshd"), alias="storagebox")
    c = Connection("127.0.0.1", port=sshd.port, user="root", connect_kwargs={
        "key_filename": str(sshd.key), "look_for_keys": False, "allow_agent": False})
    try:
        yield c
    finally:
        c.close()
        sshd.stop()


def ssh_host(conn: Connection, prefix: Path, **storage) -> Host:
    """A fresh Host (no cached facts) on this machine, its store at <prefix>/models."""
    entry = HostEntry(address="127.0.0.1", vars=HostVars(prefix=str(prefix), storage=StorageVars(**storage)))
    return Host(Target(name="storagebox", entry=entry), conn)


def md_name() -> str:
    return f"/dev/md/dgxready-test-{os.getpid()}"


def test_an_ext4_loop_mount_under_the_store_is_read_checked_and_benchmarked(conn, scratch):
    prefix = scratch.root / "prefix"
    store = prefix / "models"
    device = scratch.ext4(512)
    scratch.mount(device, store, "noatime")
    (prefix / "app").symlink_to(REPO_ROOT)
    (prefix / "venv").symlink_to(sys.prefix)
    wanted = {"mount_options": ("noatime",), "filesystem": "ext4"}
    host = ssh_host(conn, prefix, **wanted)

    mount = host.fact(MountUnder(str(store)))
    assert (mount.source, mount.target, mount.fstype) == (device, str(store), "ext4")
    assert "noatime" in mount.options and 0 < mount.avail_bytes < 512 * MiB
    assert host.fact(BlockAncestors(device)) == (device,)
    assert host.fact(BlockDevice(device)).signatures == ("ext4",)
    assert host.fact(BlockDevice(device)).mountpoints == (str(store),)

    step = Storage(16 * MiB)
    assert step.check(host).items == (RecordBench(str(store)),)
    result = run_step(step, host, dry_run=False)
    assert result.status == "changed", result
    assert f"{device} on {store} (" in result.detail and "rand_read_4k_qd16" in result.detail
    record = json.loads((prefix / "state/storage-bench.json").read_text())
    assert record["source"] == device and len(record["storage"]["jobs"]) == 4
    assert not step.check(ssh_host(conn, prefix, **wanted))


def test_a_store_mounted_without_noatime_fails_or_is_remounted_as_the_inventory_says(conn, scratch):
    prefix = scratch.root / "prefix"
    store = prefix / "models"
    scratch.mount(scratch.ext4(64), store, "relatime")

    refused = run_step(Storage(MiB), ssh_host(conn, prefix, mount_options=("noatime",), bench=False), False)
    assert refused.status == "failed" and "mounted without noatime" in refused.detail

    fixed = run_step(Storage(MiB), ssh_host(conn, prefix, mount_options=("noatime",), remount=True,
                                            bench=False), dry_run=False)
    assert fixed.status == "changed", fixed
    assert "noatime" in run("findmnt", "-n", "-o", "OPTIONS", str(store)).split(",")


def test_a_store_without_room_for_the_model_fails_saying_so(conn, scratch):
    prefix = scratch.root / "prefix"
    scratch.mount(scratch.ext4(64), prefix / "models", "noatime")
    result = run_step(Storage(GiB), ssh_host(conn, prefix, bench=False), dry_run=True)
    assert result.status == "failed" and "GiB free; the model store needs 1.00 GiB" in result.detail


def test_an_array_over_a_loop_device_holding_ext4_is_refused_and_the_device_left_as_it_was(conn, scratch):
    prefix = scratch.root / "prefix"
    formatted, blank = scratch.ext4(64), scratch.loop(64)
    request = ArrayRequest(name=md_name(), level=1, devices=(formatted, blank))
    before = run("blkid", "-p", "-o", "value", "-s", "UUID", formatted)

    result = run_step(Storage(MiB, fstab=str(scratch.root / "fstab")),
                      ssh_host(conn, prefix, array=request, bench=False), dry_run=False)
    assert result.status == "failed" and f"{formatted} holds ext4" in result.detail
    assert run("blkid", "-p", "-o", "value", "-s", "UUID", formatted) == before
    assert not Path(md_name()).exists() and not (prefix / "models").exists()


@needs_md
def test_the_step_creates_the_requested_array_and_a_failed_member_then_fails_the_check_naming_it(conn, scratch):
    prefix = scratch.root / "prefix"
    store = prefix / "models"
    fstab = scratch.root / "fstab"
    fstab.write_text("# test fstab\n")
    members = (scratch.loop(128), scratch.loop(128))
    scratch.will_stop(md_name(), members)
    scratch.will_unmount(store)
    wanted = {"array": ArrayRequest(name=md_name(), level=1, devices=members), "mount_options": ("noatime",),
              "bench": False}
    step = Storage(MiB, fstab=str(fstab))

    created = run_step(step, ssh_host(conn, prefix, **wanted), dry_run=False)
    assert created.status == "changed", created
    assert f"create RAID 1 {md_name()}" in created.detail
    md = os.path.realpath(md_name())
    host = ssh_host(conn, prefix, **wanted)
    assert not step.check(host)
    (array,) = [a for a in host.fact(MdArrays()) if a.named(md_name())]
    assert array.device == md and {m.device for m in array.members} == set(members) and not array.problems()
    assert f" {store} ext4 noatime,nofail 0 2" in fstab.read_text()

    run("mdadm", md_name(), "--fail", members[1])
    checked = run_step(step, ssh_host(conn, prefix, **wanted), dry_run=True)
    assert checked.status == "failed" and md in checked.detail and "degraded" in checked.detail, checked


@needs_md
def test_a_raid1_made_with_mdadm_reads_healthy_then_fails_the_check_naming_it_once_degraded(conn, scratch):
    prefix = scratch.root / "prefix"
    store = prefix / "models"
    members = (scratch.loop(128), scratch.loop(128))
    scratch.will_stop(md_name(), members)
    run("mdadm", "--create", md_name(), "--run", "--metadata=1.2", "--level=1", "--raid-devices=2", *members)
    md = os.path.realpath(md_name())
    run("mkfs.ext4", "-q", md)
    scratch.mount(md, store, "noatime")
    host = ssh_host(conn, prefix, mount_options=("noatime",), bench=False)

    assert md in host.fact(BlockAncestors(host.fact(MountUnder(str(store))).source))
    (array,) = [a for a in host.fact(MdArrays()) if a.device == md]
    assert array.level == "raid1" and md_name() in array.aliases and not array.problems()
    assert not Storage(MiB).check(host)

    run("mdadm", md, "--fail", members[1])
    with pytest.raises(StepFailed, match=f"md array {md} .*degraded: 1 of 2 devices missing") as failed:
        Storage(MiB).check(ssh_host(conn, prefix, mount_options=("noatime",), bench=False))
    assert f"failed member {members[1]}" in str(failed.value)
