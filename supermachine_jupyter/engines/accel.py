"""Can /dev/kvm run guests at hardware speed here, or is it absent or emulated?

Some machines expose a /dev/kvm that is itself emulated (nested KVM without VMX/SVM, e.g.
the ``kvm_pvm`` module): tiny guests run, but Linux guests fail or crawl, so QEMU must use
TCG there. We decide by calibration, not by flags: boot the real guest under ``-accel kvm``
with a short deadline. A hardware-speed KVM reaches the guest's init in well under a second;
an emulated one does not. With the native core built, the calibration is finer and faster
(~1 s): its ``calib`` probe runs a fixed integer loop a few times in a KVM guest, timed against
the same loop on the host, fastest run against fastest run: ~1x at hardware speed (nested under
QEMU TCG too), thousands where KVM is emulated. The verdict is cached per host boot
(``/proc/sys/kernel/random/boot_id``) because it cannot change before the next reboot.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

KVM_DEVICE = Path("/dev/kvm")
CALIBRATION_DEADLINE_S = 8.0
CALIBRATION_VERSION = 4  # 4: fastest of 8 spread-out rounds, guest and host


@dataclasses.dataclass(frozen=True)
class KvmStatus:
    """``speed``: "hardware", "emulated", "absent" or "unusable"; ``reason`` says why."""
    speed: str
    reason: str
    seconds_to_init: float | None = None
    hints: tuple[str, ...] = ()

    @property
    def hardware(self) -> bool:
        return self.speed == "hardware"

    def summary(self) -> str:
        """One line for doctor and panels: verdict, reason and the hints behind it."""
        hints = f" [{'; '.join(self.hints)}]" if self.hints else ""
        return f"{self.speed}: {self.reason}{hints}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _hints() -> tuple[str, ...]:
    hints = []
    flags = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    words = set(flags.split())
    if not words & {"vmx", "svm"}:
        hints.append("CPU shows no vmx/svm flag")
    if "hypervisor" in words:
        hints.append("host is itself a VM (hypervisor flag)")
    if Path("/sys/module/kvm_pvm").exists():
        hints.append("kvm_pvm module loaded (KVM emulated in software)")
    return tuple(hints)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _cache_path() -> Path:
    from ..guest.assets import cache_dir
    return cache_dir() / "kvm-calibration.json"


def kvm_status(refresh: bool = False) -> KvmStatus:
    """The cached verdict for this boot, calibrating first when there is none."""
    if not KVM_DEVICE.exists():
        return KvmStatus("absent", "/dev/kvm does not exist", hints=_hints())
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return KvmStatus("unusable", f"no read/write access to {KVM_DEVICE} "
                         "(add yourself to the kvm group)", hints=_hints())
    cache = _cache_path()
    key = {"boot_id": _boot_id(), "version": CALIBRATION_VERSION}
    if not refresh and cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                s = data["status"]
                return KvmStatus(s["speed"], s["reason"], s["seconds_to_init"], tuple(s["hints"]))
        except (ValueError, KeyError, TypeError):
            pass
    status = _calibrate()
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"key": key, "status": status.to_dict()}))
        os.replace(tmp, cache)
    except OSError:
        pass    # a read-only cache (shared, pre-filled): calibrate again next time
    return status


def _calibrate() -> KvmStatus:
    """Time the native core's calib probe against the host; without the core, boot the
    default guest under QEMU with ``-accel kvm`` and time it to init."""
    hints = _hints()
    try:
        from . import native
        result = native.calibrate()
    except ImportError:
        return _calibrate_with_qemu(hints)
    except Exception as exc:  # noqa: BLE001 - a probe that cannot run is a verdict too
        return KvmStatus("emulated", f"the calibration probe failed under KVM: {exc}",
                         hints=hints)
    speed, ratio = result["speed"], result["ratio"]
    shown = f"{ratio:.1f}" if ratio < 10 else f"{ratio:.0f}"
    return KvmStatus(speed, f"an integer loop took {shown}x the host's cycles in a KVM guest "
                     f"(fastest of {result['rounds']} runs each; hardware speed: under "
                     f"{native.CALIB_HARDWARE_MAX_RATIO}x)", None, hints)


def _calibrate_with_qemu(hints: tuple[str, ...]) -> KvmStatus:
    from ..guest.assets import find_assets
    from . import qemu

    assets = find_assets()
    if assets is None or qemu.qemu_binary() is None:
        # Without a guest we cannot measure; do not bet a user's VM on an unmeasured KVM.
        return KvmStatus("emulated", "not calibrated yet (guest assets or QEMU missing); "
                         "treating KVM as emulated", hints=hints)
    started = time.monotonic()
    reached = qemu.boots_to_init_with_kvm(assets, CALIBRATION_DEADLINE_S)
    seconds = time.monotonic() - started
    if reached:
        return KvmStatus("hardware", f"guest reached init under KVM in {seconds:.2f} s",
                         seconds, hints)
    return KvmStatus("emulated", f"the guest did not reach init under KVM within "
                     f"{CALIBRATION_DEADLINE_S:.0f} s", None, hints)
