"""QEMU's virtio-fs back end: one ``virtiofsd`` process per host directory mount.

Debian 12 ships the C ``virtiofsd`` (``/usr/lib/qemu/virtiofsd``). It sandboxes itself into
the shared directory (mount namespace + ``pivot_root``), so ``..`` and absolute symlinks
cannot leave it. It has no read-only option, so a read-only mount runs it inside a private
mount namespace (``unshare -m``) where the directory is bind-mounted read-only: writes fail
with EROFS host-side, whatever the guest does. Counters come from the kernel's accounting of
the virtiofsd process (``/proc/PID/io``): syscalls and bytes it read and wrote for the guest.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

from ..config import MountSpec
from ..errors import EngineError
from ..mounts import MountCounters
from ..process import spawn_owned, terminate

VIRTIOFSD_CANDIDATES = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd")


def virtiofsd_binary() -> str | None:
    for path in VIRTIOFSD_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return None


def _process_tree(pid: int) -> list[int]:
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
                queue.extend(int(c) for c in children)
        except OSError:
            pass
    return pids


class Virtiofsd:
    def __init__(self, spec: MountSpec, socket_path: Path):
        binary = virtiofsd_binary()
        if binary is None:
            raise EngineError("virtiofsd not found (Debian: apt-get install qemu-system-common)")
        if os.geteuid() != 0:
            raise EngineError("host mounts under QEMU need root: virtiofsd sandboxes itself "
                              "with namespaces")
        self.spec = spec
        self.socket_path = socket_path
        daemon = [binary, f"--socket-path={socket_path}", "-o", f"source={spec.host_path}",
                  "-o", "cache=auto", "-o", "log_level=err"]
        if spec.read_only:
            host = shlex.quote(spec.host_path)
            script = (f"mount --bind {host} {host} && mount -o remount,bind,ro {host} {host} "
                      f"&& exec {' '.join(shlex.quote(a) for a in daemon)}")
            args = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
        else:
            args = daemon
        self.proc = spawn_owned(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.socket_path.exists():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip()
                raise EngineError(f"virtiofsd for {self.spec.host_path} exited: {err}")
            if time.monotonic() > deadline:
                raise EngineError(f"virtiofsd for {self.spec.host_path} did not start in time")
            time.sleep(0.01)

    def counters(self) -> MountCounters:
        """I/O of virtiofsd and its sandboxed child (which serves the requests)."""
        total = MountCounters()
        for pid in _process_tree(self.proc.pid):
            try:
                fields = dict(line.split(": ") for line in
                              Path(f"/proc/{pid}/io").read_text().splitlines())
            except (OSError, ValueError):
                continue
            total.ops += int(fields.get("syscr", 0)) + int(fields.get("syscw", 0))
            total.bytes_read += int(fields.get("rchar", 0))
            total.bytes_written += int(fields.get("wchar", 0))
        return total

    def stop(self) -> None:
        terminate(self.proc, grace=1.0)
