"""The QEMU engine: ``qemu-system-x86_64`` driven over QMP, the engine that runs anywhere.

The machine is ``microvm`` with virtio-mmio devices. The guest console is QEMU's stdout (a pipe we read into a :class:`ConsoleBuffer`), the agent
is a virtio-serial port backed by a unix socket chardev, and QMP sits on another unix socket.
QEMU runs with ``-no-reboot``: the guest ending (init's ``reboot -f``, the agent's
``POWEROFF``, a kernel panic with ``panic=-1``) ends the QEMU process.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..console import ConsoleBuffer
from ..errors import EngineError
from ..process import spawn_owned, terminate
from ..qmp import QmpClient, QmpError, connect_when_ready
from ..balloon import BalloonStats
from ..mounts import MountCounters, MountStatus
from .base import AGENT_PORT_NAME, GUEST_READY_LINE, EngineInstance, LaunchSpec
from .virtiofsd import Virtiofsd

if TYPE_CHECKING:
    from ..agent import AgentClient
    from ..assets import GuestAssets

QEMU_PACKAGE = "qemu-system-x86"
QEMU_NAMES = ("qemu-system-x86_64",)


def qemu_binary() -> str | None:
    for name in QEMU_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def accel_args(accel: str) -> list[str]:
    if accel == "kvm":
        # This workplace's QEMU 7.2 needs arch-capabilities masked to start under KVM.
        return ["-accel", "kvm", "-cpu", "host,-arch-capabilities"]
    return ["-accel", "tcg,thread=multi", "-cpu", "max"]


def base_args(memory_mib: int, vcpus: int, kernel: Path, initrd: Path, cmdline: str,
              accel: str) -> list[str]:
    binary = qemu_binary()
    if binary is None:
        raise EngineError(f"qemu-system-x86_64 not found: apt-get install {QEMU_PACKAGE}")
    # microvm: no PCI, no ACPI, no firmware detour; virtio-mmio devices declared on the
    # kernel command line by QEMU itself, the same transport the native core uses. Unlike
    # "-M pc" without ACPI, it also writes an MP table listing every vCPU.
    # force-legacy=false: modern (version 2) virtio-mmio, which vhost-user (virtiofsd) needs.
    return [binary, "-M", "microvm,acpi=off", "-global", "virtio-mmio.force-legacy=false",
            *accel_args(accel), "-m", str(memory_mib),
            "-smp", str(vcpus), "-nodefaults", "-no-user-config", "-no-reboot",
            "-display", "none", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", cmdline,
            "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]


def boots_to_init_with_kvm(assets: "GuestAssets", deadline_s: float) -> bool:
    """Calibration for accel.py: does our guest reach init under ``-accel kvm`` in time?"""
    args = base_args(128, 1, assets.kernel, assets.initrd,
                     "console=ttyS0 panic=-1 sm.agent=port:none", "kvm")
    proc = spawn_owned(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL)
    console = ConsoleBuffer()
    reader = threading.Thread(target=_pump, args=(proc.stdout, console), daemon=True)
    reader.start()
    try:
        return console.wait_for("supermachine-init:", deadline_s, stop=lambda: proc.poll() is not None)
    finally:
        terminate(proc, grace=0.5)
        reader.join(timeout=2)


def _pump(pipe, sink) -> None:
    """Copy a pipe into a ConsoleBuffer (or a bytearray) until EOF."""
    try:
        while True:
            chunk = os.read(pipe.fileno(), 65536)
            if not chunk:
                break
            if isinstance(sink, bytearray):
                sink += chunk
                del sink[:-65536]
            else:
                sink.append(chunk)
    except (OSError, ValueError):
        pass
    finally:
        if isinstance(sink, ConsoleBuffer):
            sink.wake()


class QemuInstance(EngineInstance):
    engine_name = "qemu"

    def __init__(self, spec: LaunchSpec, accel: str, reason: str):
        self.spec = spec
        self.accel = accel
        self.reason = reason
        self._agent_path = spec.run_dir / "agent.sock"
        self._qmp_path = spec.run_dir / "qmp.sock"
        self._stderr = bytearray()
        self._qmp: QmpClient | None = None
        self._qmp_lock = threading.Lock()
        self._stopping = False
        self._balloon_target_mib = 0
        self._virtiofsd: list[Virtiofsd] = []
        # pci=off: microvm has no PCI bus; the kernel would only complain about it.
        cmdline = f"{spec.cmdline} pci=off sm.agent=port:{AGENT_PORT_NAME}"
        args = base_args(spec.memory_mib, spec.vcpus, spec.kernel, spec.initrd, cmdline, accel)
        args += ["-name", spec.name,
                 "-chardev", f"socket,id=agent,path={self._agent_path},server=on,wait=off",
                 "-device", "virtio-serial-device,id=vser0",
                 "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
                 "-qmp", f"unix:{self._qmp_path},server=on,wait=off"]
        args += self._device_args()
        self.args = args
        try:
            self.proc = spawn_owned(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, cwd=spec.run_dir)
        except BaseException:
            self._stop_virtiofsd()
            raise
        self._readers = [
            threading.Thread(target=_pump, args=(self.proc.stdout, spec.console), daemon=True,
                             name=f"qemu-console-{spec.name}"),
            threading.Thread(target=_pump, args=(self.proc.stderr, self._stderr), daemon=True,
                             name=f"qemu-stderr-{spec.name}"),
        ]
        for reader in self._readers:
            reader.start()

    def _device_args(self) -> list[str]:
        """virtio-blk volumes, virtio-balloon and virtio-fs mounts from the config."""
        spec, args = self.spec, []
        for i, volume in enumerate(spec.volumes):
            args += ["-drive", f"file={volume.path},if=none,id=vol{i},format=raw,"
                               f"readonly={'on' if volume.spec.read_only else 'off'},"
                               "cache=writeback,discard=unmap",
                     "-device", f"virtio-blk-device,drive=vol{i},serial={volume.serial}"]
        if spec.config.balloon:
            args += ["-device", "virtio-balloon-device,id=balloon0,deflate-on-oom=on"]
        if spec.config.mounts:
            # vhost-user needs guest memory that virtiofsd can map: a shared memfd.
            args += ["-object", f"memory-backend-memfd,id=mem,size={spec.memory_mib}M,share=on",
                     "-M", "microvm,acpi=off,memory-backend=mem"]
            try:
                for i, mount in enumerate(spec.config.mounts):
                    daemon = Virtiofsd(mount, spec.run_dir / f"fs{i}.sock")
                    self._virtiofsd.append(daemon)
                    daemon.wait_ready()
                    args += ["-chardev", f"socket,id=fs{i},path={daemon.socket_path}",
                             "-device", f"vhost-user-fs-device,chardev=fs{i},tag={mount.tag}"]
            except BaseException:
                self._stop_virtiofsd()
                raise
        return args

    def _stop_virtiofsd(self) -> None:
        for daemon in self._virtiofsd:
            daemon.stop()

    def __repr__(self) -> str:
        return f"<QemuInstance {self.spec.name} pid={self.proc.pid} accel={self.accel}>"

    # -- EngineInstance ------------------------------------------------------------------
    def connect_agent(self, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_running():
                raise EngineError(self.exit_description() or "QEMU exited")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self._agent_path))
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise EngineError(f"QEMU did not open {self._agent_path} within {timeout} s")
                time.sleep(0.01)

    def is_running(self) -> bool:
        return self.proc.poll() is None

    def exit_description(self) -> str | None:
        code = self.proc.poll()
        if code is None:
            return None
        stderr = bytes(self._stderr).decode(errors="replace").strip()
        if code < 0:
            what = f"QEMU was killed by signal {-code}"
        elif code == 0:
            what = "the guest shut down (QEMU exited 0)"
        else:
            what = f"QEMU exited with status {code}"
        return what + (f": {stderr.splitlines()[-1]}" if stderr else "")

    def qmp(self) -> QmpClient:
        """The QMP connection (opened on first use)."""
        with self._qmp_lock:
            if self._qmp is None:
                self._qmp = connect_when_ready(str(self._qmp_path), time.monotonic() + 10,
                                               self.is_running)
            return self._qmp

    def shutdown(self, agent: "AgentClient | None", timeout: float) -> None:
        """Agent POWEROFF → QMP ``quit`` → SIGTERM → SIGKILL, each with a share of ``timeout``."""
        self._stopping = True
        step = max(timeout / 3, 0.5)
        if self.is_running() and agent is not None and not agent.closed:
            try:
                agent.poweroff()
                self.proc.wait(timeout=step)
            except (subprocess.TimeoutExpired, Exception):  # noqa: BLE001 - escalate below
                pass
        if self.is_running():
            try:
                self.qmp().execute("quit")
                self.proc.wait(timeout=step)
            except (subprocess.TimeoutExpired, EngineError, QmpError, OSError):
                pass
        if self.is_running():
            terminate(self.proc, grace=step)
        self.proc.wait()
        self._stop_virtiofsd()
        for reader in self._readers:
            reader.join(timeout=2)
        if self._qmp is not None:
            self._qmp.close()

    def process_ids(self) -> list[int]:
        pids = [self.proc.pid] if self.is_running() else []
        return pids + [d.proc.pid for d in self._virtiofsd if d.proc.poll() is None]

    # -- devices -------------------------------------------------------------------------
    def balloon_set_target_mib(self, balloon_mib: int) -> None:
        # QMP's "balloon" takes the memory the guest should keep, in bytes.
        self._balloon_target_mib = balloon_mib
        self.qmp().execute("balloon", value=(self.spec.memory_mib - balloon_mib) * 1024 * 1024)

    def balloon_stats(self) -> BalloonStats:
        qmp = self.qmp()
        if not getattr(self, "_stats_polling", False):
            qmp.execute("qom-set", path="/machine/peripheral/balloon0",
                        property="guest-stats-polling-interval", value=1)
            self._stats_polling = True
        info = qmp.execute("query-balloon")
        stats = qmp.execute("qom-get", path="/machine/peripheral/balloon0", property="guest-stats")
        return BalloonStats.from_qemu(self.spec.memory_mib, self._balloon_target_mib, info, stats)

    def mount_status(self) -> list[MountStatus]:
        return [MountStatus(d.spec, dax=False,
                            dax_note="no DAX: QEMU 7.2 has no DAX window for virtio-fs",
                            counters=d.counters() if d.proc.poll() is None else MountCounters())
                for d in self._virtiofsd]


def start(spec: LaunchSpec, accel: str, reason: str) -> QemuInstance:
    return QemuInstance(spec, accel, reason)


__all__ = ["QemuInstance", "start", "qemu_binary", "boots_to_init_with_kvm", "GUEST_READY_LINE"]
