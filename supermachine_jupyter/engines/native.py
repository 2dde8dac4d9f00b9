"""The native KVM core (C, bound with cffi): a thin Python layer over ``native/include/supermachine.h``.

Two levels:

* :class:`NativeVm` — one KVM VM of the core: create, start, pause/resume, stop, console ring,
  balloon, per-device counters and broken flags, the exit record. Used directly by the probe
  tests and the calibration.
* the engine (:func:`available`, :func:`start`) — the ``EngineInstance`` of ``engines/base.py``
  on top of :class:`NativeVm`, with the agent reached through the hybrid-vsock mux socket.

Guest faults (emulation failure, internal error, triple fault, unhandled I/O or MMIO in strict
mode) end the VM; the next call on it raises :class:`GuestFaultError` naming the exit, and the
console carries a ``[supermachine] VM failed …`` line.
"""

from __future__ import annotations

import importlib
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import EngineError, VmStoppedError
from .base import Engine, EngineInstance, RestoreProblem

#: Module the cffi build produces; SUPERMACHINE_NATIVE_MODULE=_native_asan selects the
#: sanitizer build (needs LD_PRELOAD of libasan).
NATIVE_MODULE_ENV = "SUPERMACHINE_NATIVE_MODULE"
PROBE_DIR = Path(__file__).resolve().parent.parent / "_probes"
PAGE_BYTES = 4096
MIB_TO_4K_PAGES = 256
CONSOLE_CHUNK_BYTES = 64 * 1024
#: guest/host cycle ratio below which KVM counts as running guests at hardware speed
CALIB_HARDWARE_MAX_RATIO = 3.0
BALLOON_STAT_FIELDS = ("swap_in", "swap_out", "major_faults", "minor_faults", "free_memory",
                       "total_memory", "available_memory", "disk_caches", "hugetlb_allocations",
                       "hugetlb_failures")

_lib = None
_ffi = None
_import_error: Exception | None = None


class NativeCoreError(EngineError):
    """A call into the native core failed; ``status`` is the sm_status name."""

    def __init__(self, message: str, status: str = ""):
        super().__init__(message)
        self.status = status


class GuestFaultError(NativeCoreError):
    """The VM ended because of the guest: ``reason`` (e.g. ``emulation_failure``), ``rip``,
    ``insn_bytes`` and ``kvm_exit_reason`` come from the core's exit record."""

    def __init__(self, info: dict):
        super().__init__(f"VM failed ({info['reason']}): {info['message']}", "SM_ERR_VM_FAILED")
        self.info = info
        self.reason = info["reason"]
        self.rip = info["rip"]
        self.insn_bytes = info["insn_bytes"]
        self.kvm_exit_reason = info["kvm_exit_reason"]


def _load():
    global _lib, _ffi, _import_error
    if _lib is not None:
        return _ffi, _lib
    name = os.environ.get(NATIVE_MODULE_ENV, "_native")
    try:
        mod = importlib.import_module(f"supermachine_jupyter.{name}")
    except ImportError as exc:
        _import_error = exc
        raise
    _ffi, _lib = mod.ffi, mod.lib
    return _ffi, _lib


def library():
    """(ffi, lib) of the compiled core; ImportError if it was not built."""
    return _load()


def version() -> str:
    """The core's version string (recorded in snapshots)."""
    ffi, lib = _load()
    return ffi.string(lib.sm_version()).decode()


def kvm_check() -> tuple[bool, str]:
    """Can the core use /dev/kvm here? (ok, message naming what is missing)."""
    ffi, lib = _load()
    err = ffi.new("char[512]")
    rc = lib.sm_kvm_check(err, 512)
    return rc == 0, ffi.string(err).decode(errors="replace")


def probe_path(name: str) -> Path:
    """Path of a built probe guest (``uart``, ``balloon``, ``blk``, ``vsock``, ``bad_guest``,
    ``calib``, ``exits``)."""
    path = PROBE_DIR / f"{name}.elf"
    if not path.exists():
        raise NativeCoreError(f"probe guest {path} is missing: build with "
                              "`python native/build_native.py` or reinstall the package")
    return path


def _status_name(lib, rc: int) -> str:
    return _ffi.string(lib.sm_status_name(rc)).decode()


