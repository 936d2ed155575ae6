"""Facts about the volume under the model store: its mount and free space, the md arrays beneath
it (from sysfs, which mdadm itself reads), what a block device already holds before anything is
written to it, and the storage benchmark recorded for the mount."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from typing import Any

from bench.storage import IoResult, StorageResult
from provision.core import Fact, q

# md's array_state values under which the array serves I/O normally (Documentation/admin-guide/md.rst).
HEALTHY_ARRAY_STATES = ("clean", "active", "active-idle", "write-pending", "read-auto")

MD_ARRAYS_SCRIPT = r"""
for md in /sys/block/md*/md; do
  if [ ! -d "$md" ]; then continue; fi
  k=${md%/md}; k=${k##*/}
  echo "array /dev/$k"
  for f in level raid_disks degraded array_state sync_action; do
    echo "$f $(cat "$md/$f" 2>/dev/null || true)"
  done
  for m in "$md"/dev-*; do
    if [ -d "$m" ]; then echo "member /dev/${m##*/dev-} $(cat "$m/state" 2>/dev/null || true)"; fi
  done
  for a in /dev/md/*; do
    if [ "$(readlink -f "$a")" = "/dev/$k" ]; then echo "alias $a"; fi
  done
done
"""

# Runs after `d=<device>`; wipefs lists every signature, where blkid -p names only one.
BLOCK_DEVICE_SCRIPT = r"""
if [ ! -b "$d" ]; then echo absent; exit 0; fi
k=$(readlink -f "$d"); n=${k##*/}
echo "kernel $k"
if sigs=$(wipefs --no-act --noheadings --output TYPE "$d" 2>&1); then
  printf '%s\n' "$sigs" | sed '/^ *$/d; s/^/signature /'
else
  echo "unreadable $(printf '%s' "$sigs" | head -n 1)"
fi
for h in /sys/class/block/"$n"/holders/*; do
  if [ -e "$h" ]; then echo "holder /dev/${h##*/}"; fi
done
for p in /sys/class/block/"$n"/"$n"*; do
  if [ -e "$p/partition" ]; then echo "partition /dev/${p##*/}"; fi
done
findmnt -rn -o TARGET --source "$d" | sed 's/^/mounted /' || true
"""


def _json(stdout: str) -> Any:
    try:
        return json.loads(stdout)
    except ValueError:
        return None


def _count(value: object) -> int | None:
    """A byte or device count that findmnt and sysfs give as a number or as digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _words(stdout: str) -> list[tuple[str, str]]:
    """`key rest-of-line` pairs of a probe's output, blank lines dropped."""
    pairs = []
    for line in stdout.splitlines():
        key, _, rest = line.strip().partition(" ")
        if key:
            pairs.append((key, rest.strip()))
    return pairs


