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
import errno
import os
import shutil
import subprocess
from pathlib import Path

from ..config import DEFAULT_VOLUME_SIZE_MIB, VolumeSpec
from ..errors import VmError

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
    size_mib: int | None = None     # set when formatted now




def has_ext4(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(EXT4_MAGIC_OFFSET)
            return f.read(2) == EXT4_MAGIC
    except OSError:
        return False


def holds_data(path: Path) -> bool:
    """Whether any byte of ``path`` was ever written: only a file with no data extent at all
    (empty, or a hole from end to end) may be formatted, since formatting anything else could
    destroy data (an ISO 9660 image starts with 32 KiB of zeros, so a look at the first blocks
    is not enough). Asks the file system (``SEEK_DATA``) instead of reading the file."""
    with open(path, "rb") as f:
        try:
            os.lseek(f.fileno(), 0, os.SEEK_DATA)
            return True
        except OSError as exc:
            if exc.errno == errno.ENXIO:       # no data after offset 0: all hole, or empty
                return False
            raise


def prepare(spec: VolumeSpec, index: int) -> PreparedVolume:
    """Create and format the volume file when it is new; check it when it exists.

    An existing file is used only when it holds ext4 (and, when ``spec.size_mib`` is set, has
    that size); one that holds anything else is refused, never formatted."""
    path = Path(spec.host_path)
    serial = serial_of(index)
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise VolumeError(f"volume {path} exists but is not a regular file")
        if has_ext4(path):
            size_bytes = path.stat().st_size
            if spec.size_mib is not None and size_bytes != spec.size_mib * MIB:
                raise VolumeError(
                    f"volume {path} is {size_bytes / MIB:g} MiB, but its VolumeSpec asks for "
                    f"size_mib={spec.size_mib}: volumes are never resized (leave size_mib "
                    "unset to use the file as it is, or choose another host_path)")
            return PreparedVolume(spec, serial, path, formatted_now=False)
        if holds_data(path):
            raise VolumeError(f"volume {path} holds data that is not ext4; refusing to format "
                              "it (delete it or choose another host_path)")
    if spec.read_only:
        raise VolumeError(f"read-only volume {path} "
                          f"{'holds no file system' if path.exists() else 'does not exist'}: "
                          "create it with a writable VM first")
    mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
    if not os.path.exists(mkfs):
        raise VolumeError("mkfs.ext4 not found: apt-get install e2fsprogs")
    size_mib = spec.size_mib or DEFAULT_VOLUME_SIZE_MIB
    tmp = path.with_name(f".{path.name}.formatting")
    try:
        with open(tmp, "wb") as f:
            f.truncate(size_mib * MIB)      # sparse: costs no disk until written
        # "--": a file name is never taken for an option.
        result = subprocess.run([mkfs, "-q", "-F", "-L", serial, "-E",
                                 "lazy_itable_init=0,lazy_journal_init=0,nodiscard", "--",
                                 str(tmp)], capture_output=True, text=True)
        if result.returncode != 0:
            raise VolumeError(f"mkfs.ext4 {path} failed: {result.stderr.strip()}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return PreparedVolume(spec, serial, path, formatted_now=True, size_mib=size_mib)


def serial_of(index: int) -> str:
    """The virtio-blk serial of the ``index``-th volume: how the guest's init finds it."""
    return f"smvol{index}"


def cmdline(specs: list[VolumeSpec]) -> str:
    """The ``sm.vol=`` entry the guest's init reads (volumes in ``VmConfig`` order)."""
    return "sm.vol=" + ",".join(f"{serial_of(i)}:{v.guest_path}:{'ro' if v.read_only else 'rw'}"
                                for i, v in enumerate(specs)) if specs else ""


def usage(path: Path) -> dict:
    """Apparent size and host disk blocks actually used by a volume file."""
    st = path.stat()
    return {"size_bytes": st.st_size, "host_used_bytes": st.st_blocks * 512}


def copy_sparse(source: Path, target: Path) -> None:
    """Copy a raw volume file, keeping its holes (a reflink where the file system has them)."""
    result = subprocess.run(["cp", "--sparse=always", "--reflink=auto", "--", str(source),
                             str(target)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise VolumeError(f"copying volume {source} failed: {result.stderr.strip()}")