class NativeVm:
    """One VM of the native core."""

    def __init__(self, kernel: str | os.PathLike, *, memory_mib: int = 64, vcpus: int = 1,
                 initrd: str | os.PathLike | None = None, cmdline: str = "",
                 balloon: bool = False, balloon_deflate_on_oom: bool = False,
                 balloon_stats_interval_s: int = 0,
                 volumes: Sequence[tuple] = (),
                 vsock_uds_path: str | os.PathLike | None = None, vsock_guest_cid: int = 3,
                 strict_unhandled_exits: bool = False,
                 mounts: Sequence[tuple] = ()):
        ffi, lib = _load()
        self._ffi, self._lib = ffi, lib
        keep = []  # cffi char[] objects must outlive sm_vm_create
        cfg = self._config(ffi, lib, keep, kernel=kernel, memory_mib=memory_mib, vcpus=vcpus,
                           initrd=initrd, cmdline=cmdline, balloon=balloon,
                           balloon_deflate_on_oom=balloon_deflate_on_oom,
                           balloon_stats_interval_s=balloon_stats_interval_s, volumes=volumes,
                           vsock_uds_path=vsock_uds_path, vsock_guest_cid=vsock_guest_cid,
                           strict_unhandled_exits=strict_unhandled_exits, mounts=mounts)
        out = ffi.new("sm_vm **")
        err = ffi.new("char[512]")
        rc = lib.sm_vm_create(cfg, out, err, 512)
        if rc != 0:
            raise NativeCoreError(f"sm_vm_create: {ffi.string(err).decode(errors='replace')}",
                                  _status_name(lib, rc))
        self._vm = out[0]
        self._cursor = ffi.new("uint64_t *")
        self._started_ns: int | None = None
        self.vsock_uds_path = os.fspath(vsock_uds_path) if vsock_uds_path else None

    @staticmethod
    def _config(ffi, lib, keep: list, *, kernel, memory_mib, vcpus, initrd, cmdline, balloon,
                balloon_deflate_on_oom, balloon_stats_interval_s, volumes, vsock_uds_path,
                vsock_guest_cid, strict_unhandled_exits, mounts):
        """The sm_vm_config of a create or a restore (a restore ignores the boot fields). Its
        strings are appended to ``keep``, which must outlive the core call."""
        cfg = ffi.new("sm_vm_config *")

        def cstr(value):
            if value is None:
                return ffi.NULL
            buf = ffi.new("char[]", os.fsencode(value))
            keep.append(buf)
            return buf

        cfg.memory_mib = int(memory_mib)
        cfg.vcpus = int(vcpus)
        cfg.kernel_path = cstr(kernel)
        cfg.initrd_path = cstr(initrd)
        cfg.cmdline = cstr(cmdline)
        cfg.balloon = int(bool(balloon))
        cfg.balloon_deflate_on_oom = int(bool(balloon_deflate_on_oom))
        cfg.balloon_stats_interval_s = int(balloon_stats_interval_s)
        volumes = list(volumes)
        if len(volumes) > lib.SM_MAX_BLK_DEVICES:
            raise NativeCoreError(f"at most {lib.SM_MAX_BLK_DEVICES} block devices", "SM_ERR_INVALID_ARGUMENT")
        for i, volume in enumerate(volumes):  # (path, read_only[, serial])
            cfg.blk[i].path = cstr(volume[0])
            cfg.blk[i].read_only = int(bool(volume[1]))
            cfg.blk[i].serial = cstr(volume[2] if len(volume) > 2 else None)
        cfg.n_blk = len(volumes)
        cfg.vsock_uds_path = cstr(vsock_uds_path)
        cfg.vsock_guest_cid = int(vsock_guest_cid)
        cfg.strict_unhandled_exits = int(bool(strict_unhandled_exits))
        mounts = list(mounts)
        if len(mounts) > lib.SM_MAX_FS_DEVICES:
            raise NativeCoreError(f"at most {lib.SM_MAX_FS_DEVICES} virtio-fs mounts", "SM_ERR_INVALID_ARGUMENT")
        for i, mount in enumerate(mounts):  # (host_path, tag, read_only) -> "virtio-fs<i>"
            cfg.fs[i].host_path = cstr(mount[0])
            cfg.fs[i].tag = cstr(mount[1])
            cfg.fs[i].read_only = int(bool(mount[2]))
        cfg.n_fs = len(mounts)
        return cfg

    @classmethod
    def restore(cls, path: str | os.PathLike, *, start: bool = True, balloon: bool = False,
                balloon_deflate_on_oom: bool = False, balloon_stats_interval_s: int = 0,
                volumes: Sequence[tuple] = (), vsock_uds_path: str | os.PathLike | None = None,
                vsock_guest_cid: int = 3) -> NativeVm:
        """A VM from a snapshot directory written by :meth:`snapshot`. Guest RAM is a
        copy-on-write mapping of its memory.bin, so VMs restored from one snapshot share the
        unmodified pages. ``start=False`` leaves it created; :meth:`start` runs it.

        The device keywords mean what they mean for ``NativeVm(...)`` and give the host side of
        the snapshot's devices: the same devices in the same order, the same balloon flags,
        volumes of the same size, read-only flag and serial (each restore its own copy of the
        file), a vsock socket path of its own. A restored vsock has no connections and tells
        the guest so with a transport reset event. A different device list, or a damaged,
        truncated or other-version snapshot raises NativeCoreError saying "snapshot" and why."""
        ffi, lib = _load()
        self = cls.__new__(cls)
        self._ffi, self._lib = ffi, lib
        self._vm = None
        keep = []
        cfg = cls._config(ffi, lib, keep, kernel=None, memory_mib=0, vcpus=0, initrd=None,
                          cmdline=None, balloon=balloon, balloon_deflate_on_oom=balloon_deflate_on_oom,
                          balloon_stats_interval_s=balloon_stats_interval_s, volumes=volumes,
                          vsock_uds_path=vsock_uds_path, vsock_guest_cid=vsock_guest_cid,
                          strict_unhandled_exits=False, mounts=())
        out = ffi.new("sm_vm **")
        err = ffi.new("char[512]")
        rc = lib.sm_vm_restore(os.fsencode(path), cfg, int(bool(start)), out, err, 512)
        if rc != 0:
            raise NativeCoreError(f"sm_vm_restore: {ffi.string(err).decode(errors='replace')}",
                                  _status_name(lib, rc))
        self._vm = out[0]
        self._cursor = ffi.new("uint64_t *")
        self._started_ns = time.monotonic_ns() if start else None
        self.vsock_uds_path = os.fspath(vsock_uds_path) if vsock_uds_path else None
        return self

    def snapshot(self, path: str | os.PathLike) -> None:
        """Write a snapshot (path/state.bin + sparse path/memory.bin; the directory is created).
        A running VM is paused for the copy and resumed after. Virtio devices are saved with
        it (transport, queues, balloon and disk state; vsock connections are not kept); a VM
        with a virtio-fs mount is refused with the reason and nothing is written."""
        self.raise_if_failed()
        self._check(self._lib.sm_vm_snapshot(self._handle(), os.fsencode(path)), "snapshot")

    # -- lifecycle ---------------------------------------------------------------------------
    def _handle(self):
        if self._vm is None:
            raise VmStoppedError("this native VM was destroyed")
        return self._vm

    def _check(self, rc: int, what: str) -> None:
        if rc >= 0:
            return
        buf = self._ffi.new("char[512]")
        self._lib.sm_vm_last_error(self._vm, buf, 512)
        status = _status_name(self._lib, rc)
        if status == "SM_ERR_VM_FAILED" or self.state == "failed":
            self.raise_if_failed()
        raise NativeCoreError(f"{what}: {self._ffi.string(buf).decode(errors='replace')} ({status})", status)

    def raise_if_failed(self) -> None:
        """Raise GuestFaultError if the VM ended because of the guest."""
        info = self.exit_info()
        if info["state"] == "failed":
            raise GuestFaultError(info)

    def start(self) -> None:
        self._started_ns = time.monotonic_ns()
        self._check(self._lib.sm_vm_start(self._handle()), "start")

    def pause(self) -> None:
        self.raise_if_failed()
        self._check(self._lib.sm_vm_pause(self._handle()), "pause")

    def resume(self) -> None:
        self.raise_if_failed()
        self._check(self._lib.sm_vm_resume(self._handle()), "resume")

    def stop(self) -> None:
        """End the VM (joins the vCPU threads). Safe to call on an ended VM."""
        if self._vm is not None:
            self._lib.sm_vm_stop(self._vm)

    def wait(self, timeout: float | None = None) -> str:
        """Wait until the VM ended; returns the state name, or the current one on timeout."""
        ms = -1 if timeout is None else int(timeout * 1000)
        self._lib.sm_vm_wait(self._handle(), ms)
        return self.state

    def close(self) -> None:
        """Destroy: joins every thread, closes every fd, unmaps guest memory."""
        if self._vm is not None:
            self._lib.sm_vm_destroy(self._vm)
            self._vm = None

    destroy = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- queries ---------------------------------------------------------------------------
    @property
    def state(self) -> str:
        s = self._lib.sm_vm_get_state(self._handle())
        return self._ffi.string(self._lib.sm_vm_state_name(s)).decode()

    def exit_info(self) -> dict:
        ffi, lib = self._ffi, self._lib
        info = ffi.new("sm_exit_info *")
        lib.sm_vm_exit_info(self._handle(), info)
        return {
            "state": ffi.string(lib.sm_vm_state_name(info.state)).decode(),
            "reason": ffi.string(lib.sm_exit_reason_name(info.reason)).decode(),
            "kvm_exit_reason": info.kvm_exit_reason,
            "kvm_suberror": info.kvm_suberror,
            "vcpu": info.vcpu,
            "rip": info.rip,
            "insn_bytes": bytes(info.insn_bytes[0:info.insn_len]),
            "message": ffi.string(info.message).decode(errors="replace"),
            "unhandled_io_count": info.unhandled_io_count,
            "unhandled_mmio_count": info.unhandled_mmio_count,
            "first_unhandled": ffi.string(info.first_unhandled).decode(errors="replace"),
        }

    def vcpu_regs(self, index: int = 0) -> dict:
        """Main registers of a vCPU (the VM must be paused, stopped or failed)."""
        r = self._ffi.new("sm_vcpu_regs *")
        self._check(self._lib.sm_vm_vcpu_regs(self._handle(), index, r), "vcpu_regs")
        return {f: getattr(r, f) for f in ("rip", "rsp", "rflags", "rax", "rbx", "rcx", "rdx",
                                           "rsi", "rdi", "cr0", "cr2", "cr3", "cr4", "efer",
                                           "cs_selector", "cs_long_mode")}

    @property
    def cmdline(self) -> str:
        buf = self._ffi.new("char[4096]")
        self._lib.sm_vm_cmdline(self._handle(), buf, 4096)
        return self._ffi.string(buf).decode()

    @property
    def virtio_cmdline_fragment(self) -> str:
        buf = self._ffi.new("char[1024]")
        self._lib.sm_vm_virtio_cmdline_fragment(self._handle(), buf, 1024)
        return self._ffi.string(buf).decode()

    # -- console ---------------------------------------------------------------------------
    def console_read(self) -> bytes:
        """Bytes the guest wrote since the previous console_read()."""
        ffi, lib = self._ffi, self._lib
        buf = ffi.new(f"uint8_t[{CONSOLE_CHUNK_BYTES}]")
        out = []
        while True:
            n = lib.sm_vm_console_read(self._handle(), buf, CONSOLE_CHUNK_BYTES, self._cursor, ffi.NULL)
            if not n:
                return b"".join(out)
            out.append(bytes(ffi.buffer(buf, n)))

    def console_output(self) -> bytes:
        """Everything still in the console ring (the last 1 MiB)."""
        ffi, lib = self._ffi, self._lib
        cursor = ffi.new("uint64_t *")
        buf = ffi.new(f"uint8_t[{CONSOLE_CHUNK_BYTES}]")
        out = []
        while True:
            n = lib.sm_vm_console_read(self._handle(), buf, CONSOLE_CHUNK_BYTES, cursor, ffi.NULL)
            if not n:
                return b"".join(out)
            out.append(bytes(ffi.buffer(buf, n)))

    def console_write(self, data: bytes) -> int:
        self.raise_if_failed()
        rc = self._lib.sm_vm_console_write(self._handle(), data, len(data))
        self._check(rc, "console_write")
        return rc

    def wait_for_console(self, needle: bytes, timeout: float) -> bytes:
        """Poll the console until needle appears (returns the whole output) or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.console_output()
            if needle in out:
                return out
            if time.monotonic() > deadline or self.state in ("stopped", "failed"):
                return out
            time.sleep(0.005)

    # -- balloon ---------------------------------------------------------------------------
    def balloon_set_target_pages(self, pages: int) -> None:
        self.raise_if_failed()
        self._check(self._lib.sm_vm_balloon_set_target_pages(self._handle(), int(pages)), "balloon target")

    def balloon_set_target_mib(self, mib: int) -> None:
        self.balloon_set_target_pages(int(mib) * MIB_TO_4K_PAGES)

    def balloon_stats(self) -> dict:
        """Firecracker's field names; fields the guest did not report are None."""
        s = self._ffi.new("sm_balloon_stats *")
        self._check(self._lib.sm_vm_balloon_stats(self._handle(), s), "balloon stats")
        out = {"target_pages": s.target_pages, "actual_pages": s.actual_pages,
               "target_mib": s.target_mib, "actual_mib": s.actual_mib,
               "stats_updates": s.stats_updates}
        for bit, field in enumerate(BALLOON_STAT_FIELDS):
            out[field] = getattr(s, field) if s.present & (1 << bit) else None
        return out

    def guest_resident_bytes(self) -> int:
        """Guest RAM resident in host memory (what the VM costs the host in RAM)."""
        return int(self._lib.sm_vm_guest_resident_bytes(self._handle()))

    # -- devices ---------------------------------------------------------------------------
    def devices(self) -> list[dict]:
        ffi, lib = self._ffi, self._lib
        out = []
        for i in range(lib.sm_vm_device_count(self._handle())):
            d = ffi.new("sm_device_info *")
            self._check(lib.sm_vm_device_info(self._vm, i, d), "device info")
            counters = {}
            for j in range(len(d.counters)):
                name = ffi.string(d.counter_names[j]).decode()
                if not name:
                    break
                counters[name] = d.counters[j]
            out.append({
                "name": ffi.string(d.name).decode(),
                "virtio_device_id": d.virtio_device_id,
                "mmio_base": d.mmio_base,
                "irq": d.irq,
                "broken": bool(d.broken),
                "broken_reason": ffi.string(d.broken_reason).decode(errors="replace"),
                "driver_status": d.driver_status,
                "counters": counters,
            })
        return out

    def device(self, name: str) -> dict:
        for d in self.devices():
            if d["name"] == name:
                return d
        raise KeyError(name)


