"""The native engine: :class:`NativeInstance` (one VM of the core behind ``EngineInstance``,
its agent reached through the hybrid-vsock mux socket) and :class:`NativeEngine` (boot,
restore from the core's snapshot files, limits)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from ..base import Engine, EngineInstance, RestoreProblem
from .binding import NativeVm, _load, available, version

CONSOLE_POLL_S = 0.02
#: A refused CONNECT (the guest is not listening yet) costs the host one local socket, so
#: retry often: each wait is added to the time to a VM's first output.
AGENT_CONNECT_RETRY_S = 0.005
VSOCK_SOCKET_NAME = "sm-vsock-{name}.sock"
#: The files of the core's snapshot format (native/src/snapshot.h).
SNAPSHOT_STATE_FILE = "state.bin"
SNAPSHOT_MEMORY_FILE = "memory.bin"
#: Why mounts run without DAX here (README, "virtio-fs and DAX").
NO_DAX_NOTE = ("no DAX window in the native core: the device offers no shared-memory region, "
               "so `-o dax` mounts fail and files go through FUSE reads and writes")


class NativeInstance(EngineInstance):
    """A VM of the native core behind the ``EngineInstance`` interface (engines/base.py).

    The guest kernel is entered through PVH (``spec.vmlinux``) when present — no
    decompression — else through the bzImage boot protocol. The agent is reached through the
    hybrid vsock mux (``CONNECT <port>``); the console ring is pumped into ``spec.console``."""

    engine_name = "native"
    accel = "kvm"

    def __init__(self, spec, reason: str, restore_from: Path | None = None):
        """Boot ``spec`` now; or, with ``restore_from`` (a snapshot directory holding the
        core's state.bin and memory.bin), rebuild the VM from it with ``spec``'s devices and
        leave it paused until :meth:`resume`."""
        from ..base import AGENT_VSOCK_PORT
        self.spec = spec
        self.reason = reason
        self._agent_port = AGENT_VSOCK_PORT
        mux_dir = Path(spec.config.vsock_mux_dir or os.environ.get("TMPDIR", "/tmp"))
        self.vsock_path = mux_dir / VSOCK_SOCKET_NAME.format(name=spec.name)
        self._pump_stop = False
        self._pump = None
        # The same device set for a boot and a restore: the core checks a restore's devices
        # against the snapshot's, and the guest already has drivers bound to these.
        # A restore's mounts are re-attached: the core finds the guest's node ids and open
        # files again by their paths beneath each mount's host folder.
        devices = {"balloon": bool(spec.config.balloon), "balloon_deflate_on_oom": True,
                   "balloon_stats_interval_s": 1,
                   "volumes": [(v.path, v.spec.read_only, v.serial) for v in spec.volumes],
                   "vsock_uds_path": self.vsock_path, "vsock_guest_cid": 3,
                   "mounts": [(m.host_path, m.tag, m.read_only) for m in spec.config.mounts]}
        if restore_from is not None:
            self.vm = NativeVm.restore(restore_from, start=False, **devices)
            return
        kernel = spec.vmlinux if spec.vmlinux and Path(spec.vmlinux).exists() else spec.kernel
        cmdline = f"{spec.cmdline} sm.agent=vsock:{self._agent_port}"
        self.vm = NativeVm(kernel, memory_mib=spec.memory_mib, vcpus=spec.vcpus,
                           initrd=spec.initrd, cmdline=cmdline, **devices)
        self.resume()

    def resume(self) -> None:
        """Run the guest: the first time, start the vCPUs and the console pump (a booted VM
        does this in its constructor, a restored one when the restore is complete)."""
        if self._pump is not None:
            self.vm.resume()
            return
        import threading
        try:
            self.vm.start()
        except BaseException:
            self.vm.close()
            raise
        self._pump = threading.Thread(target=self._pump_console, daemon=True,
                                      name=f"native-console-{self.spec.name}")
        self._pump.start()

    # -- the snapshot_to template's steps (EngineInstance.snapshot_to) ---------------------
    # The core writes state.bin (vCPUs, irqchip, clock, UART, virtio devices, each mount's
    # FUSE session as paths beneath its folder) and memory.bin (guest RAM, sparse) while the
    # guest is paused; ``finish`` flushes guest RAM to disk.
    mounts_not_snapshotted_because = None

    def _guest_running(self) -> bool:
        return self.vm.state == "running"

    def _pause(self) -> None:
        self.vm.pause()

    def _unpause(self) -> None:
        if self.vm.state == "paused":
            self.vm.resume()

    def _save_paused(self, directory: Path, deadline: float) -> Callable[[], dict]:
        self.vm.snapshot(directory)

        def finish() -> dict:
            # The core leaves guest RAM in the page cache so the pause is not a disk wait.
            fd = os.open(directory / SNAPSHOT_MEMORY_FILE, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return {"core_version": version(), "accel": self.accel,
                    "state_file": SNAPSHOT_STATE_FILE, "ram_file": SNAPSHOT_MEMORY_FILE}

        return finish

    def __repr__(self) -> str:
        return f"<NativeInstance {self.spec.name} state={self.vm.state if self.vm._vm else 'closed'}>"

    def _pump_console(self) -> None:
        while True:
            chunk = self.vm.console_read() if self.vm._vm is not None else b""
            if chunk:
                self.spec.console.append(chunk)
                continue
            if self._pump_stop or self.vm._vm is None or self.vm.state in ("stopped", "failed"):
                if self.vm._vm is not None:
                    rest = self.vm.console_read()
                    if rest:
                        self.spec.console.append(rest)
                return
            time.sleep(CONSOLE_POLL_S)

    # -- EngineInstance ------------------------------------------------------------------
    agent_connect_retry_s = AGENT_CONNECT_RETRY_S

    def _try_connect_agent(self, timeout: float):
        """Hybrid vsock: CONNECT <agent port>, then OK from the mux once the guest listens."""
        import socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(self.vsock_path))
            sock.sendall(f"CONNECT {self._agent_port}\n".encode())
            line = b""
            while not line.endswith(b"\n") and len(line) < 64:
                byte = sock.recv(1)
                if not byte:
                    break
                line += byte
        except BaseException:
            sock.close()
            raise
        if line.startswith(b"OK "):
            sock.settimeout(None)
            return sock
        sock.close()
        return None

    def is_running(self) -> bool:
        return self.vm._vm is not None and self.vm.state in ("running", "paused")

    def exit_description(self) -> str | None:
        if self.vm._vm is None:
            return "the native VM was shut down"
        info = self.vm.exit_info()
        if info["state"] in ("running", "paused", "created"):
            return None
        return f"{info['reason']}: {info['message']}"

    # -- the shutdown template's steps (EngineInstance.shutdown): POWEROFF makes the guest
    # reboot through the i8042, which ends the VM; else the host stops the vCPUs.
    def _wait_ended(self, timeout: float) -> None:
        self.vm.wait(timeout)

    def _stop(self, timeout: float) -> None:
        if self.vm._vm is not None:
            self.vm.stop()

    def _release(self) -> None:
        self._pump_stop = True
        if self._pump is not None:
            self._pump.join(timeout=2)
        if self.vm._vm is not None:
            self.vm.close()

    def process_ids(self) -> list[int]:
        return []  # in-process: vCPU threads live in this Python process

    def host_rss_bytes(self) -> int | None:
        """Guest RAM resident on the host (the VM runs inside this process, so this is its
        share of the process RSS; vCPU thread stacks and device buffers are not counted)."""
        return self.vm.guest_resident_bytes() if self.vm._vm is not None else None

    # -- devices -------------------------------------------------------------------------
    def balloon_set_target_mib(self, balloon_mib: int) -> None:
        self.vm.balloon_set_target_mib(balloon_mib)

    def balloon_stats(self, target_mib: int):
        # The core knows the target itself (sm_balloon_stats.target_mib).
        from ...devices.balloon import BalloonStats
        stats = self.vm.balloon_stats()
        stats.pop("stats_updates", None)
        return BalloonStats(**stats)

    def mount_status(self) -> list:
        """One MountStatus per mount, counted by the core's in-process FUSE server
        (device ``virtio-fs<i>`` for ``config.mounts[i]``)."""
        from ...devices.mounts import MountCounters, MountStatus
        out = []
        for i, mount in enumerate(self.spec.config.mounts):
            counters = MountCounters()
            if self.vm._vm is not None:
                c = self.vm.device(f"virtio-fs{i}")["counters"]
                counters = MountCounters(ops=c["ops"], bytes_read=c["bytes_read"],
                                         bytes_written=c["bytes_written"])
            out.append(MountStatus(mount, dax=False, dax_note=NO_DAX_NOTE, counters=counters))
        return out


class NativeEngine(Engine):
    """The native core: its snapshots are the core's ``state.bin`` + ``memory.bin`` (format in
    native/src/snapshot.h); a restored VM writes its volumes to a sparse copy of its own
    (the core serves raw files only)."""

    name = "native"

    def boot(self, spec, accel: str, reason: str) -> NativeInstance:
        return NativeInstance(spec, reason)

    def config_problem(self, config) -> str | None:
        _, lib = _load()
        if len(config.volumes) > lib.SM_MAX_BLK_DEVICES:
            return (f"takes at most {lib.SM_MAX_BLK_DEVICES} volumes (virtio-blk devices), "
                    f"this config has {len(config.volumes)}")
        if len(config.mounts) > lib.SM_MAX_FS_DEVICES:
            return (f"takes at most {lib.SM_MAX_FS_DEVICES} mounts (virtio-fs devices), "
                    f"this config has {len(config.mounts)}")
        if (config.vcpus or 1) > lib.SM_MAX_VCPUS:
            return f"takes at most {lib.SM_MAX_VCPUS} vCPUs, this config has {config.vcpus}"
        return None

    def version_tag(self) -> str:
        return f"core {version()}"

    def made_by(self, engine_state: dict) -> str:
        return f"core {engine_state.get('core_version')}"

    def restore_problem(self, engine_state: dict) -> RestoreProblem | None:
        ok, why = available()
        if not ok:
            return RestoreProblem(f"was made by the native core, which cannot run here: {why}")
        files = (engine_state.get("state_file"), engine_state.get("ram_file"))
        if files != (SNAPSHOT_STATE_FILE, SNAPSHOT_MEMORY_FILE):
            return RestoreProblem(f"names its core files {files}; the core reads "
                                  f"{SNAPSHOT_STATE_FILE} and {SNAPSHOT_MEMORY_FILE}")
        return None

    def volume_layer(self, base: Path, run_dir: Path, index: int) -> Path:
        from ...devices.volumes import copy_sparse
        layer = run_dir / f"volume{index}.img"
        copy_sparse(base, layer)
        return layer

    def restore(self, spec, snapshot_dir: Path, engine_state: dict, deadline: float,
                reason: str, mark: Callable[[str], None] = lambda stage: None) -> NativeInstance:
        # One call: the VM is rebuilt from the files, its RAM mapped lazily (MAP_PRIVATE).
        instance = NativeInstance(spec, reason, restore_from=snapshot_dir)
        if time.monotonic() > deadline:
            instance.shutdown(None, timeout=2)
            raise TimeoutError("the native core was still loading the state")
        return instance


ENGINE = NativeEngine()
