"""``ConsoleView``: a VM's serial console, live, in the notebook.

Read-only: the guest's console is an output here. Under QEMU the serial port's input is not
wired to anything the host writes (commands go through the agent: ``%%vm`` or ``vm.run``),
so the view has no input box.
"""

from __future__ import annotations

import threading
from html import escape
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from .format import note_html
from .sampler import close_tree

if TYPE_CHECKING:
    from ..vm import Vm

#: How much console text the view keeps (the VM's own buffer keeps 1 MiB).
DEFAULT_LIMIT_CHARS = 64 * 1024
#: At most this many widget updates per second, however fast the guest prints.
DEFAULT_MAX_RATE_HZ = 4.0


class ConsoleView(widgets.VBox):
    """The last ~64 KiB of ``vm``'s serial console, following it live.

    New console output wakes a daemon thread (through ``vm.console.subscribe``) that reads
    what is new since its cursor (``vm.console.read_since``: nothing is lost or shown twice)
    and updates the view at most ``max_rate_hz`` times a second. The box is scrolled to the
    newest line by CSS (``flex-direction: column-reverse``), with no JavaScript. The thread
    ends when the VM stops (after a last update) or on ``close()``. No input: see the module
    docstring.
    """

    def __init__(self, vm: Vm, *, limit_chars: int = DEFAULT_LIMIT_CHARS,
                 max_rate_hz: float = DEFAULT_MAX_RATE_HZ, height: str = "320px",
                 **kwargs: Any):
        self.vm = vm
        self.limit_chars = limit_chars
        self._min_gap_s = 1.0 / max_rate_hz
        self._height = height
        self._text = ""
        self._cursor = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self.output = widgets.HTML()
        self.status = widgets.HTML()
        super().__init__(children=[self.output, self.status], **kwargs)
        self._unsubscribe = vm.console.subscribe(lambda _text: self._wake.set())
        self._flush()
        self.thread = threading.Thread(target=self._run, name=f"console-{vm.name}", daemon=True)
        self.thread.start()

    @property
    def text(self) -> str:
        """The console text the view currently shows."""
        with self._lock:
            return self._text

    def close(self) -> None:
        """Stop following the console and close the widgets (the VM is left alone)."""
        self._closed.set()
        self._wake.set()
        self._unsubscribe()
        close_tree(self)

    def __repr__(self) -> str:
        following = "following" if self.thread.is_alive() else "ended"
        return f"ConsoleView(vm={self.vm.name!r}, {len(self.text)} chars, {following})"

    def _flush(self) -> None:
        with self._lock:
            new, self._cursor = self.vm.console.read_since(self._cursor)
            if not new and self.output.value:
                return
            self._text = (self._text + new)[-self.limit_chars:]
            # Under the lock: two flushes (constructor, thread) must not swap their updates.
            # The pre must not shrink (flex:none), or column-reverse cannot keep the view
            # scrolled to the newest line.
            self.output.value = (
                f"<div style='height:{self._height};overflow:auto;display:flex;"
                "flex-direction:column-reverse;background:#1e1e1e;border-radius:4px'>"
                "<pre style='flex:none;margin:0;padding:6px;color:#e0e0e0;font-size:12px;"
                "line-height:1.3;white-space:pre-wrap;word-break:break-all'>"
                f"{escape(self._text)}</pre></div>")

    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                self._wake.wait(0.5)
                self._wake.clear()
                if self._closed.is_set():
                    break
                self._flush()
                if self.vm.state in ("stopped", "failed"):   # "stopping" still prints
                    break
                self._closed.wait(self._min_gap_s)   # rate limit: gather what comes meanwhile
            reason = "closed" if self._closed.is_set() else f"VM {self.vm.state}"
            if not self._closed.is_set():
                self._flush()
                self.status.value = note_html(f"{reason}: console no longer followed")
        except Exception:  # noqa: BLE001 - widgets closed under us
            pass
        finally:
            self._unsubscribe()
