"""``doctor``: what the native core can do on this machine, checked with probe guests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from .binding import NativeVm, calibrate, kvm_check, probe_path

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


def _no_step(what: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def doctor(linux_early_boot: bool = True,
           step: Callable[[str], contextlib.AbstractContextManager] = _no_step) -> dict:
    """The ``native`` section of ``python -m supermachine_jupyter doctor --json``, from real
    runs: KVM check, calibrated speed, every probe, and (optionally) the Linux early boot.
    ``step(what)`` wraps each check (the CLI announces them as they run)."""
    report: dict = {}
    with step("native core: KVM check"):
        ok, msg = kvm_check()
    report["kvm"] = "ok" if ok else msg
    if not ok:
        return report
    try:
        with step("native core: calibration (an integer loop in a guest vs the host)"):
            cal = calibrate()
        report["speed"] = cal["speed"]
        report["calibration_ratio"] = round(cal["ratio"], 1)
    except Exception as exc:  # noqa: BLE001
        report["speed"] = f"unknown ({exc})"
    report["probes"] = {}
    for name in DOCTOR_PROBES:
        with step(f"native core: probe guest {name}"):
            report["probes"][name] = _doctor_probe(name)
    if linux_early_boot:
        with step("native core: Linux early boot (minutes where KVM is emulated)"):
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
