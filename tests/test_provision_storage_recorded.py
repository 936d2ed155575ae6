"""The storage step on output recorded from a real md RAID 1 of two loop devices, ext4 on it
mounted noatime at /opt/dgxready/models: healthy, the check passes; after `mdadm /dev/md0 --fail
/dev/loop1`, it fails naming /dev/md0, and the dry run that `invoke provision.check` makes reports
the step failed, naming it.

This VM's kernel has no md driver (so tests/test_provision_storage_loop.py skips its array tests
here); the outputs in tests/fixtures/md/ were recorded from a real array in a Debian bookworm kernel
(6.1.0-56-amd64, mdadm 4.2, util-linux 2.38.1) booted under qemu, each fact's exact command run
as provision.core.Host runs it. Re-record, as root with qemu-system-x86 installed, with
`.venv/bin/python tests/fixtures/md/record.py` (about two minutes under TCG; its docstring says
how); test_the_recordings_hold_every_current_fact_command says when a command change needs it."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from provision.core import Fact, Host, StepFailed, run_step
from provision.inventory import ArrayRequest, HostEntry, HostVars, StorageVars, Target
from provision.steps.storage import AddFstabEntry, RecordBench, Storage
from provision.storage_facts import (
    BlockAncestors,
    BlockDevice,
    FstabMountPoints,
    MdArrays,
    MdMember,
    MountUnder,
)

FIXTURES = Path(__file__).parent / "fixtures" / "md"
MiB = 1 << 20


def _recorder():
    spec = importlib.util.spec_from_file_location("md_record", FIXTURES / "record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


record = _recorder()
STORE, ARRAY, MEMBERS, FAILED = record.STORE, record.ARRAY, record.MEMBERS, record.FAILED
REQUEST = ArrayRequest(name=ARRAY, level=1, devices=MEMBERS)
AS_MOUNTED = {"mount_options": ("noatime",), "filesystem": "ext4", "bench": False}
AS_REQUESTED = {"array": REQUEST, "mount_options": ("noatime",), "bench": False}
STALE = "re-record with tests/fixtures/md/record.py"


def outputs(phase: str) -> dict[str, dict[str, Any]]:
    return json.loads((FIXTURES / f"{phase}.json").read_text())


def recorded(phase: str) -> dict[Fact, Any]:
    """Every recorded fact, its output read by the fact's own parser."""
    found = outputs(phase)
    facts = {}
    for fact in record.RECORDED_FACTS:
        if fact.command() not in found:
            pytest.fail(f"{phase}.json has no output of {fact!r}'s current command: {STALE}")
        facts[fact] = fact.process(found[fact.command()]["code"], found[fact.command()]["stdout"])
    return facts


def host(phase: str, **storage) -> Host:
    target = Target(name="mdbox", entry=HostEntry(address="10.0.0.7", vars=HostVars(
        prefix=record.PREFIX, storage=StorageVars(**storage))))
    return Host.offline(target, recorded(phase))


@pytest.mark.parametrize("phase", record.PHASES)
def test_the_recordings_hold_every_current_fact_command(phase):
    assert set(outputs(phase)) == {f.command() for f in record.RECORDED_FACTS}, STALE


def test_the_healthy_recording_reads_as_the_array_the_guest_made():
    facts = recorded("healthy")
    mount = facts[MountUnder(STORE)]
    assert (mount.target, mount.source, mount.fstype) == (STORE, ARRAY, "ext4") and "noatime" in mount.options
    assert 0 < mount.avail_bytes <= mount.size_bytes < 64 * MiB
    (array,) = facts[MdArrays()]
    assert (array.device, array.level, array.raid_disks, array.degraded) == (ARRAY, "raid1", 2, 0)
    assert array.members == tuple(MdMember(m, ("in_sync",)) for m in MEMBERS) and array.problems() == ()
    assert facts[BlockAncestors(ARRAY)] == (ARRAY, *MEMBERS)
    md = facts[BlockDevice(ARRAY)]
    assert (md.signatures, md.mountpoints) == (("ext4",), (STORE,))
    for member in MEMBERS:
        probe = facts[BlockDevice(member)]
        assert (probe.kernel_path, probe.signatures) == (member, ("linux_raid_member",))
        assert probe.in_use() == f"{member} holds linux_raid_member; is used by {ARRAY}"
    assert STORE in facts[FstabMountPoints("/etc/fstab")]


def test_the_degraded_recording_reads_the_failed_member_and_the_missing_count():
    (array,) = recorded("degraded")[MdArrays()]
    assert array.degraded == 1 and array.array_state == "clean"
    assert array.members == (MdMember(MEMBERS[0], ("in_sync",)), MdMember(FAILED, ("faulty",)))
    assert array.problems() == ("degraded: 1 of 2 devices missing", f"failed member {FAILED}")


@pytest.mark.parametrize("wanted", [AS_MOUNTED, AS_REQUESTED], ids=["store-on-array", "array-requested"])
def test_the_healthy_array_passes_the_check(wanted):
    assert not Storage(MiB).check(host("healthy", **wanted))
    result = run_step(Storage(MiB), host("healthy", **wanted), dry_run=True)
    assert result.status == "ok", result


def test_the_healthy_array_wants_only_what_the_recording_lacks():
    """No bench figures were recorded, and an fstab without the store gets the entry added."""
    h = host("healthy", mount_options=("noatime",))
    assert Storage(MiB).check(h).items == (RecordBench(STORE),)
    h = host("healthy", **AS_REQUESTED)
    h.cache[FstabMountPoints("/etc/fstab")] = ("/proc",)
    assert Storage(MiB).check(h).items == (AddFstabEntry(ARRAY, STORE, "ext4", ("noatime",)),)


@pytest.mark.parametrize("wanted", [AS_MOUNTED, AS_REQUESTED], ids=["store-on-array", "array-requested"])
def test_the_degraded_array_fails_the_check_naming_it(wanted):
    with pytest.raises(StepFailed) as failed:
        Storage(MiB).check(host("degraded", **wanted))
    assert str(failed.value) == (f"mdbox: md array {ARRAY} under {STORE} is not healthy (raid1, clean): "
                                 f"degraded: 1 of 2 devices missing; failed member {FAILED}")

    result = run_step(Storage(MiB), host("degraded", **wanted), dry_run=True)
    assert result.status == "failed" and f"md array {ARRAY} " in result.detail, result
