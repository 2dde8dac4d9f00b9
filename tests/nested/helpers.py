"""Helpers of the nested-KVM tests (they run inside L1)."""

from __future__ import annotations

import os
import threading
import time


def wait_for(predicate, timeout, interval=0.25):
    """Poll ``predicate`` until it returns something true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def threads_and_fds() -> tuple[set[int], set[str]]:
    """This process's thread idents and open fd numbers."""
    return {t.ident for t in threading.enumerate()}, set(os.listdir("/proc/self/fd"))


def new_since(before: tuple[set[int], set[str]]) -> dict:
    """Threads and fds of this process that were not there at ``before`` (named), or {}."""
    threads, fds = threads_and_fds()
    new = {"threads": [t.name for t in threading.enumerate() if t.ident in threads - before[0]],
           "fds": []}
    for fd in sorted(fds - before[1]):
        try:
            new["fds"].append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass        # the fd that listed /proc/self/fd
    return new if new["threads"] or new["fds"] else {}


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
