"""The one path by which every VM comes into being, booted or restored::

    (what to start, VmConfig) → run directory → engine boot | engine restore
        → agent handshake → guest refresh (restores) → Vm

:func:`launch` is that path; :func:`boot` (an image's kernel and initramfs, what
``Image.start`` does) and :func:`restore` (a snapshot, what ``Image.from_snapshot(p).start``
does) only say what differs: how the :class:`LaunchSpec` is made, how the engine starts, how
a failure reads. Whatever fails on the way, the engine is ended and the run directory removed
here, once, and an interrupt (KeyboardInterrupt) while booting never leaves an engine behind.
Every VM launched is listed in the registry (the Jupyter server's sidebar) until it stops.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .config import VmConfig
from .devices import mounts, rootfs, volumes
from .devices.volumes import PreparedVolume
from .engines import choose_engine, get, start_engine
from .engines.base import LaunchSpec
from .errors import AgentError, EngineError, ImageError, VmError
from .guest.agent import AgentClient, ErrorCode, RemoteError
from .guest.console import ConsoleBuffer
from .jupyter import registry
from .snapshots.format import Snapshot, SnapshotError, SnapshotTimeoutError
from .vm import Vm

if TYPE_CHECKING:
    from .engines.base import EngineInstance
    from .image import Image

Progress = Callable[[str], None]

DEFAULT_BOOT_TIMEOUT_S = 120.0
# reboot=t: a guest reboot is a triple fault, which ends the VM at once on every engine.
BASE_CMDLINE = "console=ttyS0 panic=-1 reboot=t"
#: x86 Linux truncates its command line at 2048 bytes (COMMAND_LINE_SIZE); engines append their
#: own device entries (the native core: one virtio_mmio.device= per device), so ours stops here.
MAX_CMDLINE_BYTES = 1536


def _silent(_: str) -> None:
    pass


#: The failures of a launch that say something about the guest or the engine (anything else,
#: KeyboardInterrupt included, is raised as it is).
LAUNCH_FAILURES = (AgentError, EngineError, TimeoutError, OSError)


@dataclasses.dataclass(frozen=True)
class Launch:
    """What differs between a boot and a restore; :func:`launch` does the rest.

    - ``spec(run_dir)``: the VM's LaunchSpec, given its fresh private run directory;
    - ``start(spec, mark)``: the engine instance, running (a restore loads, checks and
      resumes it here);
    - ``failed(exc, instance, spec)``: the error a caller sees for a failure of the
      ``LAUNCH_FAILURES`` kinds (``instance`` is None when the engine never started);
    - ``refresh(agent, seconds_left)``: what the guest needs once its agent answers;
    - ``timeout_s``: the whole launch, from the start to the last refresh;
    - ``restored_from``, ``balloon_target_mib``: what the new Vm starts out with.
    """
    spec: Callable[[Path], "LaunchSpec"]
    start: Callable[["LaunchSpec", Callable[[str], None]], "EngineInstance"]
    failed: Callable[[BaseException, "EngineInstance | None", "LaunchSpec | None"], Exception]
    timeout_s: float
    refresh: Callable[[AgentClient, float], None] | None = None
    restored_from: Path | None = None
    balloon_target_mib: int = 0


def vm_name(name: str | None, config: "VmConfig") -> str:
    """The new VM's name: the caller's, the config's, or a fresh ``vm-xxxxxx``."""
    return name or config.name or f"vm-{secrets.token_hex(3)}"


