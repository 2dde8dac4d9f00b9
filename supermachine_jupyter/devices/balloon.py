"""virtio-balloon statistics, with Firecracker's field names and units, for every engine.

Balloon size is counted in 4 KiB pages (``target_pages``/``actual_pages``) and MiB
(``target_mib``/``actual_mib``): how much memory the balloon holds *away from* the guest.
The guest's own statistics follow the virtio spec: memory amounts in bytes, fault counts as
counts. A statistic the guest does not report is ``None``.
"""

from __future__ import annotations

import dataclasses

from ..errors import VmError

PAGE_BYTES = 4096
MIB = 1024 * 1024
MIB_TO_4K_PAGES = MIB // PAGE_BYTES
#: QEMU reports a statistic the guest never sent as 2^64 - 1.
QEMU_UNREPORTED = 2**64 - 1

# Firecracker field name → QEMU guest-stats name.
QEMU_STAT_NAMES = {
    "swap_in": "stat-swap-in",
    "swap_out": "stat-swap-out",
    "major_faults": "stat-major-faults",
    "minor_faults": "stat-minor-faults",
    "free_memory": "stat-free-memory",
    "total_memory": "stat-total-memory",
    "available_memory": "stat-available-memory",
    "disk_caches": "stat-disk-caches",
    "hugetlb_allocations": "stat-htlb-pgalloc",
    "hugetlb_failures": "stat-htlb-pgfail",
}


class BalloonNotEnabled(VmError):
    """A balloon call on a VM started without ``balloon=True``."""

    def __init__(self, name: str):
        super().__init__(f"VM {name!r} has no balloon device: start it with "
                         "VmConfig(balloon=True) (or %%vm --balloon)")


@dataclasses.dataclass(frozen=True)
class BalloonStats:
    """One reading of the balloon; units as in Firecracker's balloon statistics."""
    target_pages: int
    actual_pages: int
    target_mib: int
    actual_mib: int
    swap_in: int | None = None
    swap_out: int | None = None
    major_faults: int | None = None
    minor_faults: int | None = None
    free_memory: int | None = None
    total_memory: int | None = None
    available_memory: int | None = None
    disk_caches: int | None = None
    hugetlb_allocations: int | None = None
    hugetlb_failures: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_qemu(cls, memory_mib: int, target_mib: int, query_balloon: dict,
                  guest_stats: dict | None) -> "BalloonStats":
        """From QMP ``query-balloon`` (guest memory left, bytes) and ``guest-stats``."""
        actual_bytes = memory_mib * MIB - int(query_balloon["actual"])
        stats = (guest_stats or {}).get("stats", {})
        fields = {}
        for name, qemu_name in QEMU_STAT_NAMES.items():
            value = stats.get(qemu_name)
            fields[name] = None if value is None or value == QEMU_UNREPORTED else int(value)
        return cls(target_pages=target_mib * MIB_TO_4K_PAGES,
                   actual_pages=actual_bytes // PAGE_BYTES,
                   target_mib=target_mib, actual_mib=actual_bytes // MIB, **fields)
