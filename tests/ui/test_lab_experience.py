"""End to end, as a teacher would use it in JupyterLab (headless Chromium, light and dark):

- the sidebar shows a VM while it boots, lists the current notebook's VMs by default (a
  toggle shows the machine's), and asks before stopping another notebook's VM;
- the status-bar item counts this notebook's VMs and their host memory;
- the balloon field of a card answers -5 with an inline message, and a target set from a
  card shows in the notebook's balloon panel (status and a marker on the chart);
- ``%%vm --balloon --panel`` opens on the Balloon tab, and the chart's plot follows the
  theme: a pixel of the screenshot is light in the light theme and dark in the dark one;
- the config form answers an out-of-range memory size with an inline error naming the range.

The JupyterLab server and browser are the fixtures of ``test_sidebar.py`` (see
``conftest.py``; one server per module). Screenshots go to the test's tmp dir; with ``SUPERMACHINE_UPDATE_SCREENSHOTS=1``
they replace ``docs/lab-*.png``.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import time
import urllib.request
from pathlib import Path

from tests.ui.test_sidebar import (
    DOCS,
    TOKEN,
    UPDATE_SCREENSHOTS,
    _api,
    _notebook,
    _screenshot,
    _set_theme,
    _show_failure,
)

CLASS_A = [
    ("%load_ext supermachine_jupyter\n"
     "%config VmMagics.snapshot_cache = False   # a real boot: the sidebar shows it booting"),
    "%%vm --name lesson --memory 256 --balloon --panel\necho booted-lesson",
    "from supermachine_jupyter.widgets import VmConfigForm\nform = VmConfigForm()\nform",
]
CLASS_B = [
    "%load_ext supermachine_jupyter\n%config VmMagics.snapshot_cache = False",
    "%%vm --name neighbour --memory 192\necho booted-neighbour",
]


def _open(page, path: str):
    """Open the notebook ``path`` (it becomes the current one); its panel, once its kernel
    is idle."""
    page.evaluate("async path => { await window.jupyterapp.commands.execute("
                  "'docmanager:open', {path}); return null; }", path)  # not the widget
    page.wait_for_function(
        "path => window.jupyterapp.shell.currentWidget?.context?.path === path", arg=path,
        timeout=30_000)
    panel_id = page.evaluate("() => window.jupyterapp.shell.currentWidget.id")
    panel = page.locator(f"[id='{panel_id}']")
    panel.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(
        timeout=60_000)
    return panel


def _run(page, panel, index: int) -> None:
    """Click into cell ``index`` of ``panel`` and press Shift+Enter (retried until the
    prompt leaves "[ ]", as in test_sidebar)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    cell = panel.locator(".jp-Cell").nth(index)
    for attempt in range(3):
        cell.locator(".jp-InputArea-editor").click()
        page.wait_for_function("el => el.classList.contains('jp-mod-active')",
                               arg=cell.element_handle(), timeout=10_000)
        page.keyboard.press("Shift+Enter")
        try:
            cell.locator(".jp-InputPrompt").filter(has_not_text="[ ]").wait_for(timeout=5_000)
            return
        except PlaywrightTimeout:
            if attempt == 2:
                raise


def _pixel(page, png: bytes, x: int, y: int, size: int = 8) -> tuple[int, int, int]:
    """The most common colour of a ``size``² square at (x, y) of a PNG screenshot, decoded
    by the browser itself (a canvas), so the check sees what was rendered."""
    rgb = page.evaluate(
        """async ([b64, x, y, size]) => {
            const img = new Image();
            img.src = 'data:image/png;base64,' + b64;
            await img.decode();
            const canvas = document.createElement('canvas');
            canvas.width = img.width; canvas.height = img.height;
            const ctx = canvas.getContext('2d');
            ctx.drawImage(img, 0, 0);
            const data = ctx.getImageData(x, y, size, size).data;
            const counts = new Map();
            for (let i = 0; i < data.length; i += 4) {
                const key = `${data[i]},${data[i + 1]},${data[i + 2]}`;
                counts.set(key, (counts.get(key) || 0) + 1);
            }
            return [...counts.entries()].sort((a, b) => b[1] - a[1])[0][0];
        }""", [base64.b64encode(png).decode(), x, y, size])
    return tuple(int(v) for v in rgb.split(","))


