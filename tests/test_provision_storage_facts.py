"""The storage step without a host or root: captured findmnt, sysfs, wipefs and lsblk output ->
facts, and facts -> changes (none when the store's volume is as the inventory says) or a failure
that names what is wrong."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import pytest
from pydantic import ValidationError

from bench.storage import IoResult, StorageResult
from provision.core import Host, StepFailed, run_step
from provision.facts import CommandExists
from provision.inventory import ArrayRequest, HostEntry, HostVars, StorageVars, Target
from provision.steps.base import InstallPackages
from provision.steps.storage import (
    AddFstabEntry,
    CreateArray,
    MakeFilesystem,
    MountArray,
    RecordBench,
    Remount,
    Storage,
)
from provision.storage_facts import (
    BenchRecord,
    BlockAncestors,
    BlockDevice,
    DeviceProbe,
    DiskUsage,
    FstabMountPoints,
    HoldsFiles,
    MdArray,
    MdArrays,
    MdMember,
    Mount,
    MountUnder,
    RecordedBench,
    storage_result,
)

PREFIX = "/srv/dgx"
STORE = f"{PREFIX}/models"
BENCH = f"{PREFIX}/state/storage-bench.json"
GiB = 1 << 30
MiB = 1 << 20

FINDMNT_NVME = json.dumps({"filesystems": [{
    "target": "/srv", "source": "/dev/md127", "fstype": "ext4", "options": "rw,noatime,stripe=256",
    "size": 2000 * GiB, "avail": 1500 * GiB}]})

MDSTAT_HEALTHY = """array /dev/md127
level raid1
raid_disks 2
degraded 0
array_state clean
sync_action idle
member /dev/nvme1n1 in_sync
member /dev/nvme2n1 in_sync
alias /dev/md/models
"""

MDSTAT_DEGRADED = MDSTAT_HEALTHY.replace("degraded 0", "degraded 1").replace(
    "member /dev/nvme2n1 in_sync", "member /dev/nvme2n1 faulty")

MDSTAT_RAID0_AND_RESYNCING_RAID1 = """array /dev/md0
level raid0
raid_disks 2
degraded
array_state clean
sync_action
member /dev/sda1 in_sync
member /dev/sdb1 in_sync
array /dev/md1
level raid1
raid_disks 2
degraded 0
array_state active
sync_action resync
member /dev/sdc in_sync
member /dev/sdd in_sync
"""

REQUEST = ArrayRequest(name="/dev/md/models", level=1, devices=("/dev/nvme1n1", "/dev/nvme2n1"))


def mount(**kw) -> Mount:
    fields = {"target": "/srv", "source": "/dev/md127", "fstype": "ext4", "options": ("rw", "noatime"),
              "size_bytes": 2000 * GiB, "avail_bytes": 1500 * GiB} | kw
    return Mount(**fields)


def bench_record(source: str = "/dev/md127", target: str = "/srv") -> BenchRecord:
    job = IoResult("seq_read_1m", MiB, 1, "direct", 3000.0, 2861.0, 300.0, 420.0, 0.1, [2861.0] * 10)
    return BenchRecord(source, target, "ext4", StorageResult(STORE, 256 * MiB, "direct", [job]))


def md127(degraded: bool = False) -> MdArray:
    return MdArrays().process(0, MDSTAT_DEGRADED if degraded else MDSTAT_HEALTHY)[0]


def host(facts: dict, **storage) -> Host:
    target = Target(name="box", entry=HostEntry(address="10.0.0.5", vars=HostVars(
        prefix=PREFIX, storage=StorageVars(**storage))))
    return Host.offline(target, facts)


def converged(over: dict | None = None) -> dict:
    """A store on a healthy md RAID 1 mounted noatime, with this mount's figures recorded."""
    return {MountUnder(STORE): mount(), MdArrays(): (md127(),), RecordedBench(BENCH): bench_record(),
            BlockAncestors("/dev/md127"): ("/dev/md127", "/dev/nvme1n1", "/dev/nvme2n1"),
            DiskUsage(f"{STORE}/llama/q4"): 0, FstabMountPoints("/etc/fstab"): ("/", "/srv")} | (over or {})


def unused(path: str) -> DeviceProbe:
    return DeviceProbe(path, True, path)