def run_probe(name: str, *, timeout: float = 30.0, cmdline: str = "", **kwargs) -> tuple[NativeVm, bytes]:
    """Boot probe guest ``name`` and wait until it ends (or timeout); returns (vm, console).
    The caller closes the VM."""
    kwargs.setdefault("strict_unhandled_exits", True)
    vm = NativeVm(probe_path(name), cmdline=cmdline, **kwargs)
    vm.start()
    vm.wait(timeout)
    return vm, vm.console_output()


def first_uart_byte_seconds(probe: str = "uart", timeout: float = 30.0) -> float:
    """Wall time from sm_vm_create() to the first byte the guest writes to the UART
    (benchmarks: native vs QEMU with the same probe guest)."""
    t0 = time.perf_counter()
    vm = NativeVm(probe_path(probe), strict_unhandled_exits=True)
    try:
        vm.start()
        ffi, lib = _load()
        deadline = time.monotonic() + timeout
        while lib.sm_vm_console_total(vm._handle()) == 0:
            if time.monotonic() > deadline or vm.state in ("stopped", "failed"):
                raise NativeCoreError(f"no UART output from the {probe} probe")
            time.sleep(0.0002)
        return time.perf_counter() - t0
    finally:
        vm.close()


def calibrate(iterations: int = 100_000, timeout: float = 60.0) -> dict:
    """Run the calib probe's integer loop in a guest and the same loop on the host, both timed
    with the TSC. ratio = guest cycles / host cycles: ~1 where KVM runs guests at hardware
    speed, thousands where this "KVM" emulates instructions."""
    ffi, lib = _load()
    checksum = ffi.new("uint64_t *")
    host_cycles = min(lib.sm_calib_loop(iterations, checksum) for _ in range(3))
    vm = NativeVm(probe_path("calib"), cmdline=f"iterations={iterations}", strict_unhandled_exits=True)
    try:
        t0 = time.monotonic()
        vm.start()
        vm.wait(timeout)
        wall = time.monotonic() - t0
        out = vm.console_output().decode(errors="replace")
        vm.raise_if_failed()
    finally:
        vm.close()
    m = re.search(r"CALIB done iterations=(\d+) cycles=(\d+) checksum=0x([0-9a-f]+)", out)
    if not m:
        raise NativeCoreError(f"calib probe did not report within {timeout:.0f} s; console: {out[-500:]}")
    if int(m.group(3), 16) != checksum[0]:
        raise NativeCoreError("calib probe checksum differs from the host's: not the same loop")
    guest_cycles = int(m.group(2))
    ratio = guest_cycles / max(host_cycles, 1)
    return {"iterations": iterations, "host_cycles": host_cycles, "guest_cycles": guest_cycles,
            "ratio": ratio, "wall_seconds": wall,
            "speed": "hardware" if ratio < CALIB_HARDWARE_MAX_RATIO else "emulated"}


