"""A small synchronous QMP client (QEMU Machine Protocol over a unix socket).

We do not use the ``qemu.qmp`` package: it is asyncio-based, and its synchronous wrapper runs
its own event loop, which fails inside a Jupyter kernel whose loop is already running. QMP
needs little: greeting, ``qmp_capabilities``, then one JSON command and reply at a time
(events interleave and are kept aside).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

from ...errors import EngineError


class QmpError(EngineError):
    """QEMU answered a QMP command with an error."""


class QmpClient:
    def __init__(self, path: str, timeout: float = 10.0):
        self._path = path
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(path)
        self._file = self._sock.makefile("rb")
        self.events: list[dict] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise EngineError(f"unexpected QMP greeting from {path}: {greeting}")
        self.version = greeting["QMP"].get("version", {}).get("qemu", {})
        self.execute("qmp_capabilities")

    def __repr__(self) -> str:
        return f"<QmpClient {self._path}>"

    def _read(self) -> dict:
        line = self._file.readline()
        if not line:
            raise EngineError("QEMU closed the QMP connection")
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command; returns its ``return`` value, raises QmpError on ``error``."""
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        with self._lock:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
            while True:
                reply = self._read()
                if "event" in reply:
                    self.events.append(reply)
                    del self.events[:-100]
                    continue
                if "error" in reply:
                    err = reply["error"]
                    raise QmpError(f"QMP {command}: {err.get('class')}: {err.get('desc')}")
                return reply.get("return")

    def close(self) -> None:
        try:
            self._file.close()
            self._sock.close()
        except OSError:
            pass


def connect_when_ready(path: str, deadline: float, alive: "callable") -> QmpClient:
    """Connect once QEMU has created its QMP socket; fail fast if QEMU died."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not alive():
            raise EngineError("QEMU exited before its QMP socket was ready")
        try:
            return QmpClient(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            last = exc
            time.sleep(0.01)
    raise EngineError(f"QMP socket {path} not ready in time: {last}")
