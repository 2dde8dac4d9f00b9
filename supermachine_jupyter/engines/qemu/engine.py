"""The QEMU engine: ``qemu-system-x86_64`` driven over QMP, the engine that runs anywhere.

The machine is ``microvm`` with virtio-mmio devices. The guest console is QEMU's stdout (a pipe we read into a :class:`ConsoleBuffer`), the agent
is a virtio-serial port backed by a unix socket chardev, and QMP sits on another unix socket.
QEMU runs with ``-no-reboot``: the guest ending (init's ``reboot -f``, the agent's
``POWEROFF``, a kernel panic with ``panic=-1``) ends the QEMU process.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ...devices.balloon import BalloonStats
from ...devices.mounts import MountCounters, MountStatus
from ...errors import EngineError
from ...guest.console import ConsoleBuffer
from ..base import (
    AGENT_PORT_NAME,
    GUEST_READY_LINE,
    Engine,
    EngineInstance,
    LaunchSpec,
    RestoreProblem,
)
from ..process import resident_bytes, spawn_owned, terminate
from .qmp import QmpClient, QmpError, connect_when_ready
from .virtiofsd import Virtiofsd

if TYPE_CHECKING:
    from ...guest.assets import GuestAssets

QEMU_PACKAGE = "qemu-system-x86"
QEMU_NAMES = ("qemu-system-x86_64",)

#: Guest RAM's block id: the name QEMU gives microvm's RAM when ``-m`` alone sizes it, so a
#: stream saved from a normal VM loads into an explicit memory backend of the same id.
RAM_BLOCK_ID = "microvm.ram"
SNAPSHOT_STATE_FILE = "qemu-state.migration"
SNAPSHOT_RAM_FILE = "qemu-ram.img"
SNAPSHOT_TIMEOUT_S = 300.0
#: QEMU 7.2 limits migration to 32 MiB/s by default; a snapshot has no reason to throttle.
MIGRATION_MAX_BANDWIDTH = 1 << 40


def qemu_opt(value: "str | os.PathLike[str]") -> str:
    """``value`` escaped for a QEMU option string (``-drive``, ``-chardev``, ``-object``, …).

    QEMU splits those at commas and lets a later ``key=`` override an earlier one, so a path
    with a comma in it could name another file; a doubled comma is a literal one. Every path
    (and every other value not fixed by us) goes into an option string through here."""
    return os.fspath(value).replace(",", ",,")


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
        return console.wait_for(GUEST_READY_LINE, deadline_s, stop=lambda: proc.poll() is not None)
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

    def __init__(self, spec: LaunchSpec, accel: str, reason: str,
                 restore: "QemuRestore | None" = None):
        self.spec = spec
        self.accel = accel
        self.reason = reason
        #: set when this QEMU loads a snapshot instead of booting (see QemuRestore)
        self.restore = restore
        self._agent_path = spec.run_dir / "agent.sock"
        self._qmp_path = spec.run_dir / "qmp.sock"
        self._stderr = bytearray()
        self._qmp: QmpClient | None = None
        self._qmp_lock = threading.Lock()
        self._virtiofsd: list[Virtiofsd] = []
        # pci=off: microvm has no PCI bus; the kernel would only complain about it.
        cmdline = f"{spec.cmdline} pci=off sm.agent=port:{AGENT_PORT_NAME}"
        args = base_args(spec.memory_mib, spec.vcpus, spec.kernel, spec.initrd, cmdline, accel)
        if restore is not None:
            args = restore.machine_args(args, spec.memory_mib)
        args += ["-name", qemu_opt(spec.name),
                 "-chardev", f"socket,id=agent,path={qemu_opt(self._agent_path)},server=on,"
                             "wait=off",
                 "-device", "virtio-serial-device,id=vser0",
                 "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
                 "-qmp", f"unix:{qemu_opt(self._qmp_path)},server=on,wait=off"]
        args += self._device_args()
        if restore is not None:
            args += ["-incoming", "defer"]
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
        restore = self.restore
        for i, volume in enumerate(spec.volumes):
            # Restores attach per-VM overlays (qcow2) of the snapshot's volume copies.
            fmt = restore.volume_formats[i] if restore and i < len(restore.volume_formats) \
                else "raw"
            extra = ",snapshot=on" if restore and restore.volume_snapshot else ""
            args += ["-drive", f"file={qemu_opt(volume.path)},if=none,id=vol{i},format={fmt},"
                               f"readonly={'on' if volume.spec.read_only else 'off'},"
                               "cache=writeback,discard=unmap" + extra,
                     "-device", f"virtio-blk-device,drive=vol{i},"
                                f"serial={qemu_opt(volume.serial)}"]
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
                    args += ["-chardev", f"socket,id=fs{i},path={qemu_opt(daemon.socket_path)}",
                             "-device", f"vhost-user-fs-device,chardev=fs{i},"
                                        f"tag={qemu_opt(mount.tag)}"]
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
    def _try_connect_agent(self, timeout: float) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self._agent_path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None

    def is_running(self) -> bool:
        if self.proc.poll() is not None:
            return False
        # poll() answers "running" while another thread holds Popen's wait lock; ask the
        # kernel directly, without reaping, whether QEMU has exited.
        try:
            return os.waitid(os.P_PID, self.proc.pid,
                             os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        except ChildProcessError:     # reaped by then: poll() will say how it ended
            return False

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

    # -- the shutdown template's steps (EngineInstance.shutdown) --------------------------
    def _wait_ended(self, timeout: float) -> None:
        self.proc.wait(timeout=timeout)

    def _stop(self, timeout: float) -> None:
        """QMP ``quit``, then SIGTERM, then SIGKILL."""
        step = timeout / 2
        if self.is_running():
            try:
                self.qmp().execute("quit")
                self.proc.wait(timeout=step)
            except (subprocess.TimeoutExpired, EngineError, QmpError, OSError):
                pass
        if self.is_running():
            terminate(self.proc, grace=step)
        self.proc.wait()

    def _release(self) -> None:
        self._stop_virtiofsd()
        for reader in self._readers:
            reader.join(timeout=2)
        if self._qmp is not None:
            self._qmp.close()

    def process_ids(self) -> list[int]:
        pids = [self.proc.pid] if self.is_running() else []
        return pids + [d.proc.pid for d in self._virtiofsd if d.proc.poll() is None]

    def host_rss_bytes(self) -> int | None:
        """The resident memory of QEMU and its virtiofsd helpers: guest RAM QEMU has touched
        (and not been given back by the balloon) plus QEMU's own."""
        return resident_bytes(self.process_ids())

    # -- devices -------------------------------------------------------------------------
    def balloon_set_target_mib(self, balloon_mib: int) -> None:
        # QMP's "balloon" takes the memory the guest should keep, in bytes.
        self.qmp().execute("balloon", value=(self.spec.memory_mib - balloon_mib) * 1024 * 1024)

    def balloon_stats(self, target_mib: int) -> BalloonStats:
        qmp = self.qmp()
        if not getattr(self, "_stats_polling", False):
            qmp.execute("qom-set", path="/machine/peripheral/balloon0",
                        property="guest-stats-polling-interval", value=1)
            self._stats_polling = True
        info = qmp.execute("query-balloon")
        stats = qmp.execute("qom-get", path="/machine/peripheral/balloon0", property="guest-stats")
        return BalloonStats.from_qemu(self.spec.memory_mib, target_mib, info, stats)

    def mount_status(self) -> list[MountStatus]:
        return [MountStatus(d.spec, dax=False,
                            dax_note="no DAX: QEMU 7.2 has no DAX window for virtio-fs",
                            counters=d.counters() if d.proc.poll() is None else MountCounters())
                for d in self._virtiofsd]

    # -- snapshots (QEMU's migration stream; the format around it is snapshot.py's) -------
    # -- the snapshot_to template's steps (EngineInstance.snapshot_to) ---------------------
    # Now: the guest is paused (QMP ``stop``) for one migration to a file. Later, in
    # ``finish``, without the VM: a helper QEMU, never run, loads that stream into file-backed
    # RAM (``ram_file``, share=on) and saves it again with ``x-ignore-shared``. The result is
    # guest RAM as a plain file that restores map copy-on-write, plus a small device-state
    # stream (``state_file``).
    @property
    def mounts_not_snapshotted_because(self) -> str:
        return f"QEMU {qemu_version()}'s vhost-user-fs device is not migratable"

    def _guest_running(self) -> bool:
        return self.qmp().execute("query-status").get("running", False)

    def _pause(self) -> None:
        qmp = self.qmp()
        qmp.execute("migrate-set-parameters", **{"max-bandwidth": MIGRATION_MAX_BANDWIDTH})
        # A restored VM loaded with x-ignore-shared; its own RAM (share=off) must go in full.
        qmp.execute("migrate-set-capabilities",
                    capabilities=[{"capability": "x-ignore-shared", "state": False}])
        qmp.execute("stop")

    def _unpause(self) -> None:
        self.qmp().execute("cont")

    def _save_paused(self, directory: Path, deadline: float) -> "Callable[[], dict]":
        full = directory / "qemu-full.migration.tmp"
        state, ram = directory / SNAPSHOT_STATE_FILE, directory / SNAPSHOT_RAM_FILE
        try:
            self.qmp().execute("migrate", uri=f"exec:cat > {shlex.quote(str(full))}")
            wait_for_migration(self.qmp(), deadline, self.is_running, "saving the snapshot")
        except BaseException:
            full.unlink(missing_ok=True)
            raise
        spec = self.spec

        def finish() -> dict:
            helper = None
            helper_dir = Path(tempfile.mkdtemp(prefix="sm-snap-", dir=spec.run_dir.parent))
            helper_spec = dataclasses.replace(
                spec, name=f"{spec.name}-snapshot", run_dir=helper_dir, console=ConsoleBuffer(),
                volumes=tuple(dataclasses.replace(v, path=directory / f"volume{i}.img")
                              for i, v in enumerate(spec.data_volumes))
                + spec.volumes[len(spec.data_volumes):])   # not copied: attached where it is
            try:
                helper = QemuInstance(helper_spec, self.accel, "snapshot helper",
                                      restore=QemuRestore(ram, share=True, volume_snapshot=True))
                helper.incoming(full, deadline, ignore_shared=False)
                hq = helper.qmp()
                hq.execute("migrate-set-capabilities",
                           capabilities=[{"capability": "x-ignore-shared", "state": True}])
                hq.execute("migrate-set-parameters",
                           **{"max-bandwidth": MIGRATION_MAX_BANDWIDTH})
                hq.execute("migrate", uri=f"exec:cat > {shlex.quote(str(state))}")
                wait_for_migration(hq, deadline, helper.is_running, "converting the snapshot")
            finally:
                if helper is not None:
                    helper.shutdown(None, timeout=2)
                shutil.rmtree(helper_dir, ignore_errors=True)
                full.unlink(missing_ok=True)
            return {"qemu_version": qemu_version(), "accel": self.accel, "machine": "microvm",
                    "ram_block": RAM_BLOCK_ID, "state_file": SNAPSHOT_STATE_FILE,
                    "ram_file": SNAPSHOT_RAM_FILE}

        return finish

    def incoming(self, state: Path, deadline: float, ignore_shared: bool = True) -> None:
        """Load a migration stream (this QEMU was started with ``restore``); stays paused.

        Raises EngineError when QEMU refuses the stream (its own message, from stderr) and
        TimeoutError when ``deadline`` (monotonic) passes first."""
        qmp = self.qmp()
        if ignore_shared:
            qmp.execute("migrate-set-capabilities",
                        capabilities=[{"capability": "x-ignore-shared", "state": True}])
        qmp.execute("migrate-incoming", uri=f"exec:cat {shlex.quote(str(state))}")
        wait_for_migration(qmp, deadline, self.is_running, "loading the snapshot",
                           stderr=self._stderr)

    def resume(self) -> None:
        """Run a restored guest (QMP ``cont``)."""
        self.qmp().execute("cont")

    def copy_volume(self, index: int, target: Path) -> None:
        """A restored VM's volume is a qcow2 overlay: flattened into a raw copy."""
        source = self.spec.volumes[index].path
        if source.suffix != ".qcow2":
            return super().copy_volume(index, target)
        _run_qemu_img("convert", "-U", "-q", "-f", "qcow2", "-O", "raw", str(source),
                      str(target), what=f"copy volume {source}")