@dataclass(frozen=True)
class Mount:
    target: str
    source: str
    fstype: str
    options: tuple[str, ...]
    size_bytes: int
    avail_bytes: int

    def lacks(self, wanted: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(o for o in wanted if o not in self.options)


@dataclass(frozen=True)
class MountUnder(Fact["Mount | None"]):
    """The filesystem holding `path`, or its nearest existing parent (the store may not exist yet);
    None when findmnt gives nothing readable."""
    path: str

    def command(self) -> str:
        return (f"p={q(self.path)}; while [ ! -e \"$p\" ]; do p=$(dirname \"$p\"); done; "
                "findmnt -J -b -T \"$p\" -o TARGET,SOURCE,FSTYPE,OPTIONS,SIZE,AVAIL")

    def process(self, code: int, stdout: str) -> Mount | None:
        data = _json(stdout) if code == 0 else None
        found = data.get("filesystems") if isinstance(data, dict) else None
        if not isinstance(found, list) or not found or not isinstance(found[0], dict):
            return None
        fs = found[0]
        size, avail = _count(fs.get("size")), _count(fs.get("avail"))
        if not fs.get("target") or size is None or avail is None:
            return None
        # btrfs names its subvolume after the device: /dev/nvme0n1p2[/@models]
        source = re.sub(r"\[.*\]$", "", str(fs.get("source") or ""))
        options = tuple(o for o in str(fs.get("options") or "").split(",") if o)
        return Mount(str(fs["target"]), source, str(fs.get("fstype") or ""), options, size, avail)


@dataclass(frozen=True)
class BlockAncestors(Fact["tuple[str, ...]"]):
    """The kernel devices a block device is built from, itself first (an LV, the md array under
    it, the array's members); empty when the source is no block device (overlay, tmpfs)."""
    device: str

    def command(self) -> str:
        return f"lsblk -n -l -s -o KNAME \"$(readlink -f {q(self.device)})\" 2>/dev/null || true"

    def process(self, code: int, stdout: str) -> tuple[str, ...]:
        names = [line.strip() for line in stdout.splitlines()]
        return tuple(dict.fromkeys(f"/dev/{n}" for n in names if re.fullmatch(r"[A-Za-z0-9_.:!-]+", n)))


@dataclass(frozen=True)
class MdMember:
    device: str
    states: tuple[str, ...]

    @property
    def faulty(self) -> bool:
        return "faulty" in self.states


@dataclass(frozen=True)
class MdArray:
    device: str
    aliases: tuple[str, ...]
    level: str
    raid_disks: int
    degraded: int
    array_state: str
    sync_action: str
    members: tuple[MdMember, ...]

    def named(self, name: str) -> bool:
        return name == self.device or name in self.aliases

    def label(self) -> str:
        return self.device + (f" ({', '.join(self.aliases)})" if self.aliases else "")

    def problems(self) -> tuple[str, ...]:
        found = []
        if self.array_state not in HEALTHY_ARRAY_STATES:
            found.append(f"array state {self.array_state or 'unknown'}")
        if self.degraded:
            found.append(f"degraded: {self.degraded} of {self.raid_disks} devices missing")
        failed = [m.device for m in self.members if m.faulty]
        if failed:
            found.append("failed member " + ", ".join(failed))
        return tuple(found)


def _md_member(text: str) -> MdMember:
    device, _, states = text.partition(" ")
    return MdMember(device, tuple(s for s in states.strip().split(",") if s))


def _md_array(device: str, pairs: list[tuple[str, str]]) -> MdArray:
    values = {k: v for k, v in pairs if k in ("level", "raid_disks", "degraded", "array_state", "sync_action")}
    members = tuple(_md_member(rest) for k, rest in pairs if k == "member" and rest)
    return MdArray(device, tuple(rest for k, rest in pairs if k == "alias" and rest), values.get("level", ""),
                   _count(values.get("raid_disks")) or 0, _count(values.get("degraded")) or 0,
                   values.get("array_state", ""), values.get("sync_action", ""), members)


@dataclass(frozen=True)
class MdArrays(Fact["tuple[MdArray, ...]"]):
    """Every md array the kernel knows, with its members' states and its /dev/md/ names."""

    def command(self) -> str:
        return MD_ARRAYS_SCRIPT

    def process(self, code: int, stdout: str) -> tuple[MdArray, ...]:
        arrays: list[tuple[str, list[tuple[str, str]]]] = []
        for key, rest in _words(stdout):
            if key == "array" and rest.startswith("/dev/md"):
                arrays.append((rest, []))
            elif arrays:
                arrays[-1][1].append((key, rest))
        return tuple(_md_array(device, pairs) for device, pairs in arrays)


@dataclass(frozen=True)
class DeviceProbe:
    """What a block device already holds; `in_use` says why nothing may be written to it."""
    path: str
    exists: bool
    kernel_path: str = ""
    signatures: tuple[str, ...] = ()
    holders: tuple[str, ...] = ()
    partitions: tuple[str, ...] = ()
    mountpoints: tuple[str, ...] = ()
    unreadable: str = ""

    def in_use(self) -> str | None:
        if not self.exists:
            return f"{self.path} is not a block device"
        reasons = [
            f"holds {', '.join(self.signatures)}" if self.signatures else "",
            f"has partitions {', '.join(self.partitions)}" if self.partitions else "",
            f"is used by {', '.join(self.holders)}" if self.holders else "",
            f"is mounted at {', '.join(self.mountpoints)}" if self.mountpoints else "",
            f"cannot be probed ({self.unreadable})" if self.unreadable else "",
        ]
        found = [r for r in reasons if r]
        return f"{self.path} " + "; ".join(found) if found else None


@dataclass(frozen=True)
class BlockDevice(Fact[DeviceProbe]):
    """Every signature wipefs finds on a device (filesystem, RAID member, LVM, partition table),
    its holders (md, dm), partitions and mounts."""
    path: str

    def command(self) -> str:
        return f"d={q(self.path)}\n{BLOCK_DEVICE_SCRIPT}"

    def process(self, code: int, stdout: str) -> DeviceProbe:
        pairs = _words(stdout)
        if code != 0 or not pairs or pairs[0][0] == "absent":
            return DeviceProbe(self.path, False)

        def every(key: str) -> tuple[str, ...]:
            return tuple(rest for k, rest in pairs if k == key and rest)

        return DeviceProbe(self.path, True, next(iter(every("kernel")), self.path), every("signature"),
                           every("holder"), every("partition"), every("mounted"), " ".join(every("unreadable")))


@dataclass(frozen=True)
class DiskUsage(Fact[int]):
    """Bytes under a path (apparent size, as the catalog counts them); 0 when it does not exist."""
    path: str

    def command(self) -> str:
        return f"if [ -e {q(self.path)} ]; then du -sb {q(self.path)}; fi"

    def process(self, code: int, stdout: str) -> int:
        head = stdout.split()
        return (_count(head[0]) or 0) if code == 0 and head else 0


@dataclass(frozen=True)
class HoldsFiles(Fact[bool]):
    """Whether a directory has any entry, so that a mount would hide it."""
    path: str

    def command(self) -> str:
        return f"if [ -d {q(self.path)} ]; then find {q(self.path)} -mindepth 1 -maxdepth 1 -print -quit; fi"

    def process(self, code: int, stdout: str) -> bool:
        return code == 0 and bool(stdout.strip())


@dataclass(frozen=True)
class FstabMountPoints(Fact["tuple[str, ...]"]):
    path: str

    def command(self) -> str:
        return f"cat {q(self.path)} 2>/dev/null || true"

    def process(self, code: int, stdout: str) -> tuple[str, ...]:
        points = []
        for line in stdout.splitlines():
            cols = line.split()
            if len(cols) >= 2 and not cols[0].startswith("#"):
                points.append(cols[1].replace("\\040", " "))
        return tuple(points)


@dataclass(frozen=True)
class BenchRecord:
    """bench.micro's storage figures for the filesystem the store was on when they were taken."""
    source: str
    target: str
    fstype: str
    storage: StorageResult

    def summary(self) -> str:
        jobs = {j.name: j for j in self.storage.jobs}
        parts = [f"{name} {jobs[name].bandwidth_mbps:.0f} MB/s" for name in ("seq_write_1m", "seq_read_1m")
                 if name in jobs]
        parts += [f"{j.name} {j.iops:.0f} IOPS" for j in self.storage.jobs if j.name.startswith("rand_read")]
        return f"{self.source} on {self.target} ({self.storage.mode}): " + ", ".join(parts)


def storage_result(text: str) -> StorageResult | None:
    """bench.storage's result from the JSON that bench.storage_cli prints; None when it is not that."""
    return _storage_result(_json(text))


def _storage_result(data: object) -> StorageResult | None:
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        return None
    names = {f.name for f in fields(IoResult)}
    try:
        jobs = [IoResult(**{k: v for k, v in j.items() if k in names}) for j in data["jobs"]]
        return StorageResult(str(data["path"]), int(data["file_bytes"]), str(data["mode"]), jobs)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def bench_record(data: object) -> BenchRecord | None:
    if not isinstance(data, dict):
        return None
    storage = _storage_result(data.get("storage"))
    if storage is None or not all(isinstance(data.get(k), str) for k in ("source", "target", "fstype")):
        return None
    return BenchRecord(data["source"], data["target"], data["fstype"], storage)


@dataclass(frozen=True)
class RecordedBench(Fact["BenchRecord | None"]):
    path: str

    def command(self) -> str:
        return f"cat {q(self.path)}"

    def process(self, code: int, stdout: str) -> BenchRecord | None:
        return bench_record(_json(stdout)) if code == 0 else None
