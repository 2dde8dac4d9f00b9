"""``BalloonPanel``: the virtio-balloon of a running VM, charted live, with controls."""

from __future__ import annotations

import collections
import itertools
import threading
import time
from html import escape
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from ..devices.balloon import BalloonNotEnabled
from .chart import Marker, Series, line_chart
from .format import (
    ERROR_COLOUR,
    MUTED_COLOUR,
    OK_COLOUR,
    clock,
    mib,
    mib_text,
    note_html,
)
from .sampler import Sampler, StopSampling, close_tree

if TYPE_CHECKING:
    from ..vm import Vm

#: Signed step sizes of the buttons, MiB (positive inflates, negative deflates).
BUTTON_STEPS_MIB = (-64, -16, 16, 64)
#: Ten minutes at the default 1 Hz: long enough for a whole classroom demonstration.
DEFAULT_HISTORY_SAMPLES = 600
#: The y axis grows in these steps when the host's side outgrows the guest's memory.
Y_AXIS_STEP_MIB = 256

# JupyterLab theme colours (each theme tunes them for its background), light fallbacks.
ACTUAL_COLOUR = TARGET_COLOUR = "var(--jp-warn-color1, #e65100)"
FREE_COLOUR = "var(--jp-success-color1, #2e7d32)"
AVAILABLE_COLOUR = "var(--jp-brand-color1, #1565c0)"
#: No theme variable means "host": a purple that reads on white and on near-black.
HOST_COLOUR = "#ab47bc"


class BalloonPanel(widgets.VBox):
    """Live chart and numbers of ``vm``'s balloon, with inflate/deflate buttons.

    A daemon thread reads ``vm.balloon_stats()`` every ``interval`` seconds (fixed rate, 1 Hz
    by default) and appends a sample to ``panel.history``: the last ``history_samples``
    readings (ten minutes by default), each a dict with ``time`` (``time.time()``), every
    :class:`~supermachine_jupyter.devices.balloon.BalloonStats` field (Firecracker's names and units:
    pages, MiB, guest memory in bytes, None where unreported), ``free_mib``,
    ``available_mib``, ``total_mib`` for convenience, and ``host_rss_mib``: the host
    memory the VM holds resident (``vm.host_memory_bytes()``, whatever the engine). The
    chart plots balloon actual (solid) and target (dashed), the guest's free and available
    memory and the host's resident memory, in MiB, in the JupyterLab theme's colours; a
    dashed vertical line marks each change of the target (``panel.markers``), wherever it
    was made (this panel, a cell, the sidebar). The status line names the current target.

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
        self._action_target: int | None = None
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
    def markers(self) -> list[tuple[float, int]]:
        """``(time, new target MiB)`` of every change of the balloon target seen in the
        history (the first sample's target is where the history starts, not a change)."""
        history = self.history
        return [(now["time"], now["target_mib"])
                for before, now in itertools.pairwise(history)
                if now["target_mib"] != before["target_mib"]]

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
        self._action_target = target
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
                  "total_mib": mib(stats.total_memory),
                  "host_rss_mib": mib(self.vm.host_memory_bytes())}
        with self._lock:
            previous = self._history[-1]["target_mib"] if self._history else None
            self._history.append(sample)
        target = sample["target_mib"]
        if previous is not None and target != previous and target != self._action_target:
            # Changed outside this panel (the sidebar, a cell): say so, not our stale step.
            self._action = f"target set to {target} MiB elsewhere at {clock(sample['time'])}"
            self._action_target = target
        self._render()
        note = (f"target {target} MiB · sampling every {self.interval:g} s · "
                f"last {clock(sample['time'])}")
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
            Series("host resident (RSS)", HOST_COLOUR, [s["host_rss_mib"] for s in history],
                   width=2.4),
        ]
        window = self.interval * (self._history.maxlen or len(history))
        highest = max([self.vm.memory_mib] + [s["host_rss_mib"] or 0 for s in history])
        y_max = (self.vm.memory_mib if highest <= self.vm.memory_mib else
                 -(-highest // Y_AXIS_STEP_MIB) * Y_AXIS_STEP_MIB)
        markers = [Marker(t, f"→{target}") for t, target in self.markers]
        self.chart.value = line_chart(times, series, y_max, markers=markers,
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
            f" · total {mib_text(last['total_mib'])} of {self.vm.memory_mib} MiB · host "
            f"resident <b>{mib_text(last['host_rss_mib'])}</b></span>")

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
        self._disable(reason if colour else f"{reason}: sampling ended", colour or MUTED_COLOUR)