# -- engine ------------------------------------------------------------------------------------
def available() -> tuple[bool, str]:
    """Is the native engine usable here? (ok, why not)."""
    try:
        _load()
    except ImportError as exc:
        return False, f"native core not built ({exc})"
    ok, msg = kvm_check()
    if not ok:
        return False, msg
    return True, "native core built and /dev/kvm usable"


CONSOLE_POLL_S = 0.02
#: A refused CONNECT (the guest is not listening yet) costs the host one local socket, so
#: retry often: each wait is added to the time to a VM's first output.
AGENT_CONNECT_RETRY_S = 0.005
VSOCK_SOCKET_NAME = "sm-vsock-{name}.sock"
#: The files of the core's snapshot format (native/src/snapshot.h).
SNAPSHOT_STATE_FILE = "state.bin"
SNAPSHOT_MEMORY_FILE = "memory.bin"


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
        from .base import AGENT_VSOCK_PORT
        self.spec = spec
        self.reason = reason
        self._agent_port = AGENT_VSOCK_PORT
        mux_dir = Path(spec.config.vsock_mux_dir or os.environ.get("TMPDIR", "/tmp"))
        self.vsock_path = mux_dir / VSOCK_SOCKET_NAME.format(name=spec.name)
        self._pump_stop = False
        self._pump = None
        # The same device set for a boot and a restore: the core checks a restore's devices
        # against the snapshot's, and the guest already has drivers bound to these.
        devices = {"balloon": bool(spec.config.balloon), "balloon_deflate_on_oom": True,
                   "balloon_stats_interval_s": 1,
                   "volumes": [(v.path, v.spec.read_only, v.serial) for v in spec.volumes],
                   "vsock_uds_path": self.vsock_path, "vsock_guest_cid": 3}
        if restore_from is not None:
            self.vm = NativeVm.restore(restore_from, start=False, **devices)
            return
        kernel = spec.vmlinux if spec.vmlinux and Path(spec.vmlinux).exists() else spec.kernel
        cmdline = f"{spec.cmdline} sm.agent=vsock:{self._agent_port}"
        mounts = [(m.host_path, m.tag, m.read_only) for m in spec.config.mounts]
        self.vm = NativeVm(kernel, memory_mib=spec.memory_mib, vcpus=spec.vcpus,
                           initrd=spec.initrd, cmdline=cmdline, mounts=mounts, **devices)
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
    # The core writes state.bin (vCPUs, irqchip, clock, UART, virtio devices) and memory.bin
    # (guest RAM, sparse) while the guest is paused; ``finish`` flushes guest RAM to disk.
    mounts_not_snapshotted_because = ("the guest's FUSE node ids and open files name host "
                                      "file descriptors of the native core")

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
        from ..balloon import BalloonStats
        stats = self.vm.balloon_stats()
        stats.pop("stats_updates", None)
        return BalloonStats(**stats)

    def mount_status(self) -> list:
        """One MountStatus per mount, counted by the core's in-process FUSE server
        (device ``virtio-fs<i>`` for ``config.mounts[i]``)."""
        from ..mounts import MountCounters, MountStatus
        out = []
        for i, mount in enumerate(self.spec.config.mounts):
            counters = MountCounters()
            if self.vm._vm is not None:
                c = self.vm.device(f"virtio-fs{i}")["counters"]
                counters = MountCounters(ops=c["ops"], bytes_read=c["bytes_read"],
                                         bytes_written=c["bytes_written"])
            out.append(MountStatus(mount, dax=False, dax_note="no DAX window in the native core",
                                   counters=counters))
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
        from ..volumes import copy_sparse
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




