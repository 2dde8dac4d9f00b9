"""The notebook widgets against real VMs (QEMU here): form ↔ config, live panels, dashboard,
and the ``%%vm --panel`` / ``%vm panel`` magics.

Widgets are built without a frontend (ipywidgets falls back to a dummy comm), so the tests
read widget values and the panels' data; the VMs, their devices and the panels' threads are
all real.
"""

from __future__ import annotations

import html
import itertools
import os
import time

import pytest
from traitlets import TraitError

from supermachine_jupyter.config import (
    MountSpec,
    VmConfig,
    VolumeSpec,
    host_cpu_count,
    host_memory_mib,
)
from supermachine_jupyter.widgets import (
    BalloonPanel,
    ConsoleView,
    MountPanel,
    VmConfigForm,
    VmDashboard,
)
from supermachine_jupyter.widgets.balloon_panel import (
    DEFAULT_HISTORY_SAMPLES,
    HOST_COLOUR,
)
from supermachine_jupyter.widgets.chart import (
    PLOT_BACKGROUND,
    Marker,
    Series,
    line_chart,
)
from supermachine_jupyter.widgets.config_form import memory_stops_mib
from supermachine_jupyter.widgets.dashboard import TAB_TITLES
from supermachine_jupyter.widgets.format import ERROR_COLOUR
from tests.helpers import wait_for

MIB = 1024 * 1024


