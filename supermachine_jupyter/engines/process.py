"""Child processes that never outlive their owner.

Engine processes (QEMU, virtiofsd) run in a session of their own, so the signals a terminal
or Jupyter sends to the owner's whole process group (an "interrupt kernel" is SIGINT to the
kernel's group) never reach them; ``PR_SET_PDEATHSIG(SIGKILL)`` still makes the kernel kill
them when their parent dies, even by SIGKILL. The death signal follows the *thread* that forked,
not the process, so every spawn happens on one long-lived daemon thread: a VM started from a
short-lived worker thread (a widget callback, a thread pool) keeps running after it.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import threading
from concurrent.futures import Future
from typing import Any

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent(parent_pid: int) -> None:
    # Runs in the child between fork and exec.
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)
    if os.getppid() != parent_pid:   # the parent died before prctl took effect
        os._exit(127)


class _Spawner:
    def __init__(self) -> None:
        self._requests: "queue.Queue[tuple[Future, tuple, dict]]" = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def _run(self) -> None:
        while True:
            future, args, kwargs = self._requests.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(subprocess.Popen(*args, **kwargs))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)

    def popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen:
        with self._lock:
            # A forked Python (multiprocessing) needs its own spawner thread.
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._requests = queue.Queue()
                self._thread = threading.Thread(target=self._run, name="supermachine-spawner",
                                                daemon=True)
                self._thread.start()
        parent = os.getpid()
        kwargs["start_new_session"] = True    # out of the owner's process group (setsid)
        # child_setup: a caller's own step between fork and exec (after the death signal),
        # e.g. a seccomp filter; an exception in it makes Popen raise in the parent.
        setup = kwargs.pop("child_setup", None)
        kwargs["preexec_fn"] = lambda: (_die_with_parent(parent), setup and setup())
        future: Future = Future()
        self._requests.put((future, args, kwargs))
        return future.result()


_spawner = _Spawner()


def spawn_owned(*args: Any, **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` whose child runs in its own session (signals sent to this
    process's group do not reach it) and is killed when this process dies."""
    return _spawner.popen(*args, **kwargs)


def terminate(proc: subprocess.Popen, grace: float = 2.0) -> int:
    """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def resident_bytes(pids: list[int]) -> int | None:
    """The summed resident set (VmRSS) of ``pids``, in bytes; None when none could be read
    (all ended)."""
    total, seen = 0, False
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        seen = True
                        break
        except (OSError, ValueError):
            pass          # ended between listing and reading
    return total if seen else None