def array_host(probes: dict[str, DeviceProbe], over: dict | None = None, bench: bool = True) -> Host:
    """No array yet, nothing in the store, and the requested devices as probed."""
    facts = {MdArrays(): (), HoldsFiles(STORE): False, CommandExists("mdadm"): False,
             CommandExists("mkfs.ext4"): True, FstabMountPoints("/etc/fstab"): ("/",)}
    facts |= {BlockDevice(p): probe for p, probe in probes.items()}
    return host(facts | (over or {}), array=REQUEST, mount_options=("noatime",), bench=bench)


# Facts: captured output -> typed value.

def test_findmnt_json_gives_the_mount_with_its_options_and_free_bytes():
    m = MountUnder(STORE).process(0, FINDMNT_NVME)
    assert m == Mount("/srv", "/dev/md127", "ext4", ("rw", "noatime", "stripe=256"), 2000 * GiB, 1500 * GiB)
    assert m.lacks(("noatime", "nodiratime")) == ("nodiratime",)


def test_findmnt_sizes_given_as_strings_by_older_util_linux_are_read_too():
    out = FINDMNT_NVME.replace(str(2000 * GiB), f'"{2000 * GiB}"').replace(str(1500 * GiB), f'"{1500 * GiB}"')
    assert MountUnder(STORE).process(0, out).avail_bytes == 1500 * GiB


def test_a_btrfs_subvolume_source_is_read_as_its_device():
    out = FINDMNT_NVME.replace('"/dev/md127"', '"/dev/nvme0n1p2[/@models]"')
    assert MountUnder(STORE).process(0, out).source == "/dev/nvme0n1p2"


@pytest.mark.parametrize("code,out", [(1, ""), (0, "not json"), (0, '{"filesystems": []}'),
                                      (0, '{"filesystems": [{"target": "/", "size": null, "avail": 1}]}'),
                                      (0, "[1, 2]")])
def test_findmnt_failure_or_odd_output_gives_no_mount(code, out):
    assert MountUnder(STORE).process(code, out) is None


def test_the_mount_probe_walks_up_to_a_parent_that_exists():
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", MountUnder("/proc/no/such/dir").command()],
                         capture_output=True, text=True)
    assert MountUnder("/proc/no/such/dir").process(out.returncode, out.stdout).target == "/proc"


def test_sysfs_gives_each_md_array_with_its_members_and_names():
    (array,) = MdArrays().process(0, MDSTAT_HEALTHY)
    assert array.device == "/dev/md127" and array.aliases == ("/dev/md/models",) and array.level == "raid1"
    assert array.members == (MdMember("/dev/nvme1n1", ("in_sync",)), MdMember("/dev/nvme2n1", ("in_sync",)))
    assert array.named("/dev/md/models") and array.named("/dev/md127") and not array.named("/dev/md0")
    assert array.problems() == ()


def test_a_degraded_array_names_its_failed_member_and_missing_count():
    assert md127(degraded=True).problems() == ("degraded: 1 of 2 devices missing", "failed member /dev/nvme2n1")


def test_raid0_without_a_degraded_file_and_a_resyncing_mirror_count_as_healthy():
    arrays = MdArrays().process(0, MDSTAT_RAID0_AND_RESYNCING_RAID1)
    assert [a.device for a in arrays] == ["/dev/md0", "/dev/md1"]
    assert [a.problems() for a in arrays] == [(), ()] and arrays[1].sync_action == "resync"


def test_an_inactive_array_is_unhealthy_and_lines_before_the_first_array_are_ignored():
    out = "noise here\n\n" + MDSTAT_HEALTHY.replace("array_state clean", "array_state inactive")
    assert MdArrays().process(0, out)[0].problems() == ("array state inactive",)
    assert MdArrays().process(0, "") == ()


def test_a_member_with_several_states_is_faulty_when_one_of_them_is():
    out = MDSTAT_HEALTHY.replace("member /dev/nvme2n1 in_sync", "member /dev/nvme2n1 faulty,write_error")
    assert MdArrays().process(0, out)[0].members[1].faulty


def test_a_blank_device_is_unused():
    probe = BlockDevice("/dev/disk/by-id/nvme-A").process(0, "kernel /dev/nvme1n1\n")
    assert probe == DeviceProbe("/dev/disk/by-id/nvme-A", True, "/dev/nvme1n1") and probe.in_use() is None


