"""The QEMU engine, which runs anywhere: ``engine`` (QemuInstance and QemuEngine: the
``microvm`` machine driven over QMP, snapshots as migration streams), ``qmp`` (the QMP
client), ``virtiofsd`` (one file server per host mount) and ``seccomp`` (the filter that
keeps virtiofsd from handing out host privileges)."""

from .engine import (
                                                       ENGINE,
                                                       QemuEngine,
                                                       QemuInstance,
                                                       boots_to_init_with_kvm,
                                                       qemu_binary,
                                                       qemu_version,
)

__all__ = ["ENGINE", "QemuEngine", "QemuInstance", "boots_to_init_with_kvm", "qemu_binary",
           "qemu_version"]
