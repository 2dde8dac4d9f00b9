"""``ImageRootfs``: an OCI image made bootable — the contract between the puller (``oci.py``:
registry → OCI layout → unpacked rootfs → read-only ext4 file, cached by manifest digest) and
the launcher, which attaches the ext4 file read-only and lets the guest's init switch root
onto it with a per-VM writable layer."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class ImageRootfs:
    """An OCI image's root filesystem as a read-only ext4 file, and the parts of the image's
    config that say how its commands run."""
    ref: str                             # as the user wrote it, e.g. "python:3.12-slim"
    digest: str                          # the manifest digest, "sha256:<64 hex>"
    rootfs: Path                         # read-only ext4 image of the unpacked rootfs
    env: tuple[str, ...] = ()            # "KEY=value", in the image's order
    working_dir: str = "/"
    user: str = ""                       # "", "name", "uid", "uid:gid", "name:group"
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
