"""The interface every engine implements, and what engines share.

An engine turns a :class:`LaunchSpec` (engine-neutral: memory, vCPUs, guest image, kernel
command line, devices from the ``VmConfig``) into a running :class:`EngineInstance`. The
:class:`~supermachine_jupyter.vm.Vm` above it is the same whatever the engine: it talks to
the guest through the agent protocol over the socket the instance hands it.
"""

from __future__ import annotations

import abc
import dataclasses
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import EngineError
from ..guest.console import ConsoleBuffer

if TYPE_CHECKING:
    from ..config import VmConfig
    from ..devices.balloon import BalloonStats
    from ..devices.mounts import MountStatus
    from ..devices.volumes import PreparedVolume
    from ..guest.agent import AgentClient
    from ..guest.rootfs import ImageRootfs

#: The agent's virtio-serial port name (QEMU) and vsock port (native core).
AGENT_PORT_NAME = "sm.agent"
AGENT_VSOCK_PORT = 1024
#: Printed by the guest's init just before it starts the agent.
GUEST_READY_LINE = "supermachine-init: ready"


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """Everything an engine needs to start one VM."""
    name: str
    memory_mib: int
    vcpus: int
    kernel: Path                 # bzImage
    vmlinux: Path                # PVH entry: the vmlinux ELF, or the kernel when only that exists
    initrd: Path
    cmdline: str                 # engine-neutral kernel command line
    config: "VmConfig"
    run_dir: Path                # private directory for this VM's sockets and files
    console: ConsoleBuffer
    volumes: tuple["PreparedVolume", ...] = ()   # formatted files, in VmConfig order
    #: the OCI image booted (None: the initramfs's own busybox guest). Engines never look at
    #: it: its disk is the last of ``volumes`` (read-only), its boot a kernel command line key.
    rootfs: "ImageRootfs | None" = None

    @property
    def data_volumes(self) -> tuple["PreparedVolume", ...]:
        """The VmConfig's volumes: ``volumes`` without the image's root file system."""
        return self.volumes[:len(self.volumes) - 1] if self.rootfs is not None else self.volumes


@dataclasses.dataclass(frozen=True)
class RestoreProblem:
    """Why this host cannot load a snapshot's engine state."""
    message: str
    other_version: bool = False     # made by another version of the engine


class Engine(abc.ABC):
    """One engine: how it boots a VM, and everything it alone knows about its snapshots
    (its state files, its version, the layer a restored VM writes its volumes to). Nothing
    outside ``engines/`` asks which engine it is: it asks ``engines.get(name)``."""

    name: str = ""

    @abc.abstractmethod
    def boot(self, spec: LaunchSpec, accel: str, reason: str) -> "EngineInstance":
        """Start ``spec``'s VM; it boots while the caller connects to its agent."""

    def config_problem(self, config: "VmConfig") -> str | None:
        """Why this engine cannot run ``config`` (a limit of its own, named), or None."""
        return None

    @abc.abstractmethod
    def version_tag(self) -> str:
        """This engine's version as snapshots record it (and pre-booted cache keys use)."""

    @abc.abstractmethod
    def made_by(self, engine_state: dict) -> str:
        """``version_tag()`` of the engine that wrote a snapshot's ``engine_state``."""

    @abc.abstractmethod
    def restore_problem(self, engine_state: dict) -> RestoreProblem | None:
        """Why this host cannot load a snapshot with ``engine_state``, or None."""

    @abc.abstractmethod
    def volume_layer(self, base: Path, run_dir: Path, index: int) -> Path:
        """A restored VM's own writable layer in ``run_dir`` over a snapshot's copy ``base``
        of volume ``index``: restores never see each other's writes, and ``base`` is never
        written."""

    @abc.abstractmethod
    def restore(self, spec: LaunchSpec, snapshot_dir: Path, engine_state: dict,
                deadline: float, reason: str,
                mark: "Callable[[str], None]" = lambda stage: None) -> "EngineInstance":
        """An instance rebuilt from the snapshot's engine files with ``spec``'s devices,
        loaded and paused (``resume`` runs it). Raises EngineError when the engine refuses
        the files, TimeoutError when ``deadline`` (monotonic) passes first."""