@dataclasses.dataclass(frozen=True)
class QemuRestore:
    """How a QEMU started for a snapshot differs from one that boots.

    Guest RAM is ``ram_file`` mapped through ``memory-backend-file``: ``share=off`` (restores:
    copy-on-write, so many VMs share the file's page cache) or ``share=on`` (the snapshot
    helper, which writes RAM into the file). No ``-kernel``: RAM already holds the guest.
    """
    ram_file: Path
    share: bool = False
    volume_formats: tuple[str, ...] = ()   # per volume; default raw
    volume_snapshot: bool = False          # -drive snapshot=on (the helper never writes)

    def machine_args(self, args: list[str], memory_mib: int) -> list[str]:
        out, skip = [], False
        for arg in args:
            if skip:
                skip = False
                continue
            if arg in ("-kernel", "-initrd", "-append"):
                skip = True
                continue
            out.append(arg)
        return out + [
            "-object", f"memory-backend-file,id={RAM_BLOCK_ID},size={memory_mib}M,"
                       f"mem-path={qemu_opt(self.ram_file)},share={'on' if self.share else 'off'}",
            "-M", f"microvm,acpi=off,memory-backend={RAM_BLOCK_ID}"]


def wait_for_migration(qmp: QmpClient, deadline: float, alive: "Callable[[], bool]",
                       what: str, stderr: bytearray | None = None) -> None:
    """Poll ``query-migrate`` until it completes; EngineError if it fails or QEMU dies."""
    while True:
        if not alive():
            time.sleep(0.05)   # let the stderr pump catch QEMU's last words
            said = bytes(stderr or b"").decode(errors="replace").strip()
            raise EngineError(f"QEMU exited while {what}" + (f": {said}" if said else ""))
        try:
            info = qmp.execute("query-migrate")
        except (EngineError, OSError) as exc:
            # QMP usually breaks because QEMU is exiting: give it a moment to say why.
            gone = time.monotonic() + 1.0
            while alive() and time.monotonic() < gone:
                time.sleep(0.01)
            if not alive():
                continue
            raise EngineError(f"QMP failed while {what}: {exc}") from exc
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise EngineError(f"QEMU migration {status} while {what}: "
                              f"{info.get('error-desc', 'no reason given')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"QEMU still {status or 'starting'} when the deadline passed "
                               f"while {what}")
        time.sleep(0.003)