def launch(name: str, config: "VmConfig", how: Launch) -> Vm:
    """Bring a VM up as ``how`` says and return it once its agent has answered."""
    started = time.monotonic()
    deadline = started + how.timeout_s
    marks: dict[str, float] = {}

    def mark(stage: str) -> None:
        marks[stage] = round(time.monotonic() - started, 4)

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{how.timeout_s:g} s passed")
        return remaining

    run_dir = Path(tempfile.mkdtemp(prefix=f"sm-{name[:16]}-", dir=config.vsock_mux_dir))
    spec = instance = agent = announcement = None
    try:
        spec = how.spec(run_dir)
        # Listed as "booting" from here on: the sidebar shows the VM while it boots.
        announcement = registry.announce(name, config, spec.memory_mib, spec.vcpus)
        instance = how.start(spec, mark)
        agent = AgentClient(instance.connect_agent(timeout=left()), name=name)
        agent.handshake(timeout=left())
        mark("agent_hello")
        if how.refresh is not None:
            how.refresh(agent, left())
            mark("guest_refreshed")
    except BaseException as exc:
        # The error is worded before the cleanup: an engine that is shut down no longer
        # says why it ended on its own (the native core's exit record goes with it).
        error = how.failed(exc, instance, spec) if isinstance(exc, LAUNCH_FAILURES) else None
        if announcement is not None:
            announcement.close()
        if agent is not None:
            agent.close()
        if instance is not None:
            instance.shutdown(None, timeout=3)
        shutil.rmtree(run_dir, ignore_errors=True)
        if error is not None:
            raise error from exc
        raise
    vm = Vm(spec, instance, agent, time.monotonic() - started, registry.withdraw,
            restored_from=how.restored_from, restore_timings=marks,
            balloon_target_mib=how.balloon_target_mib)
    registry.publish(vm, announcement)   # the booting entry becomes the VM's (never raises)
    return vm


# --- booting an image -------------------------------------------------------------------------

def boot(image: "Image", config: VmConfig, *, name: str | None = None,
         progress: Progress = _silent, boot_timeout: float = DEFAULT_BOOT_TIMEOUT_S) -> Vm:
    """Boot a VM of ``image`` (its kernel and initramfs, or ``config.assets``) on the engine
    ``config`` asks for, and return it once its agent answers (within ``boot_timeout``)."""
    name = vm_name(name, config)
    kernel, vmlinux, initrd = image.kernel, image.vmlinux, image.initrd
    if config.assets is not None:
        kernel, initrd = Path(config.assets.kernel), Path(config.assets.initrd)
        vmlinux = kernel
    choice = choose_engine(config.engine, config)
    memory = config.memory_mib or image.default_memory_mib
    vcpus = config.vcpus or image.default_vcpus
    image_root = image.rootfs
    cmdline = " ".join(filter(None, [BASE_CMDLINE, f"sm.hostname={name}",
                                     rootfs.cmdline() if image_root is not None else "",
                                     volumes.cmdline(list(config.volumes)),
                                     mounts.cmdline(list(config.mounts))]))
    if len(cmdline) > MAX_CMDLINE_BYTES:
        raise VmError(f"VM {name!r}: its volumes and mounts make a kernel command line of "
                      f"{len(cmdline)} bytes, more than the {MAX_CMDLINE_BYTES} this guest "
                      "takes: use shorter guest paths or fewer volumes and mounts")
    prepared = tuple(volumes.prepare(v, i) for i, v in enumerate(config.volumes))
    for volume in prepared:
        if volume.formatted_now:
            progress(f"formatted volume {volume.path} ({volume.size_mib} MiB, ext4)")
    if image_root is not None:       # the image's disk: one more read-only volume, last
        prepared += (rootfs.volume(image_root),)

    def spec(run_dir: Path) -> LaunchSpec:
        return LaunchSpec(name=name, memory_mib=memory, vcpus=vcpus, kernel=kernel,
                          vmlinux=vmlinux, initrd=initrd, cmdline=cmdline, config=config,
                          run_dir=run_dir, console=ConsoleBuffer(), volumes=prepared,
                          rootfs=image_root)

    def start(spec: LaunchSpec, mark) -> "EngineInstance":
        # One short line: why this engine was chosen is in %vm info and doctor.
        progress(f"starting {name} ({memory} MiB, {vcpus} vCPU) on "
                 f"{choice.name}/{choice.accel}")
        instance = start_engine(choice, spec)
        progress(f"booting {name}…")
        return instance

    def failed(exc: BaseException, instance, spec) -> VmError:
        why = (instance.settled_exit_description(0.5) if instance is not None else None) or str(exc)
        tail = "\n".join(spec.console.text().splitlines()[-15:]) if spec else ""
        return VmError(f"VM {name!r} did not boot: {why}\n--- last console lines ---\n{tail}")

    return launch(name, config, Launch(spec, start, failed, timeout_s=boot_timeout))


