"""An OCI image's root file system as a VM device: its read-only ext4 file
(:class:`~supermachine_jupyter.guest.rootfs.ImageRootfs`) attached as one more read-only
virtio-blk disk, with serial ``smroot``, which the guest's init finds by the ``sm.root=``
kernel command line key, mounts read-only under a per-VM writable layer (overlayfs on tmpfs,
so writes live in guest RAM and die with the VM) and switches root onto.

Engines see an ordinary read-only volume (``LaunchSpec.volumes``); snapshots do not copy it
but record its :func:`identity` and check it at restore (:func:`check_identity`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from ..config import VolumeSpec
from ..errors import ImageError
from ..guest.rootfs import ImageRootfs
from .volumes import EXT4_MAGIC, EXT4_MAGIC_OFFSET, PreparedVolume

#: The virtio-blk serial of the image's disk (data volumes are smvol0, smvol1, …).
ROOT_SERIAL = "smroot"
#: Where the guest's init keeps what it brings into an image (agent, busybox); also the
#: placeholder guest path of the rootfs volume, which is never mounted there.
HIDDEN_DIR = "/.supermachine"
#: The initramfs's busybox, in every guest whatever its root file system (a link in the
#: busybox guest, a copy in an image's): the host's own steps need no tools of the image.
GUEST_BUSYBOX = f"{HIDDEN_DIR}/busybox"
#: The ext4 superblock: 1024 bytes at offset 1024. It holds the file system's UUID, size and
#: creation time, so a file made again from the same image (another mkfs run) differs here.
_SUPERBLOCK = (1024, 1024)


def cmdline() -> str:
    """The kernel command line entry that makes the guest's init boot the image."""
    return f"sm.root={ROOT_SERIAL}"


def _again(image: ImageRootfs) -> str:
    return (f"pull the image again (Image.from_oci({image.ref!r}, pull='always'))"
            if image.ref else "make the image's root file system again")


def check(image: ImageRootfs) -> Path:
    """The rootfs file, checked to be a regular file holding ext4; ImageError otherwise."""
    path = Path(image.rootfs)
    what = f"image {image.ref or '?'} ({short_digest(image.digest)})"
    if not path.exists():
        raise ImageError(f"{what}: its root file system {path} does not exist (a cleaned "
                         f"cache?): {_again(image)}")
    if not path.is_file():
        raise ImageError(f"{what}: its root file system {path} is not a regular file")
    try:
        with open(path, "rb") as f:
            f.seek(EXT4_MAGIC_OFFSET)
            magic = f.read(2)
    except OSError as exc:
        raise ImageError(f"{what}: its root file system {path} cannot be read: {exc}") from exc
    if magic != EXT4_MAGIC:
        raise ImageError(f"{what}: {path} holds no ext4 file system (damaged?): "
                         f"{_again(image)}")
    return path


def volume(image: ImageRootfs) -> PreparedVolume:
    """The image's disk as the last of a LaunchSpec's volumes: read-only, serial smroot."""
    path = check(image)
    spec = VolumeSpec(host_path=str(path), guest_path=f"{HIDDEN_DIR}/image", read_only=True)
    return PreparedVolume(spec, ROOT_SERIAL, path, formatted_now=False)


def short_digest(digest: str) -> str:
    """``sha256:0123456789ab`` from a full digest (for reprs and messages)."""
    algorithm, _, hexdigest = (digest or "").partition(":")
    return f"{algorithm}:{hexdigest[:12]}" if hexdigest else (digest or "no digest")


def identity(path: Path) -> dict:
    """What a snapshot records of the rootfs file it booted: its size and the digest of its
    ext4 superblock (cheap to check at every restore; a different file system fails it)."""
    with open(path, "rb") as f:
        offset, size = _SUPERBLOCK
        f.seek(offset)
        block = f.read(size)
        return {"size": os.fstat(f.fileno()).st_size,
                "superblock_sha256": hashlib.sha256(block).hexdigest()}


def to_record(image: ImageRootfs) -> dict:
    """The snapshot header's ``rootfs`` entry: the image (by digest), where its file is, and
    the file's identity. The file itself stays in the image cache."""
    record = dataclasses.asdict(image)
    record.update(rootfs=str(image.rootfs), env=list(image.env),   # as JSON keeps them
                  entrypoint=list(image.entrypoint), cmd=list(image.cmd))
    record.update(identity(Path(image.rootfs)))
    return record


def from_record(record: dict, where: str) -> ImageRootfs:
    """The ImageRootfs a snapshot booted, its file checked against the recorded identity.

    Raises ImageError when the file is gone or is another file system now (the image was
    pulled again, or the cache cleaned): the guest's RAM holds that file system's state, so
    it must be the very same file."""
    image = ImageRootfs(ref=record["ref"], digest=record["digest"],
                        rootfs=Path(record["rootfs"]), env=tuple(record["env"]),
                        working_dir=record["working_dir"], user=record["user"],
                        entrypoint=tuple(record["entrypoint"]), cmd=tuple(record["cmd"]))
    path = check(image)
    now = identity(path)
    if now != {"size": record["size"], "superblock_sha256": record["superblock_sha256"]}:
        raise ImageError(f"snapshot {where} was made with image {image.ref} "
                         f"({short_digest(image.digest)}) from root file system {path}, which "
                         "has changed since (made again?): the snapshot cannot run on it; "
                         "make the snapshot again")
    return image


def check_record(record: object) -> str | None:
    """Why a snapshot header's ``rootfs`` entry is malformed, or None (header is host input)."""
    if not isinstance(record, dict):
        return "rootfs is not an object"
    for key, kind in (("ref", str), ("digest", str), ("rootfs", str), ("env", list),
                      ("working_dir", str), ("user", str), ("entrypoint", list), ("cmd", list),
                      ("size", int), ("superblock_sha256", str)):
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            return f"rootfs.{key} is missing or not a {kind.__name__}"
    for key in ("env", "entrypoint", "cmd"):
        if not all(isinstance(item, str) for item in record[key]):
            return f"rootfs.{key} holds something that is not a string"
    return None
