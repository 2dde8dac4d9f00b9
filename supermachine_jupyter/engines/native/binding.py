"""The cffi binding of the native KVM core: a thin Python layer over ``native/include/supermachine.h``.

Two levels:

* :class:`NativeVm` — one KVM VM of the core: create, start, pause/resume, stop, console ring,
  balloon, per-device counters and broken flags, the exit record. Used directly by the probe
  tests and the calibration.
* :func:`available` — whether the core is built and /dev/kvm usable here. The engine on top
  of :class:`NativeVm` is ``engine.py``; ``doctor.py`` checks the core with probe guests.

Guest faults (emulation failure, internal error, triple fault, unhandled I/O or MMIO in strict
mode) end the VM; the next call on it raises :class:`GuestFaultError` naming the exit, and the
console carries a ``[supermachine] VM failed …`` line.
"""

from __future__ import annotations

import importlib
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from ...errors import EngineError, VmStoppedError

#: Module the cffi build produces; SUPERMACHINE_NATIVE_MODULE=_native_asan selects the
#: sanitizer build (needs LD_PRELOAD of libasan).
NATIVE_MODULE_ENV = "SUPERMACHINE_NATIVE_MODULE"
#: SUPERMACHINE_NATIVE_QUEUE_NOTIFY_EXITS=1: VMs created without KVM ioeventfds unless told
#: otherwise (``queue_notify_exits``), so a benchmark can time the fallback path end to end.
QUEUE_NOTIFY_EXITS_ENV = "SUPERMACHINE_NATIVE_QUEUE_NOTIFY_EXITS"
PROBE_DIR = Path(__file__).resolve().parents[2] / "_probes"
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
                 mounts: Sequence[tuple] = (), queue_notify_exits: bool | None = None):
        ffi, lib = _load()
        self._ffi, self._lib = ffi, lib
        keep = []  # cffi char[] objects must outlive sm_vm_create
        cfg = self._config(ffi, lib, keep, kernel=kernel, memory_mib=memory_mib, vcpus=vcpus,
                           initrd=initrd, cmdline=cmdline, balloon=balloon,
                           balloon_deflate_on_oom=balloon_deflate_on_oom,
                           balloon_stats_interval_s=balloon_stats_interval_s, volumes=volumes,
                           vsock_uds_path=vsock_uds_path, vsock_guest_cid=vsock_guest_cid,
                           strict_unhandled_exits=strict_unhandled_exits, mounts=mounts,
                           queue_notify_exits=queue_notify_exits)
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
                vsock_guest_cid, strict_unhandled_exits, mounts, queue_notify_exits=None):
        """The sm_vm_config of a create or a restore (a restore ignores the boot fields). Its
        strings are appended to ``keep``, which must outlive the core call.
        ``queue_notify_exits``: no KVM ioeventfds, every virtio queue notify exits to the core's
        vCPU thread (the fallback; tests and benchmarks compare the two paths); None: as
        $SUPERMACHINE_NATIVE_QUEUE_NOTIFY_EXITS says (1: yes)."""
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
            # An OCI image's root disk is one of them: 8 volumes and an image are one too many.
            raise NativeCoreError(f"at most {lib.SM_MAX_BLK_DEVICES} block devices (volumes, and "
                                  f"an OCI image's root disk), {len(volumes)} given",
                                  "SM_ERR_INVALID_ARGUMENT")
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
        if queue_notify_exits is None:
            queue_notify_exits = os.environ.get(QUEUE_NOTIFY_EXITS_ENV) == "1"
        cfg.queue_notify_exits = int(bool(queue_notify_exits))
        return cfg

    @classmethod
    def restore(cls, path: str | os.PathLike, *, start: bool = True, balloon: bool = False,
                balloon_deflate_on_oom: bool = False, balloon_stats_interval_s: int = 0,
                volumes: Sequence[tuple] = (), vsock_uds_path: str | os.PathLike | None = None,
                vsock_guest_cid: int = 3, mounts: Sequence[tuple] = (),
                queue_notify_exits: bool | None = None) -> NativeVm:
        """A VM from a snapshot directory written by :meth:`snapshot`. Guest RAM is a
        copy-on-write mapping of its memory.bin, so VMs restored from one snapshot share the
        unmodified pages. ``start=False`` leaves it created; :meth:`start` runs it.

        The device keywords mean what they mean for ``NativeVm(...)`` and give the host side of
        the snapshot's devices: the same devices in the same order, the same balloon flags,
        volumes of the same size, read-only flag and serial (each restore its own copy of the
        file), a vsock socket path of its own, mounts with the same tags and read-only flags
        (any host directory: the guest's node ids and open files are found again by their
        paths beneath it; one whose file is gone answers ESTALE). A restored vsock has no
        connections and tells the guest so with a transport reset event. A different device
        list, or a damaged, truncated or other-version snapshot raises NativeCoreError saying
        "snapshot" and why."""
        ffi, lib = _load()
        self = cls.__new__(cls)
        self._ffi, self._lib = ffi, lib
        self._vm = None
        keep = []
        cfg = cls._config(ffi, lib, keep, kernel=None, memory_mib=0, vcpus=0, initrd=None,
                          cmdline=None, balloon=balloon, balloon_deflate_on_oom=balloon_deflate_on_oom,
                          balloon_stats_interval_s=balloon_stats_interval_s, volumes=volumes,
                          vsock_uds_path=vsock_uds_path, vsock_guest_cid=vsock_guest_cid,
                          strict_unhandled_exits=False, mounts=mounts,
                          queue_notify_exits=queue_notify_exits)
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
        it (transport, queues, balloon and disk state, each virtio-fs share's FUSE session as
        paths beneath the share; vsock connections are not kept)."""
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


def calibrate(iterations: int = 12_500, rounds: int = 8, gap_ms: int = 2,
              timeout: float = 60.0) -> dict:
    """Run the calib probe's integer loop in a guest and the same loop on the host, both timed
    with the TSC, ``rounds`` times each, ``gap_ms`` apart. ratio = the guest's fastest round /
    the host's fastest run: ~1 where KVM runs guests at hardware speed (also nested under QEMU
    TCG), thousands where this "KVM" emulates instructions.

    The fastest, spread out: under QEMU TCG (the nested tier's L1) the loop runs now and then,
    on either side, ~3-4x slower than its best for a stretch (always in a VM's first round);
    one timed run, or rounds back to back inside such a stretch, put the ratio on the 3x
    threshold. Interrupts and a busy host only ever add cycles."""
    ffi, lib = _load()
    checksum = ffi.new("uint64_t *")
    host_runs = []
    for _ in range(rounds):
        host_runs.append(lib.sm_calib_loop(iterations, checksum))
        time.sleep(gap_ms / 1000)
    host_cycles = min(host_runs)
    vm = NativeVm(probe_path("calib"), cmdline=f"iterations={iterations} rounds={rounds} gap_ms={gap_ms}",
                  strict_unhandled_exits=True)
    try:
        t0 = time.monotonic()
        vm.start()
        vm.wait(timeout)
        wall = time.monotonic() - t0
        out = vm.console_output().decode(errors="replace")
        vm.raise_if_failed()
    finally:
        vm.close()
    m = re.search(r"CALIB done iterations=(\d+) rounds=(\d+) cycles=(\d+) checksum=0x([0-9a-f]+)",
                  out)
    if not m:
        raise NativeCoreError(f"calib probe did not report within {timeout:.0f} s; console: {out[-500:]}")
    if int(m.group(4), 16) != checksum[0]:
        raise NativeCoreError("calib probe checksum differs from the host's: not the same loop")
    if int(m.group(1)) != iterations or int(m.group(2)) != rounds:
        raise NativeCoreError(f"calib probe ran {m.group(2)} rounds of {m.group(1)} iterations, "
                              f"asked for {rounds} of {iterations}")
    guest_runs = [int(c) for c in re.findall(r"CALIB round=\d+ cycles=(\d+)", out)]
    guest_cycles = int(m.group(3))
    if len(guest_runs) != rounds or min(guest_runs) != guest_cycles:
        raise NativeCoreError(f"calib probe's rounds {guest_runs} do not match its minimum "
                              f"{guest_cycles}")
    ratio = guest_cycles / max(host_cycles, 1)
    return {"iterations": iterations, "rounds": rounds, "host_cycles": host_cycles,
            "guest_cycles": guest_cycles, "host_runs": host_runs, "guest_runs": guest_runs,
            "ratio": ratio, "wall_seconds": wall,
            "speed": "hardware" if ratio < CALIB_HARDWARE_MAX_RATIO else "emulated"}


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
