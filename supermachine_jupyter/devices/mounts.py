"""Host directory mounts: ``MountSpec`` → virtio-fs, mounted by the guest's init.

Engine-neutral parts: the kernel command line entry and the per-mount counters every engine
reports (ops, bytes read, bytes written), plus whether the mount runs with DAX.
"""

from __future__ import annotations

import dataclasses

from ..config import MountSpec


@dataclasses.dataclass
class MountCounters:
    """What a mount has done so far, measured host-side by the engine's file server."""
    ops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class MountStatus:
    spec: MountSpec
    dax: bool
    dax_note: str
    counters: MountCounters

    def to_dict(self) -> dict:
        return {"host_path": self.spec.host_path, "tag": self.spec.tag,
                "guest_path": self.spec.guest_path, "read_only": self.spec.read_only,
                "dax": self.dax, "dax_note": self.dax_note, **self.counters.to_dict()}


def cmdline(mounts: list[MountSpec]) -> str:
    """The ``sm.fs=`` entry the guest's init reads."""
    if not mounts:
        return ""
    return "sm.fs=" + ",".join(f"{m.tag}:{m.guest_path}:{'ro' if m.read_only else 'rw'}"
                               for m in mounts)
