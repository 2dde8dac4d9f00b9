"""The guest's serial console as the host sees it: a bounded, thread-safe text buffer.

Engines append what the guest prints; readers take everything (``text()``) or follow it
from a cursor (``read_since``), and listeners get each chunk as it arrives (console widgets).
"""

from __future__ import annotations

import threading
from typing import Callable

DEFAULT_CONSOLE_LIMIT_BYTES = 1024 * 1024


class ConsoleBuffer:
    """Keeps the last ``limit`` bytes the guest wrote to its console."""

    def __init__(self, limit: int = DEFAULT_CONSOLE_LIMIT_BYTES):
        self._limit = limit
        self._data = bytearray()
        self._dropped = 0          # bytes that fell off the front
        self._cond = threading.Condition()
        self._listeners: list[Callable[[str], None]] = []

    def __repr__(self) -> str:
        return f"<ConsoleBuffer {self.total_bytes} bytes written, {len(self._data)} kept>"

    @property
    def total_bytes(self) -> int:
        return self._dropped + len(self._data)

    def append(self, chunk: bytes) -> None:
        with self._cond:
            self._data += chunk
            excess = len(self._data) - self._limit
            if excess > 0:
                del self._data[:excess]
                self._dropped += excess
            self._cond.notify_all()
            listeners = list(self._listeners)
        text = chunk.decode(errors="replace")
        for listener in listeners:
            try:
                listener(text)
            except Exception:  # a broken view must not stop the console
                pass

    def text(self) -> str:
        with self._cond:
            return self._data.decode(errors="replace")

    def read_since(self, cursor: int) -> tuple[str, int]:
        """Text written after ``cursor`` (a previous ``total_bytes``) and the new cursor."""
        with self._cond:
            start = max(0, cursor - self._dropped)
            return self._data[start:].decode(errors="replace"), self.total_bytes

    def wait_for(self, needle: str, timeout: float, stop: Callable[[], bool] = lambda: False) -> bool:
        """Block until ``needle`` appears (True), the timeout passes or ``stop()`` (False)."""
        encoded = needle.encode()
        with self._cond:
            return self._cond.wait_for(lambda: encoded in self._data or stop(), timeout) \
                and encoded in self._data

    def subscribe(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call ``listener(text)`` for every new chunk; returns the unsubscribe function."""
        with self._cond:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._cond:
                if listener in self._listeners:
                    self._listeners.remove(listener)
        return unsubscribe

    def wake(self) -> None:
        """Wake waiters so they re-check their stop condition (engine died)."""
        with self._cond:
            self._cond.notify_all()
