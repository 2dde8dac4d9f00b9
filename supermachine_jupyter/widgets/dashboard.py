"""``VmDashboard``: configure, start, watch and stop one VM from a notebook."""

from __future__ import annotations

import threading
from html import escape
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from ..config import VmConfig
from .balloon_panel import BalloonPanel
from .config_form import VmConfigForm
from .console_view import ConsoleView
from .format import (
    ERROR_COLOUR,
    MUTED_COLOUR,
    OK_COLOUR,
    PROGRESS_MARK,
    error_html,
    note_html,
)
from .mount_panel import MountPanel
from .sampler import Sampler, close_tree

if TYPE_CHECKING:
    from ..image import Image
    from ..vm import Vm

TAB_TITLES = ("Config", "Console", "Balloon", "Mounts")
#: How often the state line re-reads the VM's state, seconds.
STATE_INTERVAL_S = 0.5
_STATE_COLOURS = {"running": OK_COLOUR, "failed": ERROR_COLOUR}


class VmDashboard(widgets.VBox):
    """Start/stop buttons, a state line and tabs: the config form, the console, the balloon
    and the mounts of one VM.

    ``VmDashboard(vm)`` shows a running VM, opened on its Balloon tab when it has a balloon
    and on its Console tab otherwise (``tab="Config"`` … chooses); its form holds a *copy*
    of the VM's config with the memory and vCPUs the VM really has, for the next start (a
    note over the form says so). ``VmDashboard(config=cfg)`` or ``VmDashboard()`` starts
    with no VM.
    **start** boots a VM from the form's config (``Image.default().start``) on a background
    thread, showing the boot progress, so the kernel stays free; **stop** stops it, also in
    the background. The state line names the engine (why it was chosen,
    ``vm.engine_reason``, is its tooltip). ``dashboard.vm`` is the current VM (or None); ``wait()`` waits
    for a start or stop in progress; ``threads()`` lists the dashboard's live threads.
    ``close()`` closes the widgets and ends their threads but leaves the VM running.
    """

    def __init__(self, vm: Vm | None = None, config: VmConfig | None = None, *,
                 interval: float = 1.0, image: Image | None = None, tab: str | None = None,
                 **kwargs: Any):
        if tab is not None and tab not in TAB_TITLES:
            raise ValueError(f"tab must be one of {', '.join(TAB_TITLES)}, got {tab!r}")
        if config is None:
            config = _next_start_config(vm) if vm is not None else VmConfig()
        self.interval = interval
        self.vm: Vm | None = None
        self.console: ConsoleView | None = None
        self.balloon: BalloonPanel | None = None
        self.mounts: MountPanel | None = None
        self._image = image
        self._watcher: Sampler | None = None
        self._worker: threading.Thread | None = None
        self._busy = False          # a start or stop is under way
        self._lock = threading.Lock()
        self._closed = False
        self.form = VmConfigForm(config)
        self.start_button = widgets.Button(description="start", icon="play",
                                           button_style="success",
                                           tooltip="boot a VM from the Config tab")
        self.stop_button = widgets.Button(description="stop", icon="stop",
                                          button_style="danger", disabled=True,
                                          tooltip="stop the VM")
        self.start_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.state_line = widgets.HTML()
        self.progress = widgets.HTML()
        #: over the form: what editing it does while a VM runs
        self.config_note = widgets.HTML()
        self._boxes = [widgets.VBox() for _ in TAB_TITLES[1:]]
        self.tabs = widgets.Tab(children=[widgets.VBox([self.config_note, self.form]),
                                          *self._boxes], titles=TAB_TITLES)
        super().__init__(children=[widgets.HBox([self.start_button, self.stop_button]),
                                   self.state_line, self.progress, self.tabs], **kwargs)
        if vm is not None:
            self.attach(vm)
            self.tabs.selected_index = TAB_TITLES.index(tab or _first_tab(vm))
        else:
            self.state_line.value = note_html("no VM yet: set the configuration, then start")
            self._show_placeholders("no VM yet")

    # -- public ------------------------------------------------------------------------
    def attach(self, vm: Vm) -> None:
        """Show ``vm`` in the dashboard (the panels of a previous VM are closed)."""
        with self._lock:
            self._close_panels()
            self.vm = vm
            self.console = ConsoleView(vm)
            self.balloon = BalloonPanel(vm, self.interval)
            self.mounts = MountPanel(vm, self.interval)
            for box, panel in zip(self._boxes, (self.console, self.balloon, self.mounts)):
                box.children = [panel]
            self._watcher = Sampler(vm, STATE_INTERVAL_S, self._show_state,
                                    on_end=lambda _reason: self._show_state(), name="state")
            self._show_state()
            self._watcher.start()

    def start(self) -> threading.Thread | None:
        """Boot a VM from the form's config in the background; returns the thread (None
        when refused: a VM is running, a start/stop is under way, or the form has errors)."""
        with self._lock:
            if self._busy:
                self.progress.value = note_html("busy: wait for the start or stop under way")
                return None
            if self.vm is not None and self.vm.state in ("running", "stopping"):
                self.progress.value = note_html(f"{self.vm.name} is {self.vm.state}: stop it "
                                                "first")
                return None
            if self.form.errors:
                fields = ", ".join(sorted(self.form.errors))
                self.progress.value = error_html(f"fix the form first ({fields}): the config "
                                                 "does not hold those entries")
                return None
            config = self.form.config.replace()   # later form edits do not touch this VM
            self._busy = True
            self.start_button.disabled = True
            self.progress.value = note_html("starting…")
            self._worker = threading.Thread(target=self._start_worker, args=(config,),
                                            name="dashboard-start", daemon=True)
            self._worker.start()
            return self._worker

    def stop(self) -> threading.Thread | None:
        """Stop the VM in the background; returns the thread (None when there is none)."""
        with self._lock:
            vm = self.vm
            if vm is None or vm.state != "running":
                return None
            if self._busy:
                self.progress.value = note_html("busy: wait for the start or stop under way")
                return None
            self._busy = True
            self.stop_button.disabled = True
            self.progress.value = note_html(f"stopping {vm.name}…")
            self._worker = threading.Thread(target=self._stop_worker, args=(vm,),
                                            name=f"dashboard-stop-{vm.name}", daemon=True)
            self._worker.start()
            return self._worker

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a start or stop under way; True when none is left running."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
            return not worker.is_alive()
        return True

    def threads(self) -> list[threading.Thread]:
        """The dashboard's threads that are still alive (panels, state line, start/stop)."""
        candidates = [self._worker, self._watcher.thread if self._watcher else None]
        candidates += [panel.thread for panel in (self.console, self.balloon, self.mounts)
                       if panel is not None]
        return [t for t in candidates if t is not None and t.is_alive()]

    def close(self) -> None:
        """Close the dashboard and end its threads; the VM keeps running."""
        self._closed = True
        with self._lock:
            self._close_panels()
        self.form.close()
        close_tree(self)

    def __repr__(self) -> str:
        vm = f"{self.vm.name!r} {self.vm.state}" if self.vm is not None else "none"
        return f"VmDashboard(vm={vm}, config={self.form.config!r})"

    # -- behaviour ---------------------------------------------------------------------
    def _start_worker(self, config: VmConfig) -> None:
        def progress(message: str) -> None:
            self.progress.value = note_html(f"{PROGRESS_MARK} {message}")

        try:
            if self._image is None:
                from ..image import Image
                self._image = Image.default(progress)
            vm = self._image.start(config, progress=progress)
        except Exception as exc:  # noqa: BLE001 - shown in the dashboard
            self.progress.value = error_html(f"start failed: {exc}")
            self._busy = False
            self.start_button.disabled = False
            return
        self._busy = False
        if self._closed:      # closed while booting: nobody could stop this VM any more
            vm.stop()
            return
        self.progress.value = note_html(f"✓ {vm.name} ready in {vm.boot_seconds:.1f} s",
                                        OK_COLOUR)
        self.attach(vm)
        self.tabs.selected_index = TAB_TITLES.index(_first_tab(vm))

    def _stop_worker(self, vm: Vm) -> None:
        try:
            vm.stop()
        except Exception as exc:  # noqa: BLE001
            self.progress.value = error_html(f"stop failed: {exc}")
        else:
            self.progress.value = note_html(f"{vm.name} stopped")
        self._busy = False
        self._show_state()

    def _show_state(self) -> None:
        vm = self.vm
        if vm is None:
            return
        state = vm.state
        colour = _STATE_COLOURS.get(state, MUTED_COLOUR)
        failure = (f"<br><span style='color:{ERROR_COLOUR}'>{escape(vm.failure)}</span>"
                   if vm.failure else "")
        how = "restored" if vm.restored_from else "booted"
        # Why this engine runs it is a detail: a tooltip (and %vm info), not a line of text.
        self.state_line.value = (
            f"<b>{escape(vm.name)}</b> <span style='color:{colour}'>{state}</span> · "
            f"<span title='engine: {escape(vm.engine_reason)}'>{escape(vm.engine)}/"
            f"{escape(vm.accel)}</span> · {vm.memory_mib} MiB · {vm.vcpus} vCPU"
            f" · {how} in {vm.boot_seconds:.1f} s{failure}")
        self.stop_button.disabled = state != "running" or self._busy
        self.start_button.disabled = state in ("running", "stopping") or self._busy
        self.config_note.value = note_html(
            f"{vm.name} is {state}: changes here apply at the next start (stop it, then "
            f"start); until then it keeps {vm.memory_mib} MiB and {vm.vcpus} vCPU"
            f"{'s' if vm.vcpus != 1 else ''}." if state in ("running", "stopping") else
            f"{vm.name} is {state}: start boots a new VM with this configuration.")

    def _show_placeholders(self, message: str) -> None:
        for box in self._boxes:
            box.children = [widgets.HTML(note_html(message))]

    def _close_panels(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        for panel in (self.console, self.balloon, self.mounts):
            if panel is not None:
                panel.close()
        self.console = self.balloon = self.mounts = None


def _first_tab(vm: Vm) -> str:
    """The tab a VM's dashboard opens on: the balloon chart when it has a balloon (what
    ``%%vm --balloon --panel`` is asked for), else its console."""
    return "Balloon" if vm.config.balloon else "Console"


def _next_start_config(vm: Vm) -> VmConfig:
    """A copy of ``vm``'s config for the form, with the memory and vCPUs the VM really has
    (its config may say None, "the image's default", and the form should show numbers)."""
    return vm.config.replace(memory_mib=vm.memory_mib, vcpus=vm.vcpus)
