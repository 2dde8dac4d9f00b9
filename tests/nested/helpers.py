"""Helpers of the nested-KVM tests (they run inside L1)."""

from __future__ import annotations

import os
import threading

from tests.helpers import wait_for  # noqa: F401  (the nested tests take it from here too)


def threads_and_fds() -> tuple[set[int], set[str], set[str]]:
    """This process's Python thread idents, open fd numbers and OS thread ids (the native
    core's vCPU and device threads are not Python threads)."""
    return ({t.ident for t in threading.enumerate()}, set(os.listdir("/proc/self/fd")),
            set(os.listdir("/proc/self/task")))


def _os_thread_name(tid: str) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm") as comm:
            return f"{tid}:{comm.read().strip()}"
    except OSError:
        return f"{tid}:(gone)"


def new_since(before: tuple[set[int], set[str], set[str]]) -> dict:
    """Threads (Python and OS) and fds of this process that were not there at ``before``
    (named), or {}."""
    threads, fds, tasks = threads_and_fds()
    new = {"threads": [t.name for t in threading.enumerate() if t.ident in threads - before[0]],
           "os_threads": [_os_thread_name(tid) for tid in sorted(tasks - before[2])],
           "fds": []}
    for fd in sorted(fds - before[1]):
        try:
            new["fds"].append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass        # the fd that listed /proc/self/fd
    return new if new["threads"] or new["os_threads"] or new["fds"] else {}


def large_mappings(min_bytes: int) -> set[str]:
    """This process's memory mappings of at least ``min_bytes`` (guest RAM of a VM run by the
    native core is one such mapping), as their /proc/self/maps address ranges."""
    found = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            span = line.split()[0]
            start, end = (int(x, 16) for x in span.split("-"))
            if end - start >= min_bytes:
                found.add(span)
    return found


def entries(directory: str) -> set[str]:
    """Names in ``directory`` (the VMs' socket folder, ``$TMPDIR``)."""
    return set(os.listdir(directory))


#: Boots of the native core that ended in a guest triple fault and were retried (issue H: about
#: one native Linux boot in 40 triple-faulted in L1 right after the i8042 probe failed, cause not
#: known: the core, or L1's emulated SVM). Since the core emulates the i8042 and the RTC, 53
#: boots in L1 reached /init with none (as did 40 of the old core in a run meant to compare);
#: the retry stays as a guard. Printed by every test that needed a retry.
BOOT_TRIPLE_FAULTS: list[str] = []


def start_native(image, config, **kwargs):
    """``image.start(config, **kwargs)``, booted again once if the guest triple-faulted while
    booting (see BOOT_TRIPLE_FAULTS); a second triple fault fails the test as before."""
    from supermachine_jupyter.errors import VmError
    try:
        return image.start(config, **kwargs)
    except VmError as exc:
        if "triple_fault" not in str(exc):
            raise
        BOOT_TRIPLE_FAULTS.append(str(exc).splitlines()[0])
        print(f"RETRIED a native boot that triple-faulted (issue H): {BOOT_TRIPLE_FAULTS[-1]}")
        return image.start(config, **kwargs)