def test_a_device_with_a_filesystem_a_holder_or_partitions_is_in_use_and_says_why():
    out = ("kernel /dev/sdb\nsignature ext4\nsignature gpt\nholder /dev/md0\npartition /dev/sdb1\n"
           "mounted /data\n")
    probe = BlockDevice("/dev/sdb").process(0, out)
    assert probe.signatures == ("ext4", "gpt") and probe.holders == ("/dev/md0",)
    assert probe.in_use() == ("/dev/sdb holds ext4, gpt; has partitions /dev/sdb1; is used by /dev/md0; "
                              "is mounted at /data")


def test_a_missing_or_unprobeable_device_is_never_taken_as_unused():
    assert BlockDevice("/dev/sdz").process(0, "absent\n").in_use() == "/dev/sdz is not a block device"
    assert BlockDevice("/dev/sdz").process(1, "").in_use() == "/dev/sdz is not a block device"
    denied = BlockDevice("/dev/sda").process(0, "kernel /dev/sda\nunreadable wipefs: Operation not permitted\n")
    assert "cannot be probed (wipefs: Operation not permitted)" in denied.in_use()


def test_lsblk_gives_a_mounts_devices_and_none_for_a_non_block_source():
    out = "dm-0\nmd127\nnvme1n1\nnvme2n1\nmd127\n"
    assert BlockAncestors("/dev/mapper/vg-models").process(0, out) == (
        "/dev/dm-0", "/dev/md127", "/dev/nvme1n1", "/dev/nvme2n1")
    assert BlockAncestors("overlay").process(0, "") == ()


def test_disk_usage_files_and_fstab_read_what_is_there():
    assert DiskUsage(STORE).process(0, f"{5 * GiB}\t{STORE}\n") == 5 * GiB
    assert DiskUsage(STORE).process(0, "") == 0 and DiskUsage(STORE).process(1, "du: error") == 0
    assert HoldsFiles(STORE).process(0, f"{STORE}/lost+found\n") and not HoldsFiles(STORE).process(0, "")
    fstab = "# /etc/fstab\nUUID=1 / ext4 defaults 0 1\n\nUUID=2 /srv/my\\040models xfs noatime 0 2\n#x /y\n"
    assert FstabMountPoints("/etc/fstab").process(0, fstab) == ("/", "/srv/my models")


def test_a_recorded_bench_reads_back_and_a_damaged_one_reads_as_none():
    record = bench_record()
    assert RecordedBench(BENCH).process(0, json.dumps(asdict(record))) == record
    assert RecordedBench(BENCH).process(0, '{"source": "/dev/md127"}') is None
    assert RecordedBench(BENCH).process(0, "{truncated") is None
    assert RecordedBench(BENCH).process(1, "") is None


def test_the_bench_cli_prints_a_result_the_step_reads(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.storage_cli", str(tmp_path), "--size-mib", "4",
                          "--rand-seconds", "0.1", "--queue-depth", "2"],
                         capture_output=True, text=True, check=True)
    result = storage_result(out.stdout)
    assert [j.name for j in result.jobs] == ["seq_write_1m", "seq_read_1m", "rand_read_4k_qd1",
                                             "rand_read_4k_qd2"]
    assert result.path == str(tmp_path) and not list(tmp_path.iterdir())
    assert storage_result("Traceback (most recent call last):") is None


# The inventory.

def test_the_inventory_asks_for_nothing_on_storage_by_default():
    assert HostVars().storage == StorageVars(mount_options=(), remount=False, filesystem=None, min_free_gib=0,
                                             array=None, bench=True)


@pytest.mark.parametrize("request_", [
    {"name": "/dev/sda", "level": 1, "devices": ["/dev/sdb", "/dev/sdc"]},
    {"name": "/dev/md/x", "level": 1, "devices": ["/dev/sdb"]},
    {"name": "/dev/md/x", "level": 5, "devices": ["/dev/sdb", "/dev/sdc"]},
    {"name": "/dev/md/x", "level": 1, "devices": ["/dev/sdb", "/dev/sdb"]},
    {"name": "/dev/md/x", "level": 1, "devices": ["/dev/sdb", "/dev/../etc/passwd"]},
    {"name": "/dev/md/x", "level": 1, "devices": ["/dev/sdb", "sdc"]},
    {"name": "/dev/md/x", "level": 3, "devices": ["/dev/sdb", "/dev/sdc"]},
    {"name": "/dev/md/x", "level": 1, "devices": ["/dev/sdb", "/dev/sdc"], "chunk": 512},
])
def test_an_array_request_that_is_not_a_sane_md_array_is_rejected(request_):
    with pytest.raises(ValidationError):
        ArrayRequest.model_validate(request_)


