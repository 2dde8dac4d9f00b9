"""Data volumes: ``VolumeSpec`` → a sparse host file holding ext4, attached as virtio-blk.

The file is created sparse and formatted **on the host** with ``mkfs.ext4`` the first time it
is used: the guest's busybox has no ``mkfs.ext4``, and formatting host-side means an image is
complete before any guest sees it (a VM killed mid-format cannot leave half a filesystem).
Later VMs reuse the file, so data persists. Each volume gets a serial number
(``smvol0``, ``smvol1`` …) that the guest's init finds in ``/sys/block/vd*/serial``: mounts
follow the serial, not the probe order of the devices.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

from .config import VolumeSpec
from .errors import VmError

EXT4_MAGIC_OFFSET = 1024 + 0x38
EXT4_MAGIC = b"\x53\xef"
MIB = 1024 * 1024


class VolumeError(VmError):
    """A volume file could not be created, formatted or used."""


@dataclasses.dataclass(frozen=True)
class PreparedVolume:
    spec: VolumeSpec
    serial: str
    path: Path
    formatted_now: bool

    @property
    def cmdline_entry(self) -> str:
        return f"{self.serial}:{self.spec.guest_path}:{'ro' if self.spec.read_only else 'rw'}"


def has_ext4(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(EXT4_MAGIC_OFFSET)
            return f.read(2) == EXT4_MAGIC
    except OSError:
        return False


def prepare(spec: VolumeSpec, index: int) -> PreparedVolume:
    """Create and format the volume file when it is new; check it when it exists."""
    path = Path(spec.host_path)
    serial = f"smvol{index}"
    if path.exists():
        if not path.is_file():
            raise VolumeError(f"volume {path} exists but is not a regular file")
        if has_ext4(path):
            return PreparedVolume(spec, serial, path, formatted_now=False)
        if path.stat().st_size and any(_head(path)):
            raise VolumeError(f"volume {path} holds data that is not ext4; refusing to format "
                              "it (delete it or choose another host_path)")
    if spec.read_only and not path.exists():
        raise VolumeError(f"read-only volume {path} does not exist: create it with a "
                          "writable VM first")
    mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
    if not os.path.exists(mkfs):
        raise VolumeError("mkfs.ext4 not found: apt-get install e2fsprogs")
    tmp = path.with_name(f".{path.name}.formatting")
    try:
        with open(tmp, "wb") as f:
            f.truncate(spec.size_mib * MIB)      # sparse: costs no disk until written
        result = subprocess.run([mkfs, "-q", "-F", "-L", serial, "-E",
                                 "lazy_itable_init=0,lazy_journal_init=0,nodiscard", str(tmp)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise VolumeError(f"mkfs.ext4 {path} failed: {result.stderr.strip()}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return PreparedVolume(spec, serial, path, formatted_now=True)


def _head(path: Path, nbytes: int = 4096) -> bytes:
    with open(path, "rb") as f:
        return f.read(nbytes)


def cmdline(volumes: list[PreparedVolume]) -> str:
    """The ``sm.vol=`` entry the guest's init reads."""
    return "sm.vol=" + ",".join(v.cmdline_entry for v in volumes) if volumes else ""


def usage(path: Path) -> dict:
    """Apparent size and host disk blocks actually used by a volume file."""
    st = path.stat()
    return {"size_bytes": st.st_size, "host_used_bytes": st.st_blocks * 512}