def assert_threads_end(threads, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"threads still running {timeout} s after their VM stopped: {alive}"


# -- VmConfigForm (no VM needed) ------------------------------------------------------------

def test_form_changes_config_and_follows_it(tmp_path):
    config = VmConfig(engine="qemu")
    form = VmConfigForm(config)
    assert form.config is config
    assert form.memory_default.value and form.memory.disabled   # None: the image's default

    form.memory.value = 512            # moving the slider unticks "default"
    assert config.memory_mib == 512 and not form.memory_default.value
    form.memory_default.value = True
    assert config.memory_mib is None
    form.vcpus.value = host_cpu_count()
    assert config.vcpus == host_cpu_count()
    form.balloon.value = True
    assert config.balloon is True
    form.engine.value = "native"
    assert config.engine == "native"
    form.name.value = "lab1"
    assert config.name == "lab1"
    form.name.value = ""
    assert config.name is None

    (tmp_path / "share").mkdir()
    row = form.add_volume_button.click() or form.volume_rows[-1]
    row.host_path.value = str(tmp_path / "data.img")
    assert config.volumes == [] and "incomplete" in form.notes["volumes"]
    row.guest_path.value = "/data/"
    row.size_mib.value = 64
    assert config.volumes == [VolumeSpec(str(tmp_path / "data.img"), "/data", 64)]
    assert "volumes" not in form.notes
    row.read_only.value = True
    assert config.volumes[0].read_only
    mount = form.add_row("mounts")
    mount.host_path.value, mount.tag.value = str(tmp_path / "share"), "share"
    mount.guest_path.value = "/mnt/share"
    assert config.mounts == [MountSpec(str(tmp_path / "share"), "share", "/mnt/share")]
    row.remove_button.click()
    assert config.volumes == [] and form.volume_rows == []

    # config → widgets
    config.memory_mib = 1024
    assert form.memory.value == 1024 and not form.memory_default.value
    config.vcpus = None
    assert form.vcpus_default.value and form.vcpus.disabled
    config.balloon = False
    config.engine = "qemu"
    config.name = "lab2"
    assert (form.balloon.value, form.engine.value, form.name.value) == (False, "qemu", "lab2")
    config.volumes = [VolumeSpec(str(tmp_path / "a.img"), "/a", 8),
                      VolumeSpec(str(tmp_path / "b.img"), "/b", 16, read_only=True)]
    assert [(r.guest_path.value, r.size_mib.value, r.read_only.value)
            for r in form.volume_rows] == [("/a", 8, False), ("/b", 16, True)]
    config.mounts = []
    assert form.mount_rows == []

    # a whole new config: the form follows it and lets go of the old one
    other = VmConfig(memory_mib=128, vcpus=1, engine="auto").with_virtiofs(
        tmp_path / "share", "t", "/mnt/t")
    form.config = other
    assert (form.memory.value, form.vcpus.value, form.engine.value) == (128, 1, "auto")
    assert [r.tag.value for r in form.mount_rows] == ["t"] and form.volume_rows == []
    config.memory_mib = 2048
    assert form.memory.value == 128
    form.memory.value = 192
    assert other.memory_mib == 192 and config.memory_mib == 2048
    assert "VmConfigForm(VmConfig(memory_mib=192" in repr(form)


def test_form_invalid_entries_show_inline_error_and_leave_config(tmp_path):
    (tmp_path / "share").mkdir()
    (tmp_path / "other").mkdir()
    config = VmConfig(engine="qemu").with_virtiofs(tmp_path / "share", "share", "/mnt/share")
    form = VmConfigForm(config)
    before = list(config.mounts)

    def shows_error(field, *words):
        message = form.errors[field]
        html = form.messages[field].value
        assert ERROR_COLOUR in html and all(w in message for w in words), message
        assert all(w.replace("'", "&#x27;") in html for w in words), html

    # a nonexistent host directory
    row = form.add_row("mounts")
    row.tag.value, row.guest_path.value = "second", "/mnt/second"
    row.host_path.value = str(tmp_path / "missing")
    shows_error("mounts", "MountSpec.host_path", "an existing host directory", "does not exist")
    assert config.mounts == before
    assert row.box.layout.border and row.host_path.value == str(tmp_path / "missing")  # kept

    # fixed → applied, error gone; then a duplicate tag (a cross-row rule of VmConfig)
    row.host_path.value = str(tmp_path / "other")
    assert "mounts" not in form.errors and form.messages["mounts"].value == ""
    assert len(config.mounts) == 2 and not row.box.layout.border
    row.tag.value = "share"
    shows_error("mounts", "tag 'share'", "mount tags must be unique")
    assert [m.tag for m in config.mounts] == ["share", "second"]

    # a bad guest path
    row.tag.value = "second"
    row.guest_path.value = "mnt/relative"
    shows_error("mounts", "MountSpec.guest_path", "an absolute guest path")
    row.guest_path.value = "/mnt/../etc"
    shows_error("mounts", "MountSpec.guest_path", "no '..'")
    assert [m.guest_path for m in config.mounts] == ["/mnt/share", "/mnt/second"]

    # a guest path taken by a volume, a bad volume size, a bad name
    row.guest_path.value = "/mnt/second"
    volume = form.add_row("volumes")
    volume.host_path.value, volume.guest_path.value = str(tmp_path / "v.img"), "/mnt/share"
    shows_error("volumes", "guest path '/mnt/share'", "unique across volumes and mounts")
    volume.guest_path.value = "/data"
    assert config.volumes == [VolumeSpec(str(tmp_path / "v.img"), "/data")]   # 0 = size None
    volume.size_mib.value = -5
    shows_error("volumes", "VolumeSpec.size_mib", "from 1 to")
    assert config.volumes == [VolumeSpec(str(tmp_path / "v.img"), "/data")]  # last valid
    form.name.value = "no spaces allowed"
    shows_error("name", "VmConfig.name", "a letter or digit")
    assert config.name is None and form.name.value == "no spaces allowed"   # kept, marked

    # a change from the config side wins and clears the mark
    config.name = "fine"
    assert form.name.value == "fine" and "name" not in form.errors
    config.volumes = []
    assert form.volume_rows == [] and "volumes" not in form.errors

    # the config itself never took an invalid value
    with pytest.raises(TraitError):
        config.memory_mib = 1
    assert form.memory_default.value


def test_form_memory_slider_has_stops_people_pick_and_a_typed_size_is_never_clamped():
    host = host_memory_mib()
    stops = memory_stops_mib(host)
    assert stops[:8] == [64, 128, 192, 256, 384, 512, 768, 1024][:len(stops[:8])]
    assert stops[-1] == host and stops == sorted(set(stops))
    # 256 MiB (the default size) is near the start, not lost in the first pixel of 24 GiB
    assert stops.index(256) <= len(stops) // 4 + 1, stops

    config = VmConfig(engine="qemu")
    form = VmConfigForm(config)
    assert [value for _, value in form.memory.options] == stops
    assert dict(form.memory.options)["1 GiB"] == 1024
    form.memory.value = 512                              # the slider, as a drag does
    assert config.memory_mib == 512 and form.memory_text.value == 512

    # 10 typed in the box: the config keeps 512, the box keeps 10, the message names the range
    form.memory_text.value = 10
    assert config.memory_mib == 512 and form.memory_text.value == 10
    message = form.errors["memory_mib"]
    assert f"from 64 to {host} MiB" in message and "got 10" in message, message
    assert ERROR_COLOUR in form.messages["memory_mib"].value
    assert form.memory.value == 512                      # the slider did not move
    form.memory_text.value = host + 1
    assert f"got {host + 1}" in form.errors["memory_mib"] and config.memory_mib == 512

    # a size between two stops is taken as typed and gets a stop of its own
    form.memory_text.value = 300
    assert config.memory_mib == 300 and "memory_mib" not in form.errors
    assert form.memory.value == 300 and ("300 MiB", 300) in form.memory.options
    config.memory_mib = 200                              # config → both widgets
    assert (form.memory.value, form.memory_text.value) == (200, 200)
    form.memory_default.value = True
    assert config.memory_mib is None and form.memory.disabled and form.memory_text.disabled


def test_chart_follows_the_theme_and_keeps_its_labels_apart():
    times = [1000.0 + i for i in range(30)]
    chart = line_chart(times, [Series("guest free", "var(--jp-success-color1, #2e7d32)",
                                      [100.0] * 30),
                               Series("host resident (RSS)", HOST_COLOUR, [50.0] * 30)],
                       256, markers=[Marker(1010.0, "→64"), Marker(5.0, "too old")])
    # theme variables for the plot and text, no hard-coded light background
    assert f"fill:{PLOT_BACKGROUND}" in chart and "var(--jp-layout-color0" in chart
    assert "#fafafa" not in chart and "fill='#" not in chart
    assert "var(--jp-ui-font-color1" in chart            # the legend's text
    # one marker in the window (the other is older than the window: left out)
    assert chart.count("class='sm-chart-marker'") == 1 and "→64" in chart
    assert "too old" not in chart
    # the unit label sits above the top tick label, not on it
    unit_y = float(chart.split(">MiB<")[0].rsplit("y='", 1)[1].split("'")[0])
    top_tick_y = float(chart.split(">256<")[0].rsplit("y='", 1)[1].split("'")[0])
    assert top_tick_y - unit_y >= 11, (unit_y, top_tick_y)
    # a long legend wraps instead of running off the right edge
    many = [Series(f"a rather long series label {i}", "#000", [1.0] * 30) for i in range(6)]
    wide = line_chart(times, many, 10, width=400)
    xs = [float(part.split("'")[0]) for part in wide.split("class='sm-chart-legend' x='")[1:]]
    assert max(xs) + 6.2 * len("a rather long series label 0") <= 400 + 12, xs


# -- live panels on one real VM: balloon, volume, virtio-fs mount ----------------------------

@pytest.fixture(scope="module")
def device_vm(start_vm, tmp_path_factory):
    if os.geteuid() != 0 or not os.path.exists("/usr/lib/qemu/virtiofsd"):
        pytest.skip("virtio-fs under QEMU needs root and /usr/lib/qemu/virtiofsd")
    share = tmp_path_factory.mktemp("share")
    (share / "hello.txt").write_text("hello from the host\n" * 100)
    volume = tmp_path_factory.mktemp("volumes") / "data.img"
    vm = start_vm(memory_mib=256, balloon=True,
                  mounts=[MountSpec(str(share), "share", "/mnt/share")],
                  volumes=[VolumeSpec(str(volume), "/data", 64)])
    vm.share_dir = share
    return vm


def test_balloon_panel_follows_a_real_vm(device_vm):
    vm = device_vm
    started = time.monotonic()
    panel = BalloonPanel(vm)                 # default interval: 1 s
    assert time.monotonic() - started < 0.5, "the panel must not block the kernel"
    assert panel.thread.is_alive()
    try:
        assert wait_for(lambda: len(panel.history) >= 2, 30), panel
        first = panel.history[0]
        assert first["target_mib"] == 0 and first["total_memory"], first
        assert {"time", "actual_pages", "free_mib", "available_mib"} <= first.keys()
        # the host's side: QEMU's resident memory, from the engine interface
        assert first["host_rss_mib"] and 16 < first["host_rss_mib"] < 4 * vm.memory_mib, first
        assert panel.markers == []
        assert panel._history.maxlen == DEFAULT_HISTORY_SAMPLES >= 600   # ten minutes at 1 Hz

        panel.buttons[64].click()
        assert "target 64 MiB" in panel.status.value
        inflated = wait_for(lambda: [s for s in panel.history if s["actual_mib"] >= 64], 60)
        assert inflated, f"balloon never reached 64 MiB: {panel.history[-3:]}"
        assert inflated[-1]["actual_pages"] >= 16384 and inflated[-1]["target_mib"] == 64
        assert "balloon <b>64 MiB</b>" in panel.numbers.value and "host resident" in \
            panel.numbers.value
        assert panel.chart.value.count("<polyline") >= 5   # actual, target, free, avail, host
        assert f"stroke:{HOST_COLOUR}" in panel.chart.value
        # a marker where the target changed, at the first sample that saw it
        ((marked_at, marked_target),) = panel.markers
        assert marked_target == 64 and marked_at >= first["time"]
        assert panel.chart.value.count("class='sm-chart-marker'") == 1
        assert "→64" in panel.chart.value
        rss_inflated = inflated[-1]["host_rss_mib"]
        assert rss_inflated is not None

        # a cell runs on the main thread while the panel keeps sampling
        count = len(panel.history)
        assert vm.run("sleep 2.2").ok
        assert len(panel.history) >= count + 2

        panel.buttons[-64].click()
        assert "target 0 MiB" in panel.status.value
        assert wait_for(lambda: panel.history[-1]["actual_mib"] == 0, 60), panel.history[-3:]
        assert [target for _, target in panel.markers] == [64, 0]

        # changed elsewhere (the sidebar, another cell): the status names the new target,
        # not this panel's last step, and the chart marks it
        vm.set_balloon_target(32)
        assert wait_for(lambda: "target set to 32 MiB elsewhere" in panel.status.value, 10), \
            panel.status.value
        assert "target 32 MiB ·" in panel.status.value and "target 0 MiB" not in \
            panel.status.value
        assert [target for _, target in panel.markers] == [64, 0, 32]
        vm.set_balloon_target(0)
        assert wait_for(lambda: panel.history[-1]["target_mib"] == 0, 10)

        history = panel.history
        times = [s["time"] for s in history]
        rate_hz = (len(times) - 1) / (times[-1] - times[0])
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # 1 Hz nominal at a fixed rate; 2 % allows for thread wake-up jitter at the ends.
        assert rate_hz >= 0.98 and max(gaps) < 1.5, (rate_hz, gaps)
        assert repr(panel).startswith(f"BalloonPanel(vm={vm.name!r}, interval=1, samples=")
    finally:
        panel.close()
    assert_threads_end([panel.thread])
    assert panel.sampler.end_reason == "closed"


def test_mount_panel_lists_real_mounts_with_moving_counters(device_vm):
    vm = device_vm
    panel = MountPanel(vm)
    try:
        rows = wait_for(panel.rows, 5)
        volume, mount = rows
        assert volume["kind"] == "volume" and volume["guest_path"] == "/data"
        assert volume["tag"] == "smvol0" and volume["size_bytes"] == 64 * MIB
        assert volume["read_only"] is False and volume["ops"] is None
        assert mount["kind"] == "mount" and mount["host_path"] == str(vm.share_dir)
        assert (mount["tag"], mount["guest_path"]) == ("share", "/mnt/share")
        assert mount["dax"] is False and "DAX" in mount["dax_note"]
        assert html.escape(mount["dax_note"]) in panel.table.value    # said where DAX is off
        # ... as the cell's tooltip, not a footnote under the table
        assert f"title='{html.escape(mount['dax_note'])}'" in panel.table.value
        assert "off*" not in panel.table.value and "DAX off for" not in panel.table.value
        assert "smvol0" in panel.table.value and "/mnt/share" in panel.table.value

        result = vm.run("cat /mnt/share/hello.txt > /dev/null && "
                        "dd if=/dev/zero of=/mnt/share/out.bin bs=64k count=4 2>/dev/null && "
                        "dd if=/dev/urandom of=/data/blob bs=1M count=4 2>/dev/null && sync")
        assert result.ok, result

        def moved():
            now_volume, now_mount = panel.rows()
            return (now_mount["ops"] > mount["ops"]
                    and now_mount["bytes_read"] > mount["bytes_read"]
                    and now_mount["bytes_written"] >= mount["bytes_written"] + 256 * 1024
                    and now_volume["used_bytes"] >= volume["used_bytes"] + 4 * MIB)
        assert wait_for(moved, 5), (rows, panel.rows())
        assert (vm.share_dir / "out.bin").stat().st_size == 256 * 1024
    finally:
        panel.close()
    assert_threads_end([panel.thread])


def test_console_view_follows_the_guest_console(device_vm):
    vm = device_vm
    view = ConsoleView(vm)
    try:
        assert "supermachine-agent" in view.text          # the boot log so far
        vm.run("echo widget-console-marker > /dev/console")
        assert wait_for(lambda: "widget-console-marker" in view.text, 5), view.text[-500:]
        assert wait_for(lambda: "widget-console-marker" in view.output.value, 2)
    finally:
        view.close()
    assert_threads_end([view.thread])


def test_panel_threads_end_when_their_vm_stops(start_vm):
    vm = start_vm(balloon=True)
    panels = [ConsoleView(vm), BalloonPanel(vm, interval=0.5), MountPanel(vm, interval=0.5)]
    dashboard = VmDashboard(vm)
    threads = [p.thread for p in panels] + dashboard.threads()
    assert len(threads) == 7 and all(t.is_alive() for t in threads)
    assert wait_for(lambda: len(panels[1].history) >= 1, 5)
    vm.stop()
    assert_threads_end(threads)
    assert "VM stopped" in panels[1].status.value and "VM stopped" in panels[2].status.value
    assert "VM stopped" in panels[0].status.value
    assert all(b.disabled for b in panels[1].buttons.values())
    assert "stopped" in dashboard.state_line.value and not dashboard.start_button.disabled
    # panels made for a VM that has already stopped say so and start no lasting thread
    late = [BalloonPanel(vm), MountPanel(vm), ConsoleView(vm)]
    assert_threads_end([p.thread for p in late])
    assert all("VM stopped" in p.status.value for p in late)


# -- VmDashboard -----------------------------------------------------------------------------

def test_dashboard_starts_and_stops_a_vm_with_its_buttons(guest_image):
    dashboard = VmDashboard(config=VmConfig(engine="qemu", memory_mib=192), image=guest_image)
    assert dashboard.vm is None and "no VM yet" in dashboard.state_line.value
    clicked = time.monotonic()
    dashboard.start_button.click()
    assert time.monotonic() - clicked < 0.5, "start must boot in the background"
    assert dashboard.start_button.disabled
    dashboard.form.memory.value = 256           # edits after start do not touch that VM
    try:
        assert dashboard.wait(60), "the VM did not boot within 60 s"
        vm = dashboard.vm
        assert vm is not None and vm.state == "running", dashboard.progress.value
        # no balloon: it opens on the console; the Config tab says when edits apply
        assert dashboard.tabs.selected_index == TAB_TITLES.index("Console")
        assert wait_for(lambda: "apply at the next start" in dashboard.config_note.value, 2)
        assert "keeps 192 MiB and 1 vCPU" in dashboard.config_note.value
        assert vm.memory_mib == 192 and vm.engine == "qemu"
        assert "ready in" in dashboard.progress.value
        state = dashboard.state_line.value
        assert "running" in state and "qemu/" in state and vm.engine_reason.split(";")[0] in state
        # one line: why this engine is a tooltip, not a second line of jargon
        assert f"title='engine: {html.escape(vm.engine_reason)}'" in state and "<br>" not in state
        assert "booted in" in state
        assert [type(box.children[0]) for box in dashboard.tabs.children[1:]] == [
            ConsoleView, BalloonPanel, MountPanel]
        # no balloon on this VM: the panel says how to get one instead of failing
        assert "balloon=True" in dashboard.balloon.status.value
        assert dashboard.balloon.buttons[64].disabled
        assert wait_for(lambda: "supermachine-agent" in dashboard.console.text, 5)
        dashboard.start_button.click()                  # already running: refused
        assert dashboard.vm is vm
        threads = dashboard.threads()
        assert threads

        dashboard.stop_button.click()
        assert dashboard.wait(30)
        assert vm.state == "stopped"
        assert_threads_end(threads)
        assert dashboard.threads() == []
        assert wait_for(lambda: "stopped" in dashboard.state_line.value, 2)
        assert "start boots a new VM" in dashboard.config_note.value
        assert not dashboard.start_button.disabled and dashboard.stop_button.disabled
    finally:
        if dashboard.vm is not None:
            dashboard.vm.stop()


# -- %%vm --panel and %vm panel NAME ---------------------------------------------------------

@pytest.fixture
def ip_displays(monkeypatch):
    """An IPython shell with the extension, and the list of objects it displays."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.testing.globalipapp import start_ipython
    # start_ipython() returns the shell only on its first call in a process (None after).
    shell = start_ipython() or InteractiveShell.instance()
    shell.run_line_magic("load_ext", "supermachine_jupyter")
    shown = []
    real_format = shell.display_formatter.format

    def recording_format(obj, *args, **kwargs):
        shown.append(obj)
        return real_format(obj, *args, **kwargs)

    monkeypatch.setattr(shell.display_formatter, "format", recording_format)
    return shell, shown


def test_vm_magics_show_the_dashboard(ip_displays, capsys):
    shell, shown = ip_displays
    magics = shell._supermachine_magics
    try:
        shell.run_cell_magic("vm", "--name wpanel --engine qemu --balloon --panel --quiet",
                             "echo via-panel > /dev/console; echo done")
        assert "done" in capsys.readouterr().out
        cell_dashboards = [obj for obj in shown if isinstance(obj, VmDashboard)]
        assert len(cell_dashboards) == 1
        vm = magics.vms["wpanel"]
        dashboard = cell_dashboards[0]
        assert dashboard.vm is vm and dashboard.balloon is not None
        # displayed before the command ran, so its console followed the command's output
        assert wait_for(lambda: "via-panel" in dashboard.console.text, 5)
        assert dashboard.form.config is not vm.config
        # the form shows the numbers the VM has, not "default" (the cell gave no --memory)
        assert dashboard.form.config == vm.config.replace(memory_mib=vm.memory_mib,
                                                          vcpus=vm.vcpus)
        assert not dashboard.form.memory_default.value
        assert dashboard.form.memory.value == vm.memory_mib == 256
        # --balloon --panel opens on the balloon chart, not the console
        assert dashboard.tabs.selected_index == TAB_TITLES.index("Balloon")

        shown.clear()
        result = shell.run_cell("%vm panel wpanel")
        assert result.success, result.error_in_exec
        assert isinstance(result.result, VmDashboard) and result.result.vm is vm
        assert any(obj is result.result for obj in shown)       # shown as the cell's output
        named_dashboard = result.result

        failed = shell.run_cell("%vm panel nosuchvm")
        assert "no VM named 'nosuchvm'" in str(failed.error_in_exec)

        # closing a dashboard ends its threads and leaves the VM alone
        named_threads = named_dashboard.threads()
        assert len(named_threads) == 4
        named_dashboard.close()
        assert_threads_end(named_threads)
        assert vm.state == "running"

        threads = dashboard.threads()
        assert len(threads) == 4
        shell.run_line_magic("vm", "stop wpanel")
        assert_threads_end(threads)
    finally:
        if "wpanel" in magics.vms:
            shell.run_line_magic("vm", "stop wpanel")