def test_mount_options_are_single_options_and_the_filesystem_agrees_with_the_arrays():
    with pytest.raises(ValidationError, match="single mount option"):
        StorageVars(mount_options=("noatime,exec",))
    with pytest.raises(ValidationError, match="differs"):
        StorageVars(filesystem="xfs", array=REQUEST)


# Facts -> changes.

def test_a_healthy_noatime_store_with_its_bench_recorded_needs_nothing():
    assert not Storage(10 * GiB, "llama/q4").check(host(converged(), mount_options=("noatime",),
                                                         filesystem="ext4"))


def test_missing_mount_options_fail_unless_the_inventory_allows_a_remount():
    facts = converged({MountUnder(STORE): mount(options=("rw", "relatime"))})
    with pytest.raises(StepFailed, match=r"/srv \(/dev/md127\) is mounted without noatime.*storage.remount"):
        Storage(GiB).check(host(facts, mount_options=("noatime",)))
    todo = Storage(GiB).check(host(facts, mount_options=("noatime",), remount=True))
    assert todo.items == (Remount("/srv", ("noatime",)),)
    assert todo.describe().startswith("remount /srv with noatime")


def test_too_little_free_space_for_the_model_fails_saying_how_much():
    facts = converged({MountUnder(STORE): mount(avail_bytes=3 * GiB)})
    with pytest.raises(StepFailed, match=r"/srv \(/dev/md127\) has 3.00 GiB free; the model store needs 5.00"):
        Storage(5 * GiB, "llama/q4").check(host(facts))
    with pytest.raises(StepFailed, match="needs 4.50 GiB"):
        Storage(0).check(host(facts, min_free_gib=4.5))


def test_the_models_bytes_already_in_the_store_count_towards_its_need():
    facts = converged({MountUnder(STORE): mount(avail_bytes=3 * GiB), DiskUsage(f"{STORE}/llama/q4"): 4 * GiB})
    assert not Storage(5 * GiB, "llama/q4").check(host(facts))


def test_a_degraded_array_under_the_store_fails_the_step_naming_the_array_and_its_state():
    h = host(converged({MdArrays(): (md127(degraded=True),)}))
    with pytest.raises(StepFailed) as failed:
        Storage(GiB).check(h)
    assert str(failed.value) == ("box: md array /dev/md127 (/dev/md/models) under /srv is not healthy "
                                 "(raid1, clean): degraded: 1 of 2 devices missing; failed member /dev/nvme2n1")
    result = run_step(Storage(GiB), h, dry_run=True)
    assert result.status == "failed" and "/dev/md127" in result.detail and "degraded" in result.detail


def test_a_degraded_array_elsewhere_on_the_host_is_not_the_stores_concern():
    other = MdArrays().process(0, MDSTAT_DEGRADED.replace("md127", "md5").replace("models", "backup"))
    assert not Storage(GiB).check(host(converged({MdArrays(): (md127(), *other)})))


def test_a_store_on_another_filesystem_than_the_inventory_names_fails():
    with pytest.raises(StepFailed, match="is ext4; the inventory asks for xfs"):
        Storage(GiB).check(host(converged(), filesystem="xfs"))


def test_the_bench_is_taken_when_missing_or_taken_on_another_mount_and_never_when_switched_off():
    assert Storage(GiB).check(host(converged({RecordedBench(BENCH): None}))).items == (RecordBench(STORE),)
    moved = converged({RecordedBench(BENCH): bench_record(source="/dev/nvme0n1p2", target="/")})
    assert Storage(GiB).check(host(moved)).items == (RecordBench(STORE),)
    assert not Storage(GiB).check(host(converged({RecordedBench(BENCH): None}), bench=False))


def test_a_bench_record_summarises_its_figures():
    assert bench_record().summary() == "/dev/md127 on /srv (direct): seq_read_1m 3000 MB/s"


