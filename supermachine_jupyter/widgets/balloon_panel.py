"""``BalloonPanel``: the virtio-balloon of a running VM, charted live, with controls."""

from __future__ import annotations

import collections
import threading
import time
from html import escape
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from ..devices.balloon import BalloonNotEnabled
from .chart import Series, line_chart
from .format import ERROR_COLOUR, OK_COLOUR, clock, mib, mib_text, note_html
from .sampler import Sampler, StopSampling, close_tree

if TYPE_CHECKING:
    from ..vm import Vm

#: Signed step sizes of the buttons, MiB (positive inflates, negative deflates).
BUTTON_STEPS_MIB = (-64, -16, 16, 64)
DEFAULT_HISTORY_SAMPLES = 120

ACTUAL_COLOUR, TARGET_COLOUR = "#e65100", "#e65100"
FREE_COLOUR, AVAILABLE_COLOUR = "#2e7d32", "#1565c0"


class BalloonPanel(widgets.VBox):
    """Live chart and numbers of ``vm``'s balloon, with inflate/deflate buttons.

    A daemon thread reads ``vm.balloon_stats()`` every ``interval`` seconds (fixed rate, 1 Hz
    by default) and appends a sample to ``panel.history``: the last ``history_samples``
    readings, each a dict with ``time`` (``time.time()``), every
    :class:`~supermachine_jupyter.devices.balloon.BalloonStats` field (Firecracker's names and units:
    pages, MiB, guest memory in bytes, None where unreported), and ``free_mib``,
    ``available_mib``, ``total_mib`` for convenience. The chart plots balloon actual
    (solid) and target (dashed) with the guest's free and available memory, 0 … the VM's
    memory, in MiB.

    ``panel.buttons`` maps -64, -16, +16, +64 to buttons that call
    ``vm.request_balloon_deflate``/``request_balloon_inflate``; ``panel.inflate(mib)`` and
    ``panel.deflate(mib)`` do the same from code. The thread ends when the VM stops or on
    ``close()``. A VM started without a balloon shows why (how to enable it) instead.
    """

    def __init__(self, vm: Vm, interval: float = 1.0, *,
                 history_samples: int = DEFAULT_HISTORY_SAMPLES, **kwargs: Any):
        self.vm = vm
        self.interval = interval
        self._history: collections.deque[dict] = collections.deque(maxlen=history_samples)
        self._lock = threading.Lock()
        self._action = ""
        self.chart = widgets.HTML()
        self.numbers = widgets.HTML()
        self.status = widgets.HTML()
        self.buttons = {
            step: widgets.Button(
                description=f"{'+' if step > 0 else '−'}{abs(step)} MiB",
                tooltip=(f"inflate the balloon by {step} MiB (take memory from the guest)"
                         if step > 0 else
                         f"deflate the balloon by {-step} MiB (give memory back to the guest)"),
                layout=widgets.Layout(width="90px"))
            for step in BUTTON_STEPS_MIB}
        for step, button in self.buttons.items():
            button.on_click(lambda _button, step=step: self._on_step(step))
        self.sampler = Sampler(vm, interval, self._sample, on_error=self._on_error,
                               on_end=self._on_end, name="balloon")
        super().__init__(children=[self.chart, self.numbers,
                                   widgets.HBox(list(self.buttons.values())), self.status],
                         **kwargs)
        self._render()
        if not vm.config.balloon:
            self._disable(str(BalloonNotEnabled(vm.name)), ERROR_COLOUR)
        else:
            self.status.value = note_html(f"sampling every {interval:g} s…")
            self.sampler.start()

    # -- public ------------------------------------------------------------------------
    @property
    def history(self) -> list[dict]:
        """The samples so far, oldest first (a copy)."""
        with self._lock:
            return list(self._history)

    @property
    def thread(self) -> threading.Thread:
        """The sampling thread (alive while the panel follows the VM)."""
        return self.sampler.thread

    def inflate(self, mib_: int) -> int | None:
        """Grow the balloon by ``mib_`` MiB; returns the new target (None on error, shown)."""
        return self._on_step(abs(mib_))

    def deflate(self, mib_: int) -> int | None:
        """Shrink the balloon by ``mib_`` MiB; returns the new target (None on error, shown)."""
        return self._on_step(-abs(mib_))

    def close(self) -> None:
        """Stop sampling and close the widgets (the VM is left alone)."""
        self.sampler.stop()
        close_tree(self)

    def __repr__(self) -> str:
        sampling = "sampling" if self.sampler.running else f"ended: {self.sampler.end_reason}"
        return (f"BalloonPanel(vm={self.vm.name!r}, interval={self.interval:g}, "
                f"samples={len(self._history)}, {sampling})")

    # -- behaviour ---------------------------------------------------------------------
    def _on_step(self, step_mib: int) -> int | None:
        try:
            if step_mib > 0:
                target = self.vm.request_balloon_inflate(step_mib)
            else:
                target = self.vm.request_balloon_deflate(-step_mib)
        except Exception as exc:  # noqa: BLE001 - shown in the panel, never raised at a click
            self._action = ""
            self.status.value = note_html(f"{'inflate' if step_mib > 0 else 'deflate'} "
                                          f"failed: {exc}", ERROR_COLOUR)
            return None
        self._action = (f"{'inflate' if step_mib > 0 else 'deflate'} {abs(step_mib)} MiB → "
                        f"target {target} MiB")
        self.status.value = note_html(self._action, OK_COLOUR)
        return target

    def _sample(self) -> None:
        requested = time.time()      # the tick's time: sampling latency does not skew rates
        try:
            stats = self.vm.balloon_stats()
        except BalloonNotEnabled as exc:
            raise StopSampling(str(exc)) from exc
        sample = {"time": requested, **stats.to_dict(),
                  "free_mib": mib(stats.free_memory),
                  "available_mib": mib(stats.available_memory),
                  "total_mib": mib(stats.total_memory)}
        with self._lock:
            self._history.append(sample)
        self._render()
        note = f"sampling every {self.interval:g} s · last {clock(sample['time'])}"
        self.status.value = note_html(f"{self._action} · {note}" if self._action else note)

    def _render(self) -> None:
        history = self.history
        times = [s["time"] for s in history]
        series = [
            Series("balloon actual", ACTUAL_COLOUR, [s["actual_mib"] for s in history]),
            Series("balloon target", TARGET_COLOUR, [s["target_mib"] for s in history],
                   dashed=True),
            # available first, free on top: the two are often nearly equal
            Series("guest available", AVAILABLE_COLOUR, [s["available_mib"] for s in history],
                   width=4.0),
            Series("guest free", FREE_COLOUR, [s["free_mib"] for s in history]),
        ]
        window = self.interval * (self._history.maxlen or len(history))
        self.chart.value = line_chart(times, series, self.vm.memory_mib,
                                      window_s=min(window, max(times[-1] - times[0], 10.0))
                                      if len(times) >= 2 else None)
        if not history:
            self.numbers.value = f"<b>{escape(self.vm.name)}</b> · {self.vm.memory_mib} MiB guest"
            return
        last = history[-1]
        self.numbers.value = (
            "<span style='line-height:1.5'>"
            f"<b>{escape(self.vm.name)}</b> · balloon <b>{last['actual_mib']} MiB</b> "
            f"({last['actual_pages']} pages) of target {last['target_mib']} MiB · guest "
            f"free {mib_text(last['free_mib'])} · available {mib_text(last['available_mib'])}"
            f" · total {mib_text(last['total_mib'])} of {self.vm.memory_mib} MiB</span>")

    def _disable(self, message: str, colour: str) -> None:
        for button in self.buttons.values():
            button.disabled = True
        self.status.value = note_html(message, colour)

    def _on_error(self, exc: BaseException) -> None:
        self.status.value = note_html(f"sampling failed: {exc}", ERROR_COLOUR)

    def _on_end(self, reason: str) -> None:
        if reason == "closed":
            return
        colour = ERROR_COLOUR if "balloon" in reason else None
        self._disable(reason if colour else f"{reason}: sampling ended", colour or "#616161")
