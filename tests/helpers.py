"""Helpers shared by tests: waiting for a condition, finding engine processes on this host."""

import os
import time


def engine_pids(marker: str = "qemu-system", parent: int | None = None) -> list[int]:
    """Pids of live engine processes (QEMU); with ``parent``, only that process's children
    (other test runs on the machine start VMs too)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[0:2]
        except OSError:
            continue
        if parent is not None and int(ppid) != parent:
            continue
        if marker.encode() in cmd.split(b"\0")[0] and state != "Z":
            pids.append(int(entry))
    return pids


def accept_one_connection(path: str, timeout: float):
    """Listen on the unix socket ``path`` (a vsock guest's connection to a host port arrives
    at ``<uds>_<port>``) and read one connection to its end in a thread. Returns (thread,
    received): after ``thread.join()``, ``received["data"]`` holds the bytes."""
    import socket
    import threading
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(timeout)
    received: dict = {}

    def accept() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(timeout)
                data = b""
                while chunk := conn.recv(4096):
                    data += chunk
                received["data"] = data

    thread = threading.Thread(target=accept, name=f"accept-{path}", daemon=True)
    thread.start()
    return thread, received


def wait_for(predicate, timeout: float, interval: float = 0.1):
    """Poll ``predicate`` until it returns something true (returned) or ``timeout`` seconds
    pass; then its last value, so ``assert wait_for(...)`` shows what it saw."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)