# Array requests.

def test_an_array_over_blank_devices_is_created_formatted_mounted_and_added_to_fstab():
    devices = REQUEST.devices
    todo = Storage(GiB).check(array_host({d: unused(d) for d in devices}, bench=False))
    md = "/dev/md/models"
    assert todo.items == (InstallPackages(("mdadm",)), CreateArray(REQUEST), MakeFilesystem(md, "ext4"),
                          MountArray(md, STORE, ("noatime",)), AddFstabEntry(md, STORE, "ext4", ("noatime",)))
    assert todo.items[-1].line("1234-abcd") == f"UUID=1234-abcd {STORE} ext4 noatime,nofail 0 2"


def test_the_bench_is_taken_on_a_new_array_after_it_is_mounted():
    devices = REQUEST.devices
    todo = Storage(GiB).check(array_host({d: unused(d) for d in devices}))
    assert todo.items[-1] == RecordBench(STORE)


def test_an_array_is_never_created_over_a_device_that_holds_a_filesystem():
    probes = {"/dev/nvme1n1": unused("/dev/nvme1n1"),
              "/dev/nvme2n1": DeviceProbe("/dev/nvme2n1", True, "/dev/nvme2n1", signatures=("xfs",))}
    with pytest.raises(StepFailed, match="refusing to create an array: /dev/nvme2n1 holds xfs"):
        Storage(GiB).check(array_host(probes))


def test_an_array_is_never_created_over_a_former_array_member_or_a_missing_device():
    former_member = DeviceProbe("/dev/nvme1n1", True, "/dev/nvme1n1", signatures=("linux_raid_member",))
    probes = {"/dev/nvme1n1": former_member, "/dev/nvme2n1": DeviceProbe("/dev/nvme2n1", False)}
    with pytest.raises(StepFailed, match="nvme1n1 holds linux_raid_member; /dev/nvme2n1 is not a block device"):
        Storage(GiB).check(array_host(probes))


def test_an_array_is_not_mounted_over_a_store_that_holds_files():
    h = array_host({d: unused(d) for d in REQUEST.devices}, {HoldsFiles(STORE): True})
    with pytest.raises(StepFailed, match="holds files that mounting the array over it would hide"):
        Storage(GiB).check(h)


def test_an_existing_array_mounted_under_the_store_needs_only_its_fstab_line():
    facts = converged({FstabMountPoints("/etc/fstab"): ("/",)}) | {
        BlockDevice(d): unused(d) for d in REQUEST.devices}
    todo = Storage(GiB).check(host(facts, array=REQUEST))
    assert todo.items == (AddFstabEntry("/dev/md/models", "/srv", "ext4", ()),)
    facts[FstabMountPoints("/etc/fstab")] = ("/", "/srv")
    assert not Storage(GiB).check(host(facts, array=REQUEST))


def test_an_existing_unmounted_array_with_the_filesystem_is_mounted_without_a_new_one():
    formatted = DeviceProbe("/dev/md/models", True, "/dev/md127", signatures=("ext4",))
    facts = {MdArrays(): (md127(),), MountUnder(STORE): mount(source="/dev/vda1", target="/"),
             BlockAncestors("/dev/vda1"): ("/dev/vda1", "/dev/vda"), HoldsFiles(STORE): False,
             BlockDevice("/dev/md/models"): formatted, FstabMountPoints("/etc/fstab"): ("/", STORE)}
    facts |= {BlockDevice(d): unused(d) for d in REQUEST.devices}
    todo = Storage(GiB).check(host(facts, array=REQUEST, bench=False))
    assert todo.items == (MountArray("/dev/md/models", STORE, ()),)


def test_an_existing_array_with_another_layout_or_a_failed_member_is_left_alone_with_a_failure():
    facts = converged() | {BlockDevice(d): unused(d) for d in REQUEST.devices}
    with pytest.raises(StepFailed, match="exists as raid1 .* not the inventory's RAID 10 .*does not change"):
        Storage(GiB).check(host(facts, array=REQUEST.model_copy(update={"level": 10})))
    facts[MdArrays()] = (md127(degraded=True),)
    with pytest.raises(StepFailed, match="/dev/md127 \\(/dev/md/models\\) under .* degraded"):
        Storage(GiB).check(host(facts, array=REQUEST))