# --- restoring a snapshot ---------------------------------------------------------------------

class _Deadline:
    def __init__(self, timeout: float, path: Path):
        self.timeout, self.path = timeout, path
        self.at = time.monotonic() + timeout

    def left(self) -> float:
        return self.at - time.monotonic()

    def error(self, stage: str) -> SnapshotTimeoutError:
        return SnapshotTimeoutError(
            f"snapshot restore from {self.path} took longer than restore_timeout="
            f"{self.timeout:g} s ({stage}); raise it with VmConfig(restore_timeout=…) or "
            "config.with_restore_timeout(…)")


def _restored_volumes(snapshot: Snapshot, config: VmConfig, run_dir: Path) -> list:
    """The snapshot's volume copies as a restored VM's volumes: read-only ones as they are,
    writable ones behind the engine's per-VM layer in ``run_dir``."""
    engine = get(snapshot.engine)
    out = []
    for i, (vol, saved) in enumerate(zip(config.volumes, snapshot.header["volumes"])):
        base = snapshot.path / saved["file"]
        try:
            path = base if saved["read_only"] else engine.volume_layer(base, run_dir, i)
        except (EngineError, VmError, OSError) as exc:
            raise SnapshotError(f"snapshot {snapshot.path}: volume {saved['file']} could not "
                                f"be layered for the restored VM: {exc}") from exc
        out.append(PreparedVolume(vol, saved["serial"], path, formatted_now=False))
    return out


def _load(snapshot: Snapshot, spec, deadline: _Deadline, mark: Callable[[str], None]):
    """An engine instance rebuilt from ``snapshot`` with ``spec``'s devices, paused."""
    reason = f"restored from snapshot {snapshot.path} (made on {snapshot.engine}/{snapshot.accel})"
    try:
        instance = get(snapshot.engine).restore(spec, snapshot.path,
                                                snapshot.header["engine_state"], deadline.at,
                                                reason, mark)
    except TimeoutError as exc:
        raise deadline.error(f"{snapshot.engine} loading the state: {exc}") from exc
    except EngineError as exc:
        raise SnapshotError(f"snapshot {snapshot.path} could not be restored: {exc}") from exc
    mark("state_loaded")
    return instance


def snapshot_label(path: Path) -> str:
    """How progress lines name a snapshot: the pre-booted cache's by what it is (its
    ``default-<key>`` directory name means nothing to a reader), others by name."""
    return ("the pre-booted snapshot" if path.name.startswith("default-")
            else f"snapshot {path.name!r}")


