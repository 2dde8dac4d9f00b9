"""Engines behind one interface (``base.EngineInstance``), and how ``engine="auto"`` chooses.

* ``native``: the project's own KVM core (C, cffi) — only where KVM runs at hardware speed
  and the core is built.
* ``qemu``: QEMU with KVM where KVM runs at hardware speed, else TCG (software emulation).
"""

from __future__ import annotations

import dataclasses

from ..config import ENGINES
from ..errors import EngineError

#: The one list of engine names (VmConfig.engine validates against it too).
ENGINE_NAMES = ENGINES


@dataclasses.dataclass(frozen=True)
class EngineChoice:
    name: str       # "qemu" | "native"
    accel: str      # "kvm" | "tcg"
    reason: str

    def describe(self) -> str:
        return f"{self.name}/{self.accel}: {self.reason}"


def native_available() -> tuple[bool, str]:
    try:
        from . import native  # noqa: F401
    except ImportError as exc:
        return False, f"native core not importable ({exc})"
    return native.available()


def choose_engine(requested: str = "auto", config=None) -> EngineChoice:
    """Pick the engine and accelerator for a VM, with the reason shown to users. With a
    ``config``, an engine that cannot take it (the native core's device limits) is refused
    when asked for by name, naming the limit, and passed over by ``auto``."""
    from .accel import kvm_status
    if requested not in ENGINE_NAMES:
        raise EngineError(f"unknown engine {requested!r}: choose one of {', '.join(ENGINE_NAMES)}")
    kvm = kvm_status()
    if requested == "native":
        ok, why = native_available()
        if not ok:
            raise EngineError(f"engine='native' is not available here: {why}; "
                              "use engine='qemu' (or 'auto')")
        limit = get("native").config_problem(config) if config is not None else None
        if limit:
            raise EngineError(f"engine='native' cannot run this VM: {limit}; "
                              "use engine='qemu' (or 'auto')")
        note = "" if kvm.hardware else f" (warning: KVM is {kvm.speed} here)"
        return EngineChoice("native", "kvm", "requested" + note)
    if requested == "auto":
        ok, why = native_available()
        limit = get("native").config_problem(config) if ok and config is not None else None
        if kvm.hardware and ok and not limit:
            return EngineChoice("native", "kvm", "auto: KVM runs at hardware speed")
        if kvm.hardware and limit:
            why = f"the native core {limit}"
        auto_why = f"auto: KVM is {kvm.speed} here" if not kvm.hardware else f"auto: {why}"
    else:
        auto_why = "requested" if kvm.hardware else f"requested; KVM is {kvm.speed} here"
    from .qemu.engine import qemu_binary
    if qemu_binary() is None:
        raise EngineError(no_engine_message(kvm, native_available()))
    if kvm.hardware:
        return EngineChoice("qemu", "kvm", f"{auto_why}; KVM at hardware speed")
    return EngineChoice("qemu", "tcg", f"{auto_why}, so TCG (software emulation)")


#: What to install for QEMU, named the way users search for it.
QEMU_INSTALL_HINT = ("install QEMU: `sudo apt-get install qemu-system-x86` (Debian, Ubuntu) or "
                     "`sudo dnf install qemu-system-x86` (Fedora)")


def no_engine_message(kvm, native: tuple[bool, str]) -> str:
    """One message for a machine where no engine can run a VM (QEMU is missing and the
    native core cannot run), saying what to install or which group to join."""
    if kvm.speed == "unusable":
        native_part = ("the native core needs /dev/kvm, which you cannot read and write: join "
                       "the kvm group (`sudo usermod -aG kvm $USER`, then log in again); or ")
    elif kvm.speed == "absent":
        native_part = ("the native core needs /dev/kvm, which this machine lacks (enable "
                       "virtualization in the firmware or the VM's settings, and load kvm_intel "
                       "or kvm_amd); or ")
    elif not native[0]:
        native_part = f"the native core cannot run ({native[1]}); "
    else:
        native_part = f"the native core needs KVM at hardware speed, and here it is {kvm.speed}; "
    return f"no engine can run a VM here: QEMU is not installed, and {native_part}{QEMU_INSTALL_HINT}"


def get(name: str):
    """The :class:`~.base.Engine` called ``name`` (``"qemu"`` or ``"native"``)."""
    if name == "qemu":
        from .qemu.engine import ENGINE
    elif name == "native":
        from .native import ENGINE
    else:
        raise EngineError(f"unknown engine {name!r}: choose one of "
                          f"{', '.join(n for n in ENGINE_NAMES if n != 'auto')}")
    return ENGINE


def start_engine(choice: EngineChoice, spec):
    """Boot ``spec`` on the chosen engine and accelerator."""
    return get(choice.name).boot(spec, choice.accel, choice.reason)