class EngineInstance(abc.ABC):
    """One running VM inside one engine."""

    #: "qemu" or "native"
    engine_name: str = ""
    #: how the guest's instructions run: "kvm" or "tcg" (QEMU), "kvm" (native)
    accel: str = ""
    #: why this engine and accelerator were chosen, for reprs and panels
    reason: str = ""
    #: what the instance runs
    spec: LaunchSpec

    #: How long to wait between two attempts to reach a guest agent that is not there yet:
    #: each wait adds to the time to a VM's first output, and an attempt costs one local socket.
    agent_connect_retry_s = 0.01

    def connect_agent(self, timeout: float) -> socket.socket:
        """A connected stream socket to the guest agent's transport, retried until the
        guest listens; EngineError when the VM ends first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        last = "no attempt"
        while True:
            if not self.is_running():
                raise EngineError(self.exit_description() or f"the {self.engine_name} VM ended")
            try:
                sock = self._try_connect_agent(max(0.1, min(5.0, deadline - time.monotonic())))
                if sock is not None:
                    return sock
                last = "not listening yet"
            except OSError as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise EngineError(f"the guest agent of {self.spec.name} was not reachable "
                                  f"within {timeout:g} s ({last})")
            time.sleep(self.agent_connect_retry_s)

    @abc.abstractmethod
    def _try_connect_agent(self, timeout: float) -> socket.socket | None:
        """One attempt: a connected socket, None (or OSError) when the agent is not there."""

    @abc.abstractmethod
    def is_running(self) -> bool:
        """True while the engine runs the guest."""

    @abc.abstractmethod
    def exit_description(self) -> str | None:
        """Why the VM ended (None while it runs): exit status, engine error, guest reboot."""

    def settled_exit_description(self, wait_s: float = 1.0) -> str | None:
        """``exit_description()`` after giving a dying engine a moment to be reaped (the
        agent connection often drops a little before the engine process is gone)."""
        deadline = time.monotonic() + wait_s
        while self.is_running() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.exit_description()

    def shutdown(self, agent: "AgentClient | None", timeout: float) -> None:
        """End the VM, escalating from a clean guest poweroff (the agent's ``POWEROFF``, half
        of ``timeout``) to the engine's own ways of stopping it, then free what it holds.
        Safe to call on an instance that already ended."""
        if self.is_running() and agent is not None and not agent.closed:
            try:
                agent.poweroff()
                self._wait_ended(max(timeout / 2, 0.5))
            except Exception:  # noqa: BLE001 - escalate below
                pass
        self._stop(max(timeout / 2, 0.5))
        self._release()

    @abc.abstractmethod
    def _wait_ended(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the guest to end the VM itself."""

    @abc.abstractmethod
    def _stop(self, timeout: float) -> None:
        """End a VM that is still running, escalating as the engine allows."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Free what the ended VM held (helper processes, threads, memory, sockets)."""

    @abc.abstractmethod
    def process_ids(self) -> list[int]:
        """Host processes that belong to this VM (empty when it runs in-process)."""

    # -- devices (engines override what they support) --------------------------------------
    def balloon_set_target_mib(self, balloon_mib: int) -> None:
        """Ask the guest to give ``balloon_mib`` MiB to the balloon (absolute size)."""
        raise NotImplementedError(f"{self.engine_name}: balloon not supported")

    def balloon_stats(self, target_mib: int) -> "BalloonStats":
        """The balloon's statistics; ``target_mib`` is the size last asked for (its owner,
        the Vm, keeps it)."""
        raise NotImplementedError(f"{self.engine_name}: balloon not supported")

    # -- snapshots (engines override what they support; see snapshot.py) ------------------
    #: Why this engine cannot carry virtio-fs mounts across a snapshot (the one place each
    #: engine says it): "… cannot be snapshotted: <this>"; None for an engine that carries
    #: them (its restores re-attach the mounts and the guest's open files on them).
    mounts_not_snapshotted_because: str | None = "this engine cannot snapshot them"

    def snapshot_to(self, directory: Path, while_paused: "Callable[[], None] | None" = None,
                    timeout: float = 300.0) -> "Callable[[], dict]":
        """Save the VM's engine state (guest memory, vCPUs, irqchip, devices) into
        ``directory``: pause the guest, save what must be saved while it is paused, call
        ``while_paused`` (volume copies), resume it. Returns a function that finishes the
        files (it may run in another thread, after the VM has moved on) and returns what the
        snapshot header records about the engine (``engine_state``)."""
        if self.spec.config.mounts and self.mounts_not_snapshotted_because is not None:
            raise EngineError("snapshot: this VM has virtio-fs mounts, so it cannot be "
                              f"snapshotted: {self.mounts_not_snapshotted_because} (use "
                              "volumes instead)")
        deadline = time.monotonic() + timeout
        was_running = self._guest_running()
        paused_at = time.monotonic()
        self._pause()
        try:
            finish = self._save_paused(directory, deadline)
            if while_paused is not None:
                while_paused()
        finally:
            if was_running and self.is_running():
                self._unpause()
        paused_s = round(time.monotonic() - paused_at, 4)
        return lambda: {**finish(), "paused_seconds": paused_s}

    # The snapshot_to template's steps (engines that snapshot override them).
    def _guest_running(self) -> bool:
        raise NotImplementedError(f"{self.engine_name}: snapshots not supported")

    def _pause(self) -> None:
        raise NotImplementedError(f"{self.engine_name}: snapshots not supported")

    def _unpause(self) -> None:
        raise NotImplementedError(f"{self.engine_name}: snapshots not supported")

    def _save_paused(self, directory: Path, deadline: float) -> "Callable[[], dict]":
        """Save while the guest is paused; return the function that finishes the files."""
        raise NotImplementedError(f"{self.engine_name}: snapshots not supported")

    def incoming(self, state: Path, deadline: float, ignore_shared: bool = True) -> None:
        """Restore hook: load saved state into an instance launched for restore (paused)."""
        raise NotImplementedError(f"{self.engine_name}: snapshot restore not supported")

    def resume(self) -> None:
        """Restore hook: run the guest of a restored instance."""
        raise NotImplementedError(f"{self.engine_name}: snapshot restore not supported")

    def copy_volume(self, index: int, target: Path) -> None:
        """Copy volume ``index`` as this VM sees it into ``target`` as a sparse raw file (a
        snapshot's copy; called while the guest is paused)."""
        from ..devices.volumes import copy_sparse
        copy_sparse(self.spec.volumes[index].path, target)

    def mount_status(self) -> list["MountStatus"]:
        """One entry per virtio-fs mount, with counters."""
        return []

    @abc.abstractmethod
    def host_rss_bytes(self) -> int | None:
        """Host memory this VM holds resident right now, in bytes (None when the engine
        cannot tell, e.g. once it has ended): what ballooning gives back to the host.

        Each engine counts its own way (QEMU: its processes' RSS; the native core: the
        resident pages of the guest RAM mapping); callers only ever see bytes."""
