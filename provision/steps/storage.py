"""The volume under the model store: any md array beneath it healthy, the filesystem and mount
options the inventory names, room for the model, and bench.micro's storage figures recorded for
that mount. An array is created only when the inventory asks, and never on a device that holds
anything (a filesystem, a RAID or LVM signature, a partition table, a holder or a mount)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from provision.core import Change, Changes, Host, Step, StepFailed, changes, q
from provision.facts import CommandExists, FileExists
from provision.inventory import ArrayRequest, StorageVars
from provision.steps.base import InstallPackages, apt_install, upload_text
from provision.storage_facts import (
    BenchRecord,
    BlockAncestors,
    BlockDevice,
    DiskUsage,
    FstabMountPoints,
    HoldsFiles,
    MdArray,
    MdArrays,
    Mount,
    MountUnder,
    RecordedBench,
    storage_result,
)

GiB = 1 << 30
BENCH_MIB = 256
BENCH_RAND_SECONDS = 1.0
BENCH_QUEUE_DEPTH = 16
MKFS = {"ext4": "mkfs.ext4", "xfs": "mkfs.xfs"}
MKFS_PACKAGES = {"ext4": "e2fsprogs", "xfs": "xfsprogs"}


@dataclass(frozen=True)
class CreateArray:
    request: ArrayRequest

    def describe(self) -> str:
        r = self.request
        return f"create RAID {r.level} {r.name} from {', '.join(r.devices)}"


@dataclass(frozen=True)
class MakeFilesystem:
    device: str
    filesystem: str

    def describe(self) -> str:
        return f"make {self.filesystem} on {self.device}"


@dataclass(frozen=True)
class MountArray:
    device: str
    target: str
    options: tuple[str, ...]

    def describe(self) -> str:
        with_options = f" ({','.join(self.options)})" if self.options else ""
        return f"mount {self.device} at {self.target}{with_options}"


@dataclass(frozen=True)
class AddFstabEntry:
    device: str
    target: str
    filesystem: str
    options: tuple[str, ...]

    def describe(self) -> str:
        return f"add {self.target} to fstab (by UUID, nofail)"

    def line(self, uuid: str) -> str:
        return f"UUID={uuid} {self.target} {self.filesystem} {','.join((*self.options, 'nofail'))} 0 2"


@dataclass(frozen=True)
class Remount:
    target: str
    options: tuple[str, ...]

    def describe(self) -> str:
        return f"remount {self.target} with {','.join(self.options)} (until reboot, unless /etc/fstab has them)"


@dataclass(frozen=True)
class RecordBench:
    target: str

    def describe(self) -> str:
        return f"benchmark the storage under {self.target}"


class Storage(Step):
    """`required_bytes` is what the model takes in the store; what `model_dir` (relative to the
    store) already holds counts towards it, so a rerun with the model in place needs nothing."""
    name = "storage"

    def __init__(self, required_bytes: int, model_dir: str | None = None, fstab: str = "/etc/fstab"):
        self.required_bytes = required_bytes
        self.model_dir = model_dir
        self.fstab = fstab

    @staticmethod
    def store(host: Host) -> str:
        return f"{host.vars.prefix}/models"

    @staticmethod
    def bench_path(host: Host) -> str:
        return f"{host.vars.prefix}/state/storage-bench.json"

    def check(self, host: Host) -> Changes:
        wanted = host.vars.storage
        store = self.store(host)
        placing = self.array_changes(host, wanted.array) if wanted.array else ()
        if any(isinstance(c, MountArray) for c in placing):
            # The volume the store will be on does not exist or is not mounted yet; verify checks it.
            return changes(*placing, RecordBench(store) if wanted.bench else None)
        mount = store_mount(host, store)
        require_healthy_arrays(host, mount)
        require_filesystem(host, mount, wanted.array.filesystem if wanted.array else wanted.filesystem)
        require_space(host, mount, self.needed_bytes(host))
        return changes(*placing, remount_change(host, mount, wanted), self.bench_change(host, mount))

    def needed_bytes(self, host: Host) -> int:
        present = host.fact(DiskUsage(f"{self.store(host)}/{self.model_dir}")) if self.model_dir else 0
        return max(0, self.required_bytes - present) + int(host.vars.storage.min_free_gib * GiB)

    def bench_change(self, host: Host, mount: Mount) -> RecordBench | None:
        if not host.vars.storage.bench:
            return None
        recorded = host.fact(RecordedBench(self.bench_path(host)))
        if recorded and (recorded.source, recorded.target) == (mount.source, mount.target):
            return None
        return RecordBench(self.store(host))

    def array_changes(self, host: Host, request: ArrayRequest) -> tuple[Change | None, ...]:
        """What puts the store on the requested array: nothing once the array backs it."""
        store = self.store(host)
        options = host.vars.storage.mount_options
        array = next((a for a in host.fact(MdArrays()) if a.named(request.name)), None)
        if array is not None:
            require_layout(host, array, request)
            require_healthy(host, array, store)
            mount = host.fact(MountUnder(store))
            if mount and array.device in host.fact(BlockAncestors(mount.source)):
                return (self.fstab_change(host, request, mount.target),)
        require_store_empty(host, store)
        if array is None:
            require_unused(host, request.devices)
            mkfs = MakeFilesystem(request.name, request.filesystem)
        else:
            mkfs = filesystem_change(host, request, store)
        create = None if array else CreateArray(request)
        return (self.packages(host, request, create is not None, mkfs is not None), create, mkfs,
                MountArray(request.name, store, options), self.fstab_change(host, request, store))

    def packages(self, host: Host, request: ArrayRequest, create: bool, mkfs: bool) -> InstallPackages | None:
        fs = request.filesystem
        missing = tuple(package for package, command, needed in (("mdadm", "mdadm", create),
                                                                 (MKFS_PACKAGES[fs], MKFS[fs], mkfs))
                        if needed and not host.fact(CommandExists(command)))
        return InstallPackages(missing) if missing else None

    def fstab_change(self, host: Host, request: ArrayRequest, target: str) -> AddFstabEntry | None:
        if target in host.fact(FstabMountPoints(self.fstab)):
            return None
        return AddFstabEntry(request.name, target, request.filesystem, host.vars.storage.mount_options)

    def apply(self, host: Host, todo: Changes) -> str:
        for c in todo.of(InstallPackages):
            apt_install(host, c.packages)
        for c in todo.of(CreateArray):
            create_array(host, c.request)
        for c in todo.of(MakeFilesystem):
            host.sh(f"{MKFS[c.filesystem]} -q {q(c.device)}")
        for c in todo.of(MountArray):
            opts = f"-o {q(','.join(c.options))} " if c.options else ""
            host.sh(f"install -d -m 0755 {q(c.target)} && mount {opts}{q(c.device)} {q(c.target)}")
        for c in todo.of(AddFstabEntry):
            self.add_fstab_entry(host, c)
        for c in todo.of(Remount):
            host.sh(f"mount -o {q(','.join(('remount', *c.options)))} {q(c.target)}")
        host.forget_facts()
        return self.record_bench(host) if todo.of(RecordBench) else ""

    def add_fstab_entry(self, host: Host, entry: AddFstabEntry) -> None:
        uuid = host.sh(f"blkid -s UUID -o value {q(entry.device)}")[1].strip()
        if not uuid:
            raise StepFailed(f"{host.name}: {entry.device} has no filesystem UUID to put in {self.fstab}")
        host.sh(f"printf '%s\\n' {q(entry.line(uuid))} >> {q(self.fstab)}")

    def record_bench(self, host: Host) -> str:
        v = host.vars
        store, app, python = self.store(host), f"{v.prefix}/app", f"{v.prefix}/venv/bin/python"
        if not host.fact(FileExists(f"{app}/bench/storage_cli.py")) or not host.fact(FileExists(python)):
            raise StepFailed(f"{host.name}: no {app}/bench/storage_cli.py or {python}: python-env ships them "
                             "(or set storage.bench: false)")
        mount = store_mount(host, store)
        out = host.sh(f"install -d -m 0755 {q(store)} && cd {q(app)} && PYTHONPATH={q(app)} {q(python)} "
                      f"-m bench.storage_cli {q(store)} --size-mib {BENCH_MIB} "
                      f"--rand-seconds {BENCH_RAND_SECONDS} --queue-depth {BENCH_QUEUE_DEPTH}")[1]
        result = storage_result(out)
        if result is None:
            raise StepFailed(f"{host.name}: bench.storage_cli printed no result: {out[-300:]!r}")
        record = BenchRecord(mount.source, mount.target, mount.fstype, result)
        upload_text(host, self.bench_path(host), json.dumps(asdict(record), indent=1) + "\n")
        return record.summary()


def store_mount(host: Host, store: str) -> Mount:
    mount = host.fact(MountUnder(store))
    if mount is None:
        raise StepFailed(f"{host.name}: cannot read the filesystem under {store} (findmnt -T)")
    return mount


def require_healthy(host: Host, array: MdArray, store: str) -> None:
    problems = array.problems()
    if problems:
        raise StepFailed(f"{host.name}: md array {array.label()} under {store} is not healthy "
                         f"({array.level or 'level unknown'}, {array.array_state or 'state unknown'}): "
                         + "; ".join(problems))


def require_healthy_arrays(host: Host, mount: Mount) -> None:
    beneath = host.fact(BlockAncestors(mount.source)) if mount.source.startswith("/dev/") else ()
    for array in host.fact(MdArrays()):
        if array.device in beneath:
            require_healthy(host, array, mount.target)


def require_filesystem(host: Host, mount: Mount, expected: str | None) -> None:
    if expected and mount.fstype != expected:
        raise StepFailed(f"{host.name}: {mount.target} ({mount.source}) is {mount.fstype}; the inventory "
                         f"asks for {expected}")


def require_space(host: Host, mount: Mount, needed: int) -> None:
    if mount.avail_bytes < needed:
        raise StepFailed(f"{host.name}: {mount.target} ({mount.source}) has {mount.avail_bytes / GiB:.2f} GiB "
                         f"free; the model store needs {needed / GiB:.2f} GiB")


def remount_change(host: Host, mount: Mount, wanted: StorageVars) -> Remount | None:
    missing = mount.lacks(wanted.mount_options)
    if not missing:
        return None
    if not wanted.remount:
        raise StepFailed(f"{host.name}: {mount.target} ({mount.source}) is mounted without "
                         f"{','.join(missing)}; add them to /etc/fstab, or set storage.remount: true")
    return Remount(mount.target, missing)


def require_layout(host: Host, array: MdArray, request: ArrayRequest) -> None:
    members = {m.device for m in array.members}
    asked = {host.fact(BlockDevice(d)).kernel_path or d for d in request.devices}
    if array.level != f"raid{request.level}" or not members <= asked:
        raise StepFailed(f"{host.name}: {array.label()} exists as {array.level} of "
                         f"{', '.join(sorted(members))}, not the inventory's RAID {request.level} of "
                         f"{', '.join(request.devices)}; "
                         "provisioning does not change an existing array")


def require_unused(host: Host, devices: tuple[str, ...]) -> None:
    used = [reason for reason in (host.fact(BlockDevice(d)).in_use() for d in devices) if reason]
    if used:
        raise StepFailed(f"{host.name}: refusing to create an array: " + "; ".join(used))


def require_store_empty(host: Host, store: str) -> None:
    if host.fact(HoldsFiles(store)):
        raise StepFailed(f"{host.name}: {store} holds files that mounting the array over it would hide; "
                         "move them away first")


def filesystem_change(host: Host, request: ArrayRequest, store: str) -> MakeFilesystem | None:
    """The filesystem an existing, unmounted array needs: none when it has the requested one."""
    probe = host.fact(BlockDevice(request.name))
    if probe.mountpoints:
        raise StepFailed(f"{host.name}: {request.name} is mounted at {', '.join(probe.mountpoints)}, "
                         f"not under {store}")
    if probe.unreadable:
        raise StepFailed(f"{host.name}: cannot probe {request.name}: {probe.unreadable}")
    if not probe.signatures:
        return MakeFilesystem(request.name, request.filesystem)
    if probe.signatures != (request.filesystem,):
        raise StepFailed(f"{host.name}: {request.name} holds {', '.join(probe.signatures)}, not "
                         f"{request.filesystem}; provisioning does not reformat it")
    return None


def create_array(host: Host, request: ArrayRequest) -> None:
    # The facts the check read may be stale by now; probe the devices again right before writing.
    host.forget_facts()
    require_unused(host, request.devices)
    host.sh(f"mdadm --create {q(request.name)} --run --metadata=1.2 --level={request.level} "
            f"--raid-devices={len(request.devices)} {q(*request.devices)}")
    host.sh("if command -v udevadm >/dev/null; then udevadm settle -t 10 || true; fi")
