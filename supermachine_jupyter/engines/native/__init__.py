"""The native engine: the project's own KVM core in C (``native/``), bound with cffi.

- ``binding`` — :class:`NativeVm`, one VM of the core (create, start, pause, snapshot, console
  ring, balloon, device counters, exit record), and the probe-guest helpers;
- ``engine`` — :class:`NativeInstance` and :class:`NativeEngine` behind the engine interface;
- ``doctor`` — what the core can do on this machine, checked with probe guests.
"""

from .binding import (
                                                          BALLOON_STAT_FIELDS,
                                                          CALIB_HARDWARE_MAX_RATIO,
                                                          GuestFaultError,
                                                          NativeCoreError,
                                                          NativeVm,
                                                          available,
                                                          calibrate,
                                                          first_uart_byte_seconds,
                                                          kvm_check,
                                                          library,
                                                          probe_path,
                                                          run_probe,
                                                          version,
)
from .doctor import doctor
from .engine import ENGINE, NativeEngine, NativeInstance

__all__ = ["BALLOON_STAT_FIELDS", "CALIB_HARDWARE_MAX_RATIO", "ENGINE", "GuestFaultError",
           "NativeCoreError", "NativeEngine", "NativeInstance", "NativeVm", "available",
           "calibrate", "doctor", "first_uart_byte_seconds", "kvm_check", "library",
           "probe_path", "run_probe", "version"]
