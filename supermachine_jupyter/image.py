"""``Image``: what a VM boots — a kernel and an initramfs with their baked defaults.

``Image.default()`` is the embedded busybox guest (built on first use into the user cache,
see ``assets.py``). ``image.start(config)`` boots it on the engine the config asks for and
returns a running :class:`~supermachine_jupyter.vm.Vm` once the guest agent has answered.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import mounts, volumes
from .assets import GuestAssets, ensure_assets
from .config import AssetPaths, VmConfig
from .console import ConsoleBuffer
from .engines import EngineChoice, choose_engine, start_engine
from .engines.base import LaunchSpec
from .errors import VmError
from .launch import Launch, launch, vm_name
from .vm import Vm

if TYPE_CHECKING:
    from .engines.base import EngineInstance

DEFAULT_BOOT_TIMEOUT_S = 120.0
# reboot=t: a guest reboot is a triple fault, which ends the VM at once on every engine.
BASE_CMDLINE = "console=ttyS0 panic=-1 reboot=t"
#: x86 Linux truncates its command line at 2048 bytes (COMMAND_LINE_SIZE); engines append their
#: own device entries (the native core: one virtio_mmio.device= per device), so ours stops here.
MAX_CMDLINE_BYTES = 1536

Progress = Callable[[str], None]


def _silent(_: str) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class Image:
    """A bootable guest: kernel, PVH ``vmlinux``, initramfs, and its default size."""
    kernel: Path
    vmlinux: Path
    initrd: Path
    default_memory_mib: int = 256
    default_vcpus: int = 1
    description: str = "busybox guest with the supermachine agent"
    #: a snapshot directory: ``start`` restores it instead of booting (see snapshot.py)
    snapshot: Path | None = None

    @classmethod
    def default(cls, progress: Progress = _silent) -> "Image":
        """The embedded default image, building its kernel and initramfs when missing."""
        assets: GuestAssets = ensure_assets(progress)
        return cls(assets.kernel, assets.vmlinux, assets.initrd)

    @classmethod
    def from_assets(cls, assets: AssetPaths) -> "Image":
        """An image booting ``VmConfig.assets``' kernel (also used as the PVH entry) and
        initramfs."""
        kernel = Path(assets.kernel)
        return cls(kernel, kernel, Path(assets.initrd), description=f"kernel {kernel.name}")

    @classmethod
    def from_snapshot(cls, path) -> "Image":
        """An image whose ``start(config)`` restores the snapshot at ``path`` (made by
        ``Vm.snapshot``) instead of booting; the header is checked now and again at start."""
        from .snapshot import Snapshot
        snap = Snapshot.open(path)
        h = snap.header
        return cls(Path(h["kernel"]), Path(h["kernel"]), Path(h["initrd"]),
                   default_memory_mib=snap.memory_mib, default_vcpus=snap.vcpus,
                   description=f"snapshot of {snap.source_name!r} made {snap.created_at}",
                   snapshot=snap.path)

    def __repr__(self) -> str:
        return (f"Image({self.description!r}, kernel={str(self.kernel)!r}, "
                f"memory={self.default_memory_mib}MiB, vcpus={self.default_vcpus})")

    def start(self, config: VmConfig | None = None, *, name: str | None = None,
              progress: Progress = _silent,
              boot_timeout: float = DEFAULT_BOOT_TIMEOUT_S,
              snapshot_cache: bool | None = False) -> Vm:
        """Boot a VM from this image and wait until its agent answers.

        A snapshot image (``from_snapshot``) restores instead, within
        ``config.restore_timeout``. ``snapshot_cache=True`` (``None``: the default policy,
        ``snapshot.cache_enabled()``) restores from this image's cached pre-booted snapshot
        when the config allows; the first such start boots and makes the snapshot (see
        ``snapshot.start_with_cache``)."""
        config = config or VmConfig()
        if self.snapshot is not None:
            from .snapshot import Snapshot, restore
            return restore(Snapshot.open(self.snapshot), config, name=name, progress=progress)
        if snapshot_cache or snapshot_cache is None:
            from . import snapshot as _snapshot
            if (snapshot_cache or _snapshot.cache_enabled()) \
                    and _snapshot.cacheable(self, config) is None:
                return _snapshot.start_with_cache(self, config, name=name, progress=progress,
                                                  boot_timeout=boot_timeout)
        name = vm_name(name, config)
        kernel, vmlinux, initrd = self.kernel, self.vmlinux, self.initrd
        if config.assets is not None:
            kernel, initrd = Path(config.assets.kernel), Path(config.assets.initrd)
            vmlinux = kernel
        choice: EngineChoice = choose_engine(config.engine, config)
        memory = config.memory_mib or self.default_memory_mib
        vcpus = config.vcpus or self.default_vcpus
        cmdline = " ".join(filter(None, [BASE_CMDLINE, f"sm.hostname={name}",
                                         volumes.cmdline(list(config.volumes)),
                                         mounts.cmdline(list(config.mounts))]))
        if len(cmdline) > MAX_CMDLINE_BYTES:
            raise VmError(f"VM {name!r}: its volumes and mounts make a kernel command line of "
                          f"{len(cmdline)} bytes, more than the {MAX_CMDLINE_BYTES} this guest "
                          "takes: use shorter guest paths or fewer volumes and mounts")
        prepared = tuple(volumes.prepare(v, i) for i, v in enumerate(config.volumes))
        for volume in prepared:
            if volume.formatted_now:
                progress(f"formatted volume {volume.path} ({volume.size_mib} MiB, ext4)")

        def spec(run_dir: Path) -> LaunchSpec:
            return LaunchSpec(name=name, memory_mib=memory, vcpus=vcpus, kernel=kernel,
                              vmlinux=vmlinux, initrd=initrd, cmdline=cmdline, config=config,
                              run_dir=run_dir, console=ConsoleBuffer(), volumes=prepared)

        def start(spec: LaunchSpec, mark) -> "EngineInstance":
            progress(f"starting {name} on {choice.name}/{choice.accel} "
                     f"({memory} MiB, {vcpus} vCPU): {choice.reason}")
            instance = start_engine(choice, spec)
            progress(f"booting {name}…")
            return instance

        def failed(exc: BaseException, instance, spec) -> VmError:
            why = (instance.exit_description() if instance is not None else None) or str(exc)
            tail = "\n".join(spec.console.text().splitlines()[-15:]) if spec else ""
            return VmError(f"VM {name!r} did not boot: {why}\n--- last console lines ---\n"
                           f"{tail}")

        return launch(name, config, Launch(spec, start, failed, timeout_s=boot_timeout))
