"""Helpers shared by tests: finding engine processes on this host."""

import os


def engine_pids(marker: str = "qemu-system") -> list[int]:
    """Pids of live engine processes (QEMU) owned by anyone."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmd.split(b"\0")[0] and state != "Z":
            pids.append(int(entry))
    return pids