# -- doctor -----------------------------------------------------------------------------------
DOCTOR_PROBES = ("uart", "balloon", "blk", "vsock", "bad_guest")


def _doctor_probe(name: str) -> str:
    """Run one probe as its test does, briefly; 'ok' or what went wrong."""
    import socket
    import tempfile
    with tempfile.TemporaryDirectory(prefix="smd-", dir="/tmp") as tmp:
        tmp_path = Path(tmp)
        kwargs: dict = {"strict_unhandled_exits": True}
        if name == "uart":
            vm = NativeVm(probe_path("uart"), **kwargs)
        elif name == "balloon":
            vm = NativeVm(probe_path("balloon"), balloon=True, balloon_stats_interval_s=1, **kwargs)
            vm.balloon_set_target_pages(16)
        elif name == "blk":
            disk = tmp_path / "disk.img"
            disk.write_bytes(b"\0" * 65536)
            vm = NativeVm(probe_path("blk"), volumes=[(disk, False)], **kwargs)
        elif name == "bad_guest":
            disk = tmp_path / "disk.img"
            disk.write_bytes(b"\0" * 65536)
            vm = NativeVm(probe_path("bad_guest"), balloon=True, volumes=[(disk, True)] * 8, **kwargs)
        else:  # vsock
            uds = str(tmp_path / "v.sock")
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(uds + "_5000")
            listener.listen(1)
            vm = NativeVm(probe_path("vsock"), vsock_uds_path=uds, **kwargs)
        try:
            vm.start()
            if name == "bad_guest":
                out = vm.wait_for_console(b"the host must stop the VM)\n", 30).decode(errors="replace")
                broken = [d for d in vm.devices() if d["broken"]]
                vm.stop()
                ok = "flagged 9" in out and len(broken) == 9 and vm.state == "stopped"
                return "ok" if ok else f"failed: {len(broken)} devices flagged; {out[-200:]}"
            if name == "vsock":
                vm.wait_for_console(b"listening on 1234\n", 30)
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(30)
                s.connect(uds)
                s.sendall(b"CONNECT 1234\nping\n")
                got = b""
                while b"PING\n" not in got:
                    chunk = s.recv(100)
                    if not chunk:
                        break
                    got += chunk
                s.close()
                listener.settimeout(30)
                conn, _ = listener.accept()
                while conn.recv(100):
                    pass
                conn.close()
                listener.close()
            vm.wait(30)
            out = vm.console_output().decode(errors="replace")
            if f"PROBE {name} OK" in out and vm.exit_info()["reason"] == "guest_reset":
                return "ok"
            return f"failed: {vm.exit_info()['message'] or out[-200:]}"
        except Exception as exc:  # noqa: BLE001 - the doctor reports
            return f"failed: {exc}"
        finally:
            vm.close()


