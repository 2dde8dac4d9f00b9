"""``Image``: what a VM boots — a kernel and an initramfs with their baked defaults.

``Image.default()`` is the embedded busybox guest (a wheel's packaged one, or built on
first use into the user cache, see ``assets.py``); ``Image.from_assets`` boots a kernel of your
own; ``Image.from_snapshot`` restores a snapshot; ``Image.from_oci("python:3.12-slim")`` boots
an OCI image's root file system with our kernel and agent (``guest/oci.py`` pulls it).
``image.start(config)`` hands it to the one launcher (``launch.py``) and returns a running
:class:`~supermachine_jupyter.vm.Vm` once the guest agent has answered.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from . import launch
from .config import AssetPaths, VmConfig
from .devices.rootfs import short_digest
from .guest.assets import GuestAssets, ensure_assets
from .guest.rootfs import ImageRootfs
from .launch import DEFAULT_BOOT_TIMEOUT_S, Progress, _silent
from .snapshots.format import Snapshot
from .vm import Vm


@dataclasses.dataclass(frozen=True)
class Image:
    """A bootable guest: kernel, PVH ``vmlinux``, initramfs, and its default size."""
    kernel: Path
    vmlinux: Path       # the PVH entry: a vmlinux ELF, or the kernel itself when only that exists
    initrd: Path
    default_memory_mib: int = 256
    default_vcpus: int = 1
    description: str = "busybox guest with the supermachine agent"
    #: a snapshot directory: ``start`` restores it instead of booting (see snapshot.py)
    snapshot: Path | None = None
    #: an OCI image's root file system: the guest switches root onto it (``from_oci``)
    rootfs: ImageRootfs | None = None

    @classmethod
    def default(cls, progress: Progress = _silent) -> "Image":
        """The embedded default image: the cache's build of the guest sources, else the
        wheel's packaged guest, else built into the cache now (``assets.find_assets``)."""
        assets: GuestAssets = ensure_assets(progress)
        return cls(assets.kernel, assets.vmlinux, assets.initrd)

    @classmethod
    def from_assets(cls, assets: AssetPaths) -> "Image":
        """An image booting ``VmConfig.assets``' kernel (also used as the PVH entry) and
        initramfs."""
        kernel = Path(assets.kernel)
        return cls(kernel, kernel, Path(assets.initrd), description=f"kernel {kernel.name}")

    @classmethod
    def from_oci(cls, ref: str, *, pull: str = "missing", progress: Progress = _silent,
                 auth_file=None, tls_verify: bool | None = None) -> "Image":
        """An OCI image (``"python:3.12-slim"``, ``"registry:5000/team/tool@sha256:…"``) as a
        VM: pulled and converted to a read-only ext4 file, cached by manifest digest
        (``pull="missing" | "always" | "never"``; see ``guest.oci.pull``), booted with the
        default kernel and agent. Commands run with the image's ``Env``, ``WorkingDir`` and
        ``User``; ``Vm.run_image_command()`` starts its ``Entrypoint`` + ``Cmd``."""
        from .guest import oci  # skopeo/umoci machinery: only for those who use images
        rootfs = oci.pull(ref, pull=pull, progress=progress, auth_file=auth_file,
                          tls_verify=tls_verify)
        return cls.from_rootfs(rootfs, progress=progress)

    @classmethod
    def from_rootfs(cls, rootfs: ImageRootfs, progress: Progress = _silent) -> "Image":
        """The default kernel and initramfs booting ``rootfs`` (what ``from_oci`` returns
        once the image is pulled)."""
        base = cls.default(progress)
        return dataclasses.replace(base, rootfs=rootfs,
                                   description=f"OCI image {rootfs.ref}")

    @classmethod
    def from_snapshot(cls, path) -> "Image":
        """An image whose ``start(config)`` restores the snapshot at ``path`` (made by
        ``Vm.snapshot``) instead of booting; the header is checked now and again at start."""
        snap = Snapshot.open(path)
        h = snap.header
        return cls(Path(h["kernel"]), Path(h["kernel"]), Path(h["initrd"]),
                   default_memory_mib=snap.memory_mib, default_vcpus=snap.vcpus,
                   description=f"snapshot of {snap.source_name!r} made {snap.created_at}",
                   snapshot=snap.path)

    def __repr__(self) -> str:
        if self.rootfs is not None:
            return (f"Image(oci={self.rootfs.ref!r}, digest={short_digest(self.rootfs.digest)}, "
                    f"memory={self.default_memory_mib}MiB, vcpus={self.default_vcpus})")
        return (f"Image({self.description!r}, kernel={str(self.kernel)!r}, "
                f"memory={self.default_memory_mib}MiB, vcpus={self.default_vcpus})")

    def start(self, config: VmConfig | None = None, *, name: str | None = None,
              progress: Progress = _silent,
              boot_timeout: float = DEFAULT_BOOT_TIMEOUT_S,
              snapshot_cache: bool | None = False) -> Vm:
        """Boot a VM from this image and wait until its agent answers.

        A snapshot image (``from_snapshot``) restores instead, within
        ``config.restore_timeout``. ``snapshot_cache=True`` (``None``: the default policy,
        ``snapshots.cache.cache_enabled()``) restores from this image's cached pre-booted
        snapshot when the config allows; the first such start boots and makes the snapshot
        (see ``snapshots.cache.start_with_cache``)."""
        config = config or VmConfig()
        if self.snapshot is not None:
            return launch.restore(Snapshot.open(self.snapshot), config, name=name,
                                  progress=progress)
        if snapshot_cache or snapshot_cache is None:
            from .snapshots import cache
            if (snapshot_cache or cache.cache_enabled()) and cache.cacheable(self, config) is None:
                return cache.start_with_cache(self, config, name=name, progress=progress,
                                              boot_timeout=boot_timeout)
        return launch.boot(self, config, name=name, progress=progress, boot_timeout=boot_timeout)
