"""The background thread behind every live panel: sample a running VM at a fixed rate.

Panels must refresh without blocking the kernel, so each one owns a :class:`Sampler`: a
daemon thread that calls ``sample()`` every ``interval`` seconds and writes widget values
from there (ipywidgets sends the comm messages from any thread), while cells keep running
on the kernel's main thread. The thread ends by itself when the VM has ended (stopped or
failed; sampling pauses while it is stopping) or when the panel is closed;
``on_end(reason)`` then runs once, on the thread, to leave a final status behind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import ipywidgets

if TYPE_CHECKING:
    from ..vm import Vm


class StopSampling(Exception):
    """Raised by a ``sample`` function to end its sampler for good; the message is the reason
    handed to ``on_end`` (e.g. "the VM has no balloon device")."""


class Sampler:
    """Calls ``sample()`` every ``interval`` seconds on a daemon thread while ``vm`` runs.

    Ticks are scheduled at a fixed rate (``start + k * interval``), so slow samples do not
    stretch the period; a tick that is missed entirely is skipped rather than made up in a
    burst. An exception from ``sample`` (other than :class:`StopSampling`) goes to
    ``on_error`` and sampling goes on, unless the VM stopped meanwhile.
    """

    def __init__(self, vm: Vm, interval: float, sample: Callable[[], None], *,
                 on_error: Callable[[BaseException], None] | None = None,
                 on_end: Callable[[str], None] | None = None, name: str = "sampler"):
        if not (isinstance(interval, (int, float)) and 0 < interval <= 3600):
            raise ValueError(f"interval must be a number of seconds in (0, 3600], got {interval!r}")
        self.vm = vm
        self.interval = float(interval)
        self._sample = sample
        self._on_error = on_error
        self._on_end = on_end
        self._closed = threading.Event()
        #: why the thread ended (None while it runs)
        self.end_reason: str | None = None
        self.thread = threading.Thread(target=self._run, name=f"{name}-{vm.name}", daemon=True)

    def __repr__(self) -> str:
        state = "running" if self.running else f"ended ({self.end_reason})"
        return f"<Sampler {self.thread.name} every {self.interval:g} s, {state}>"

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def start(self) -> Sampler:
        self.thread.start()
        return self

    def stop(self) -> None:
        """Ask the thread to end (it does within one tick's wait; no sample starts after)."""
        self._closed.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; True when it has."""
        if self.thread.ident is not None:
            self.thread.join(timeout)
        return not self.thread.is_alive()

    def _vm_ended(self) -> str | None:
        """Why sampling is over for good ("VM stopped", "VM failed"), else None."""
        state = self.vm.state
        return None if state in ("running", "stopping") else f"VM {state}"

    def _run(self) -> None:
        reason = "closed"
        next_tick = time.monotonic()
        try:
            while not self._closed.is_set():
                ended = self._vm_ended()
                if ended:
                    reason = ended
                    break
                try:
                    if self.vm.state == "running":  # while stopping: wait for the final state
                        self._sample()
                except StopSampling as exc:
                    reason = str(exc)
                    break
                except Exception as exc:  # noqa: BLE001 - one bad sample must not end the panel
                    ended = self._vm_ended()
                    if ended:     # the VM went away under the sample: not an error to show
                        reason = ended
                        break
                    if self._on_error is not None:
                        self._on_error(exc)
                next_tick += self.interval
                now = time.monotonic()
                next_tick = max(next_tick, now)   # a sample overran whole ticks: skip them
                self._closed.wait(next_tick - now)
        finally:
            self.end_reason = reason
            if self._on_end is not None:
                try:
                    self._on_end(reason)
                except Exception:  # noqa: BLE001 - a closed widget may refuse the update
                    pass


def close_tree(widget: ipywidgets.Widget) -> None:
    """Close ``widget`` and every widget beneath it (``Widget.close`` closes only itself).

    Call it from a panel's ``close()``. A descendant with its own ``close()`` (another
    panel: it stops its thread) is closed through it; plain widgets are walked here.
    """
    for child in getattr(widget, "children", ()):
        if type(child).close is not ipywidgets.Widget.close:
            child.close()
        else:
            close_tree(child)
    ipywidgets.Widget.close(widget)