def doctor(linux_early_boot: bool = True) -> dict:
    """The ``native`` section of ``python -m supermachine_jupyter doctor --json``, from real
    runs: KVM check, calibrated speed, every probe, and (optionally) the Linux early boot."""
    report: dict = {}
    ok, msg = kvm_check()
    report["kvm"] = "ok" if ok else msg
    if not ok:
        return report
    try:
        cal = calibrate()
        report["speed"] = cal["speed"]
        report["calibration_ratio"] = round(cal["ratio"], 1)
    except Exception as exc:  # noqa: BLE001
        report["speed"] = f"unknown ({exc})"
    report["probes"] = {name: _doctor_probe(name) for name in DOCTOR_PROBES}
    if linux_early_boot:
        report["linux_early_boot"] = _doctor_linux_early_boot(report.get("speed"))
    return report


def _doctor_linux_early_boot(speed) -> str:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "supermachine-jupyter"
    kernels = sorted(cache.glob("kernel-*/vmlinux"), key=lambda p: p.stat().st_mtime)
    if not kernels:
        return "not run: no guest kernel in the cache (build the assets)"
    vm = NativeVm(kernels[-1], memory_mib=128,
                  cmdline="console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1")
    try:
        vm.start()
        if speed == "hardware":
            out = vm.wait_for_console(b"Run /init", 120).decode(errors="replace")
            return "ok" if "Run /init" in out else "failed: kernel did not reach init"
        vm.wait(240)
        out = vm.console_output().decode(errors="replace")
        info = vm.exit_info()
        if ("Linux version" in out and f"Command line: {vm.cmdline}" in out
                and "BIOS-e820" in out and info["reason"] == "emulation_failure"):
            return "ok"
        return f"failed: {info['reason']}: {info['message'] or out[-200:]}"
    finally:
        vm.close()
