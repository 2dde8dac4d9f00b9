"""Helpers shared by tests: finding engine processes on this host."""

import os


def engine_pids(marker: str = "qemu-system", parent: int | None = None) -> list[int]:
    """Pids of live engine processes (QEMU); with ``parent``, only that process's children
    (other test runs on the machine start VMs too)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[0:2]
        except OSError:
            continue
        if parent is not None and int(ppid) != parent:
            continue
        if marker.encode() in cmd.split(b"\0")[0] and state != "Z":
            pids.append(int(entry))
    return pids