@functools.lru_cache(maxsize=None)
def qemu_version() -> str:
    """``major.minor.micro`` of the installed ``qemu-system-x86_64`` (cached)."""
    binary = qemu_binary()
    if binary is None:
        raise EngineError(f"qemu-system-x86_64 not found: apt-get install {QEMU_PACKAGE}")
    out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                         check=False).stdout
    words = out.split()
    if len(words) > 3 and words[:3] == ["QEMU", "emulator", "version"]:
        return words[3]
    return out.strip()


def qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise EngineError("volumes in snapshots need qemu-img: apt-get install qemu-utils")
    return path


def _run_qemu_img(*args: str, what: str) -> None:
    result = subprocess.run([qemu_img(), *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise EngineError(f"qemu-img could not {what}: {result.stderr.strip()}")


class QemuEngine(Engine):
    """QEMU: its snapshots are a migration stream plus guest RAM as a file (see
    ``QemuInstance.snapshot_to``); a restored VM writes its volumes to qcow2 overlays."""

    name = "qemu"

    def boot(self, spec: LaunchSpec, accel: str, reason: str) -> QemuInstance:
        return QemuInstance(spec, accel, reason)

    def version_tag(self) -> str:
        return f"qemu {qemu_version()}"

    def made_by(self, engine_state: dict) -> str:
        return f"qemu {engine_state.get('qemu_version')}"

    def restore_problem(self, engine_state: dict) -> RestoreProblem | None:
        made, here = engine_state.get("qemu_version"), qemu_version()
        if made != here:
            return RestoreProblem(f"was made by QEMU {made}; this host runs QEMU {here}, whose "
                                  "migration format may differ: make the snapshot again here",
                                  other_version=True)
        if engine_state.get("accel") == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return RestoreProblem("was made under KVM (-cpu host) and /dev/kvm is not usable here")
        return None

    def volume_layer(self, base: Path, run_dir: Path, index: int) -> Path:
        layer = run_dir / f"volume{index}.qcow2"
        # "-F raw": the backing file's format is stated, never probed from its contents.
        _run_qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(layer),
                      what=f"make an overlay for {base}")
        return layer

    def restore(self, spec: LaunchSpec, snapshot_dir: Path, engine_state: dict,
                deadline: float, reason: str,
                mark: Callable[[str], None] = lambda stage: None) -> QemuInstance:
        formats = tuple("qcow2" if v.path.suffix == ".qcow2" else "raw" for v in spec.volumes)
        instance = QemuInstance(spec, engine_state.get("accel", "tcg"), reason,
                                restore=QemuRestore(snapshot_dir / engine_state["ram_file"],
                                                    volume_formats=formats))
        try:
            mark("qemu_started")
            instance.incoming(snapshot_dir / engine_state["state_file"], deadline)
        except BaseException:
            instance.shutdown(None, timeout=2)
            raise
        return instance


ENGINE = QemuEngine()

__all__ = ["ENGINE", "QemuEngine", "QemuInstance", "QemuRestore", "qemu_binary", "qemu_img",
           "qemu_opt", "qemu_version", "boots_to_init_with_kvm"]