def restore(snapshot: Snapshot, config: VmConfig | None = None, *, name: str | None = None,
            progress: Progress = _silent) -> Vm:
    """Start a new VM from ``snapshot`` (what ``Image.from_snapshot(p).start()`` does) within
    ``config.restore_timeout``: the header and host are checked first, the RAM and volume
    digests while the engine loads the state, and the guest runs only once they match."""
    config = config or VmConfig()
    deadline = _Deadline(config.restore_timeout, snapshot.path)
    snapshot.check_host()
    effective = snapshot.restored_config(config)
    snapshot.verify_state()
    name = vm_name(name, config)
    h = snapshot.header
    # An image's root file system is not in the snapshot: the very file it booted must
    # still be in the image cache (checked here, before any engine starts).
    image_root = None
    if h.get("rootfs") is not None:
        try:
            image_root = rootfs.from_record(h["rootfs"], str(snapshot.path))
        except ImageError as exc:
            raise SnapshotError(str(exc)) from exc

    # Guest RAM and volume digests are checked while the engine starts and loads the state;
    # the guest only runs once they match.
    verdict: list[BaseException | None] = []

    def verify() -> None:
        try:
            snapshot.verify_contents()
            verdict.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            verdict.append(exc)

    checker = threading.Thread(target=verify, name=f"snapshot-verify-{name}", daemon=True)

    def spec(run_dir: Path) -> LaunchSpec:
        return LaunchSpec(
            name=name, memory_mib=snapshot.memory_mib, vcpus=snapshot.vcpus,
            kernel=Path(h["kernel"]), vmlinux=Path(h["kernel"]), initrd=Path(h["initrd"]),
            cmdline=h["cmdline"], config=effective, run_dir=run_dir, console=console,
            volumes=tuple(_restored_volumes(snapshot, effective, run_dir))
            + ((rootfs.volume(image_root),) if image_root is not None else ()),
            rootfs=image_root)

    def start(spec: LaunchSpec, mark: Callable[[str], None]):
        mark("header_checked")
        checker.start()
        progress(f"restoring {name} ({snapshot.memory_mib} MiB, {snapshot.vcpus} vCPU) from "
                 f"{snapshot_label(snapshot.path)}")
        instance = _load(snapshot, spec, deadline, mark)
        try:
            checker.join(max(deadline.left(), 0))
            if checker.is_alive():
                raise deadline.error("checking the RAM and volume digests")
            if verdict[0] is not None:
                raise verdict[0]
            mark("digests_checked")
            instance.resume()
        except BaseException:
            instance.shutdown(None, timeout=2)
            raise
        return instance

    def refresh(agent, seconds_left: float) -> None:
        _refresh_guest(agent, name, timeout=seconds_left)
        console.append(f"[supermachine: {name} restored from snapshot {snapshot.path} "
                       f"of {snapshot.source_name!r}, made {snapshot.created_at}]\n".encode())

    def failed(exc: BaseException, instance, spec) -> SnapshotError:
        ended = instance.settled_exit_description(0.5) if instance is not None else None
        if isinstance(exc, AgentError):
            # A lost connection is said as such, however long it took: restore_timeout is
            # no cure for it.
            return SnapshotError(f"snapshot {snapshot.path}: the restored guest's agent "
                                 f"connection was lost: {ended or exc}")
        if isinstance(exc, TimeoutError) or (deadline.left() <= 0 and ended is None):
            return deadline.error("waiting for the guest agent")
        return SnapshotError(f"snapshot {snapshot.path}: the restored guest's agent did not "
                             f"answer: {ended or exc}")

    console = ConsoleBuffer()
    try:
        return launch(name, effective, Launch(
            spec, start, failed, timeout_s=max(deadline.left(), 0.01), refresh=refresh,
            restored_from=snapshot.path,
            balloon_target_mib=int(h.get("balloon_target_mib") or 0)))
    finally:
        if checker.is_alive():
            checker.join(5)


def _refresh_guest(agent, name: str, timeout: float) -> None:
    """Make a restored guest its own: hostname, fresh entropy (mixed into the pool, which the
    kernel reseeds from within seconds of an early-uptime restore), the current time (busybox
    ``date -s``: whole seconds; the initramfs's busybox, which an OCI image need not have)."""
    ends = time.monotonic() + timeout
    clock = agent.exec([rootfs.GUEST_BUSYBOX, "date", "-s", f"@{int(time.time())}"])
    agent.write_file("/proc/sys/kernel/hostname", name.encode(), timeout=timeout)
    agent.write_file("/dev/urandom", os.urandom(64), timeout=max(ends - time.monotonic(), 0.01))
    try:
        clock.wait(timeout=max(ends - time.monotonic(), 0.01))
    except RemoteError as exc:
        if exc.code != ErrorCode.EXEC_FAILED:
            raise
        # A snapshot made before the initramfs had /.supermachine: its busybox is on PATH.
        agent.exec(["date", "-s", f"@{int(time.time())}"]).wait(
            timeout=max(ends - time.monotonic(), 0.01))
