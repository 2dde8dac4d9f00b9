"""QEMU's virtio-fs back end: one ``virtiofsd`` process per host directory mount.

Debian 12 ships the C ``virtiofsd`` (``/usr/lib/qemu/virtiofsd``). It sandboxes itself into
the shared directory (mount namespace + ``pivot_root``), so ``..`` and absolute symlinks
cannot leave it. It has no read-only option, so a read-only mount runs it inside a private
mount namespace (``unshare -m``) where the directory is bind-mounted read-only: writes fail
with EROFS host-side, whatever the guest does. Counters come from the kernel's accounting of
the virtiofsd process (``/proc/PID/io``): syscalls and bytes it read and wrote for the guest.

The guest is hostile and virtiofsd runs as root, so guest root must not leave host privilege
in the directory: virtiofsd runs under a seccomp filter (``seccomp.py``) that refuses set-user-ID
and set-group-ID modes, device nodes and xattrs, and with ``-o modcaps`` dropping CAP_MKNOD,
CAP_SETFCAP and CAP_FSETID (without CAP_FSETID the kernel clears S_ISUID/S_ISGID when the guest
writes to or truncates a set-id file already in the directory).

The host path goes into virtiofsd's ``-o source=`` through :func:`fuse_opt_value`: its option
parser (libfuse's ``fuse_opt``, copied into QEMU's ``tools/virtiofsd``) splits ``-o`` at commas
and takes a later ``source=`` over an earlier one, so a directory named ``x,source=/etc`` would
share ``/etc``. A backslash escapes the next character there (``\\,`` is a comma, ``\\\\`` a
backslash, ``\\NNN`` an octal byte).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

from ...config import MountSpec
from ...devices.mounts import MountCounters
from ...errors import EngineError
from ..process import spawn_owned, terminate
from . import seccomp

VIRTIOFSD_CANDIDATES = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd")
#: capabilities virtiofsd keeps by default that only serve handing out privilege
DROPPED_CAPS = "-mknod:-setfcap:-fsetid"


def fuse_opt_value(value: str) -> str:
    """``value`` escaped for one ``-o`` option of a fuse_opt parser (virtiofsd's)."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


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
        daemon = [binary, f"--socket-path={socket_path}",
                  "-o", f"source={fuse_opt_value(spec.host_path)}",
                  "-o", "cache=auto", "-o", "log_level=err", "-o", f"modcaps={DROPPED_CAPS}"]
        if spec.read_only:
            host = shlex.quote(spec.host_path)
            script = (f"mount --bind {host} {host} && mount -o remount,bind,ro {host} {host} "
                      f"&& exec {' '.join(shlex.quote(a) for a in daemon)}")
            args = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
        else:
            args = daemon
        # A read-only share needs no filter (its bind mount refuses every write), so only a
        # read-write one fails on a host where the filter is unknown.
        guard = None if spec.read_only and seccomp.unsupported_reason() \
            else seccomp.no_setid_installer()
        try:
            self.proc = spawn_owned(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, child_setup=guard)
        except subprocess.SubprocessError as exc:   # the filter could not be installed
            raise EngineError(f"virtiofsd for {spec.host_path}: {exc}") from exc

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