def _on_chart(action):
    """``action()`` on the balloon chart, again if the chart was replaced under it (the panel
    redraws its SVG at every sample, detaching the old one)."""
    from playwright.sync_api import Error as PlaywrightError
    for attempt in range(5):
        try:
            return action()
        except PlaywrightError as exc:
            if "not attached" not in str(exc) or attempt == 4:
                raise


def _plot_background(page, chart) -> tuple[int, int, int]:
    """The rendered colour inside the balloon chart's plot, near its top-left corner (clear
    of the lines, grid and markers). The chart's SVG is replaced at every sample, so the
    page is shot at where the plot is, not the element itself."""
    box = _on_chart(lambda: chart.locator("rect.sm-chart-plot").bounding_box())
    png = page.screenshot(clip={"x": box["x"] + 2, "y": box["y"] + 2, "width": 12,
                                "height": 12})
    return _pixel(page, png, 1, 1)


def _element_shot(locator, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    locator.screenshot(path=str(path))
    if UPDATE_SCREENSHOTS:
        shutil.copy(path, DOCS / name)


def _luminance(rgb: tuple[int, int, int]) -> float:
    r, g, b = rgb
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _vms(lab) -> dict[str, dict]:
    return {vm["name"]: vm for vm in _api(lab["base"], "/supermachine/api/vms")["vms"]}


def _stop_all(lab) -> None:
    """Stop every VM the page's kernel left (a failure must not leave VMs behind)."""
    for vm in _vms(lab).values():
        request = urllib.request.Request(
            f"{lab['base']}/supermachine/api/vms/{vm['id']}/stop", method="POST",
            headers={"Authorization": f"token {TOKEN}"})
        try:
            urllib.request.urlopen(request, timeout=60).close()
        except OSError:
            pass


def test_a_class_with_two_notebooks(lab, browser, tmp_path):
    root = Path(lab["root"])
    (root / "class-a.ipynb").write_text(json.dumps(_notebook(CLASS_A)))
    (root / "class-b.ipynb").write_text(json.dumps(_notebook(CLASS_B)))
    page = browser.new_page(viewport={"width": 1360, "height": 860})
    messages: list[str] = []
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
    try:
        page.goto(f"{lab['base']}/lab?token={TOKEN}")
        page.wait_for_selector("li.lm-TabBar-tab[data-id='supermachine-vms']", timeout=60_000)
        a = _open(page, "class-a.ipynb")
        page.click("li.lm-TabBar-tab[data-id='supermachine-vms']")
        sidebar = page.locator(".sm-VmSidebar")
        sidebar.locator(".sm-VmSidebar-empty").wait_for(timeout=20_000)
        status = page.locator(".sm-VmStatus")
        status.wait_for(timeout=20_000)
        assert status.inner_text() == "MicroVMs: 0", status.inner_text()
        assert sidebar.locator(
            ".sm-VmSidebar-scope[data-scope='notebook'][aria-pressed='true']").count() == 1

        # -- the sidebar shows the VM from the moment it starts booting ------------------
        _run(page, a, 0)
        _run(page, a, 1)
        clicked = time.monotonic()
        lesson = sidebar.locator(".sm-VmCard[data-vm-name='lesson']")
        sidebar.locator(".sm-VmCard[data-vm-name='lesson'][data-state='booting']").wait_for(
            timeout=20_000)
        seen_after = time.monotonic() - clicked
        output = a.locator(".jp-Cell").nth(1).locator(".jp-OutputArea")
        assert "booted-lesson" not in output.inner_text(), "the card came after the boot"
        assert "booting" in lesson.locator(".sm-VmCard-meta").inner_text()
        assert lesson.locator(".sm-VmCard-stop").is_disabled()
        assert "booting" in status.inner_text()
        output.get_by_text("booted-lesson").wait_for(timeout=120_000)
        sidebar.locator(".sm-VmCard[data-vm-name='lesson'][data-state='running']").wait_for(
            timeout=10_000)
        print(f"card shown {seen_after:.1f} s after the cell started, while booting")

        # -- %%vm --balloon --panel opens on the balloon chart ---------------------------
        tab = output.locator(".lm-TabBar-tab.lm-mod-current")
        tab.wait_for(timeout=30_000)
        assert tab.inner_text().strip() == "Balloon"
        chart = output.locator("svg.sm-chart")
        chart.locator("polyline").first.wait_for(state="attached", timeout=30_000)

        # -- the status bar: this notebook's VMs and their host memory ------------------
        page.wait_for_function(
            "() => /^MicroVMs: 1 · host \\d+ MiB$/.test("
            "document.querySelector('.sm-VmStatus').textContent)", timeout=20_000)
        host_mib = int(re.search(r"host (\d+) MiB", status.inner_text()).group(1))
        api_host = _vms(lab)["lesson"]["host_memory_bytes"] / 2**20
        assert abs(host_mib - api_host) < 64 + api_host / 4, (host_mib, api_host)
        assert "lesson — running, 256 MiB guest" in status.get_attribute("title")

        # -- the card's balloon field: -5 is answered inline, no request is sent --------
        field = lesson.locator(".sm-Balloon-input")
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url) if "/balloon" in r.url else None)
        field.fill("-5")
        lesson.locator(".sm-Balloon-form button").click()
        error = lesson.locator(".sm-Balloon-error")
        error.wait_for(timeout=5_000)
        assert error.inner_text().startswith("Enter a whole number of MiB from 0 to 255"), \
            error.inner_text()
        assert field.get_attribute("aria-invalid") == "true" and requests == []
        assert lesson.locator(".sm-VmCard-message").inner_text() == ""

        # ... 96 is sent; the notebook's panel names the new target and marks it
        field.fill("96")
        assert error.inner_text() == ""
        lesson.locator(".sm-Balloon-form button").click()
        lesson.locator(".sm-Balloon-label", has_text="balloon 96 MiB ·").wait_for(timeout=60_000)
        assert len(requests) == 1
        output.get_by_text("target set to 96 MiB elsewhere").wait_for(timeout=20_000)
        chart.locator(".sm-chart-marker").first.wait_for(state="attached", timeout=10_000)
        assert "→96" in _on_chart(chart.inner_html)
        page.wait_for_timeout(4_000)          # a few samples after the change, for the picture

        # -- the chart follows the theme: a light plot in light, a dark one in dark -------
        output.locator(".widget-tab").scroll_into_view_if_needed()
        light = _plot_background(page, chart)
        assert _luminance(light) > 230, f"light theme: plot background {light}"
        _screenshot(page, tmp_path, "lab-balloon-class.png")
        _element_shot(output.locator(".widget-tab"), tmp_path, "lab-balloon-panel.png")
        _set_theme(page, "JupyterLab Dark")
        dark = _plot_background(page, chart)
        assert _luminance(dark) < 40, f"dark theme: plot background {dark}"
        legend = chart.locator(".sm-chart-legend").first
        legend_fill = _on_chart(lambda: legend.evaluate("el => getComputedStyle(el).fill"))
        fill = tuple(int(v) for v in re.findall(r"[\d.]+", legend_fill)[:3])
        assert _luminance(fill) > 180, f"legend text {legend_fill} is not readable on dark"
        _screenshot(page, tmp_path, "lab-balloon-class-dark.png")
        _element_shot(output.locator(".widget-tab"), tmp_path, "lab-balloon-panel-dark.png")
        _set_theme(page, "JupyterLab Light")

        # -- another notebook: its VM is listed there, not here ----------------------------
        b = _open(page, "class-b.ipynb")
        assert status.inner_text() == "MicroVMs: 0"
        _run(page, b, 0)
        _run(page, b, 1)
        neighbour = sidebar.locator(".sm-VmCard[data-vm-name='neighbour']")
        sidebar.locator(".sm-VmCard[data-vm-name='neighbour'][data-state='booting']").wait_for(
            timeout=20_000)
        assert lesson.count() == 0                       # filtered: not this notebook's
        b.locator(".jp-Cell").nth(1).get_by_text("booted-neighbour").wait_for(timeout=120_000)
        sidebar.locator(".sm-VmCard[data-vm-name='neighbour'][data-state='running']").wait_for(
            timeout=10_000)
        assert sidebar.locator(".sm-VmSidebar-count").inner_text() == "1 of 2"

        # back in class A: its VM only, until "All on this machine"
        page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text="class-a.ipynb").click()
        lesson.wait_for(timeout=10_000)
        assert neighbour.count() == 0
        sidebar.locator(".sm-VmSidebar-scope[data-scope='all']").click()
        neighbour.wait_for(timeout=5_000)
        assert sidebar.locator(".sm-VmSidebar-count").inner_text() == "2"
        assert "from class-b.ipynb" in neighbour.locator(".sm-VmCard-owner").inner_text()

        # -- stopping another notebook's VM asks first -------------------------------------
        neighbour.locator(".sm-VmCard-stop").click()
        dialog = page.locator(".jp-Dialog")
        dialog.wait_for(timeout=10_000)
        assert "Stop neighbour?" in dialog.inner_text()
        assert "class-b.ipynb" in dialog.inner_text()
        _screenshot(page, tmp_path, "lab-stop-confirmation.png")
        dialog.locator(".jp-Dialog-button.jp-mod-reject").click()
        dialog.wait_for(state="detached", timeout=10_000)
        page.wait_for_timeout(1_500)
        assert _vms(lab)["neighbour"]["state"] == "running"   # cancelled: still up
        neighbour.locator(".sm-VmCard-stop").click()
        dialog.locator(".jp-Dialog-button.jp-mod-warn").click()
        neighbour.wait_for(state="detached", timeout=60_000)
        assert "neighbour" not in _vms(lab)

        # this notebook's own VM stops without a question
        sidebar.locator(".sm-VmSidebar-scope[data-scope='notebook']").click()
        lesson.locator(".sm-VmCard-stop").click()
        lesson.wait_for(state="detached", timeout=60_000)
        assert page.locator(".jp-Dialog").count() == 0
        assert _vms(lab) == {}
        page.wait_for_function(
            "() => document.querySelector('.sm-VmStatus').textContent === 'MicroVMs: 0'",
            timeout=10_000)

        # -- the config form: 10 MiB is an inline error naming the range -------------------
        _run(page, a, 2)
        form = a.locator(".jp-Cell").nth(2).locator(".jp-OutputArea")
        form.locator(".widget-checkbox", has_text="default").first.locator("input").click()
        size = form.locator("input[type='number']").first
        size.wait_for(timeout=10_000)
        page.wait_for_function("el => !el.disabled", arg=size.element_handle(), timeout=10_000)
        size.fill("10")
        size.press("Enter")
        message = form.get_by_text(re.compile(r"memory_mib must be None or an integer from 64 "
                                              r"to \d+ MiB \(host RAM\), got 10"))
        message.wait_for(timeout=20_000)
        assert size.input_value() == "10"               # kept as typed, not clamped to 64
        _element_shot(form, tmp_path, "lab-config-form-error.png")

        errors = [m for m in messages if m.startswith("pageerror")
                  or ("supermachine" in m and m.startswith("error"))]
        assert not errors, errors
    except Exception:
        _show_failure(page, tmp_path, messages, lab)
        raise
    finally:
        _stop_all(lab)
        page.close()
