"""``process.py`` with real child processes: ``terminate`` escalates to SIGKILL for a child
that ignores SIGTERM, and children of ``spawn_owned`` die with their owner (even when the
owner is SIGKILLed, and even when the thread that asked for the child has ended)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

from supermachine_jupyter.engines.process import spawn_owned, terminate

# A child that ignores SIGTERM (the disposition is set before it says "ready", and exec'd
# Python is the process itself: no shell in between that could die in its place).
STUBBORN = ("import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
POLITE = "import time\nprint('ready', flush=True)\ntime.sleep(60)\n"


def _start(code: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    return proc


def _terminate_in_thread(proc: subprocess.Popen, grace: float, limit: float):
    """Run ``terminate`` in a thread so a broken one (waiting forever) fails the test
    after ``limit`` seconds instead of hanging it. Returns (status, seconds)."""
    result: dict = {}

    def run() -> None:
        t0 = time.monotonic()
        result["status"] = terminate(proc, grace)
        result["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"terminate(grace={grace}) did not return within {limit} s"
    return result["status"], result["seconds"]


def test_terminate_kills_a_child_that_ignores_sigterm_after_the_grace():
    proc = _start(STUBBORN)
    try:
        status, seconds = _terminate_in_thread(proc, grace=0.5, limit=3.0)
        assert status == -signal.SIGKILL, f"exit status {status}"
        assert 0.5 <= seconds < 2.5, f"took {seconds:.2f} s"
    finally:
        proc.kill()
        proc.wait()


def test_terminate_uses_sigterm_first_and_does_not_wait_the_grace():
    proc = _start(POLITE)
    try:
        status, seconds = _terminate_in_thread(proc, grace=5.0, limit=8.0)
        assert status == -signal.SIGTERM, f"exit status {status}"
        assert seconds < 2.0, f"took {seconds:.2f} s for a child that ends on SIGTERM"
    finally:
        proc.kill()
        proc.wait()


def test_terminate_of_an_ended_child_returns_its_status():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    assert terminate(proc, grace=0.1) == 3


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in ticks) of ``pid``, None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        return None
    return fields[0].decode(), int(fields[19])       # fields 3 (state) and 22 (starttime)


def _running(pid: int, start: int) -> bool:
    """True while ``pid`` is still the same process and not a zombie (pid 1 of a container
    may never reap it)."""
    stat = _stat(pid)
    return stat is not None and stat[1] == start and stat[0] not in ("Z", "X")


OWNER = textwrap.dedent("""
    import sys, threading, time
    from supermachine_jupyter.engines.process import spawn_owned
    procs = []
    # Asked for from a short-lived thread: the child must outlive the thread, not the owner.
    t = threading.Thread(target=lambda: procs.append(spawn_owned(
        [sys.executable, "-c", "import time; time.sleep(60)"])))
    t.start(); t.join()
    print(procs[0].pid, flush=True)
    time.sleep(60)
""")


def test_spawn_owned_children_die_with_their_owner_even_by_sigkill():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        child = int(owner.stdout.readline())
        stat = _stat(child)
        assert stat is not None, "the owned child is not running"
        start = stat[1]
        time.sleep(0.5)      # the spawning thread has ended: the child keeps running
        assert _running(child, start), "the child died with the thread that asked for it"
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=5)
        deadline = time.monotonic() + 3
        while _running(child, start) and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = _running(child, start)
        if alive:
            os.kill(child, signal.SIGKILL)
        assert not alive, "the owned child outlived its SIGKILLed owner"
    finally:
        owner.kill()
        owner.wait()


def test_spawn_owned_is_a_popen_of_the_caller():
    proc = spawn_owned([sys.executable, "-c", "import sys; print(sys.stdin.read().upper())"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate("hello", timeout=10)
    assert (out, proc.returncode) == ("HELLO\n", 0)
