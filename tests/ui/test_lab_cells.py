"""End to end, a ``%%vm`` cell as a JupyterLab user meets it (headless Chromium):

- JupyterLab's interrupt button (the notebook toolbar's ■) ends a ``%%vm --name demo`` cell
  within seconds; the VM it ran in stays: its sidebar card stays "running" with the same
  owner, the same engine process and a growing uptime, and the next cell reads the host
  mount and the balloon (set from the card) still inflates;
- the body of a ``%%vm`` cell is highlighted as shell (``for``/``do``/``done`` as keywords,
  ``$HOME`` as a variable, ``echo`` as a command), a Python cell keeps Python, and typing
  ``%%vm`` into a Python cell switches it (undo switches back).

The JupyterLab server and browser are the fixtures of ``test_sidebar.py`` (one server per
module, see ``conftest.py``). Screenshots go to the test's tmp dir; with
``SUPERMACHINE_UPDATE_SCREENSHOTS=1`` they replace ``docs/lab-interrupt.png`` and
``docs/lab-vm-cell-shell*.png``.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from tests.helpers import engine_pids
from tests.ui.test_lab_experience import _open, _run, _stop_all, _vms
from tests.ui.test_sidebar import (
    DOCS,
    TOKEN,
    UPDATE_SCREENSHOTS,
    _notebook,
    _screenshot,
    _set_theme,
    _show_failure,
)

INTERRUPT_CELLS = [
    "%load_ext supermachine_jupyter\nimport os\ndata = os.path.abspath('data')",
    "%%vm --name demo --balloon --mount {data}:data:/mnt/data\ncat /mnt/data/hello.txt",
    "%%vm --name demo\necho started; sleep 120; echo never",
    "%%vm --name demo\ncat /mnt/data/hello.txt; echo after-the-interrupt",
]

PYTHON_CELL = "for done in range(3):\n    echo = done  # a Python loop"
VM_CELL = ("%%vm --name demo\n"
           "for f in /mnt/data/*; do\n"
           "  echo \"$f\" $HOME\n"
           "done")
HIGHLIGHT_CELLS = [PYTHON_CELL, VM_CELL, "print('no magic here')"]

# Samples the state of demo's sidebar card ("absent" when it is not shown) until cleared.
WATCH_CARD_JS = """() => { window.__smStates = []; window.__smWatch = setInterval(() => {
    const card = document.querySelector(".sm-VmCard[data-vm-name='demo']");
    window.__smStates.push(card ? card.dataset.state : 'absent'); }, 50); }"""
# Every token of a cell's editor, as rendered: text, colour and weight. CodeMirror draws a
# token as a span under .cm-line; plain text has no span of its own.
TOKENS_JS = """cell => [...cell.querySelectorAll('.cm-content .cm-line span')]
    .filter(s => s.children.length === 0 && s.textContent.trim())
    .map(s => { const st = getComputedStyle(s);
                return [s.textContent, st.color, st.fontWeight]; })"""
# The colour a JupyterLab editor-theme variable resolves to here (as getComputedStyle says).
THEME_COLOUR_JS = """name => { const probe = document.createElement('span');
    probe.style.color = `var(${name})`; document.body.appendChild(probe);
    const colour = getComputedStyle(probe).color; probe.remove(); return colour; }"""


def _console(page) -> list[str]:
    messages: list[str] = []
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
    return messages


def _page_errors(messages: list[str]) -> list[str]:
    return [m for m in messages if m.startswith("pageerror")
            or ("supermachine" in m and m.startswith("error"))]


def test_interrupt_ends_the_cell_and_keeps_the_named_vm(lab, browser, tmp_path):
    (Path(lab["root"]) / "interrupt.ipynb").write_text(json.dumps(_notebook(INTERRUPT_CELLS)))
    page = browser.new_page(viewport={"width": 1360, "height": 820})
    messages = _console(page)
    try:
        page.goto(f"{lab['base']}/lab?token={TOKEN}")
        page.wait_for_selector("li.lm-TabBar-tab[data-id='supermachine-vms']", timeout=60_000)
        nb = _open(page, "interrupt.ipynb")
        page.click("li.lm-TabBar-tab[data-id='supermachine-vms']")
        card = page.locator(".sm-VmCard[data-vm-name='demo']")
        cells = nb.locator(".jp-Cell")

        _run(page, nb, 0)
        _run(page, nb, 1)
        cells.nth(1).locator(".jp-OutputArea").get_by_text("hello from the host").wait_for(
            timeout=120_000)
        page.locator(".sm-VmCard[data-vm-name='demo'][data-state='running']").wait_for(
            timeout=20_000)
        before = _vms(lab)["demo"]
        engines = engine_pids("qemu-system", parent=before["pid"])
        assert len(engines) == 1, f"expected one QEMU child of the kernel, found {engines}"
        assert f"pid {before['pid']}" in card.locator(".sm-VmCard-owner").inner_text()

        # -- a long command, interrupted with the toolbar's stop button -------------------
        _run(page, nb, 2)
        long_cell = cells.nth(2)
        long_out = long_cell.locator(".jp-OutputArea")
        long_out.get_by_text("started").wait_for(timeout=60_000)
        assert long_cell.locator(".jp-InputPrompt").inner_text().strip() == "[*]:"
        # The card's state, sampled every 50 ms from now on: it must never leave "running".
        page.evaluate(WATCH_CARD_JS)
        nb.locator(".jp-Toolbar-item[data-jp-item-name='interrupt'] button, "
                   ".jp-Toolbar-item[data-jp-item-name='interrupt'] jp-button").first.click()
        clicked = time.monotonic()
        nb.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(
            timeout=15_000)
        ended_after = time.monotonic() - clicked
        text = long_out.inner_text()
        assert ended_after < 5, f"the cell ended {ended_after:.1f} s after the interrupt"
        assert "^C interrupted: guest command stopped" in text and "VM demo kept" in text, text
        assert re.search(r"demo: interrupted \(.*\) after \d", text), text
        assert "never" not in text and "Traceback" not in text, text
        assert re.fullmatch(r"\[\d+\]:", long_cell.locator(".jp-InputPrompt").inner_text()
                            .strip())
        print(f"cell ended {ended_after:.1f} s after the interrupt")

        # -- the same VM, still running: same owner, same engine process, uptime grows ----
        page.wait_for_timeout(1_500)                      # a sidebar refresh or two (1 s)
        states = page.evaluate("() => { clearInterval(window.__smWatch); "
                               "return [...new Set(window.__smStates)]; }")
        assert states == ["running"], f"the card went through {states}"
        after = _vms(lab)["demo"]
        assert (after["id"], after["pid"], after["started_at"]) == \
            (before["id"], before["pid"], before["started_at"])
        # The interrupt can take well under 2 s from the first sample: growing is the point.
        assert after["uptime_s"] > before["uptime_s"], (before["uptime_s"], after["uptime_s"])
        assert engine_pids("qemu-system", parent=after["pid"]) == engines
        assert f"pid {before['pid']}" in card.locator(".sm-VmCard-owner").inner_text()
        _screenshot(page, tmp_path, "lab-interrupt.png")

        # -- ... and it works: the mount is there, the balloon inflates --------------------
        _run(page, nb, 3)
        next_out = cells.nth(3).locator(".jp-OutputArea")
        next_out.get_by_text("after-the-interrupt").wait_for(timeout=60_000)
        assert "hello from the host" in next_out.inner_text()
        next_out.get_by_text(re.compile(r"demo: exit 0 after")).wait_for(timeout=10_000)
        assert "VM restored" not in next_out.inner_text()     # not started again
        assert "VM booted" not in next_out.inner_text()
        card.locator(".sm-Balloon-input").fill("64")
        card.locator(".sm-Balloon-form button").click()
        card.locator(".sm-Balloon-label", has_text="balloon 64 MiB ·").wait_for(timeout=60_000)
        stats = _vms(lab)["demo"]["balloon_stats"]
        assert stats["target_mib"] == 64 and stats["actual_mib"] == 64, stats
        assert engine_pids("qemu-system", parent=after["pid"]) == engines
        assert not _page_errors(messages), _page_errors(messages)
    except Exception:
        _show_failure(page, tmp_path, messages, lab)
        raise
    finally:
        _stop_all(lab)
        page.close()


def _tokens(cell) -> dict[str, tuple[str, str]]:
    """A cell's tokens: text → (colour, font weight), the first of each text."""
    tokens: dict[str, tuple[str, str]] = {}
    for text, colour, weight in cell.evaluate(TOKENS_JS):
        tokens.setdefault(text, (colour, weight))
    return tokens


def _cells_shot(page, notebook, tmp_path: Path, name: str) -> None:
    """A screenshot of the notebook's cells and a margin, not the empty page below them."""
    boxes = [notebook.locator(".jp-Cell").nth(i).bounding_box()
             for i in range(notebook.locator(".jp-Cell").count())]
    left, top = min(b["x"] for b in boxes) - 8, min(b["y"] for b in boxes) - 8
    right = max(b["x"] + b["width"] for b in boxes) + 8
    bottom = max(b["y"] + b["height"] for b in boxes) + 8
    path = tmp_path / name
    page.screenshot(path=str(path), clip={"x": left, "y": top, "width": right - left,
                                          "height": bottom - top})
    if UPDATE_SCREENSHOTS:
        shutil.copy(path, DOCS / name)


def _language(cell) -> str | None:
    return cell.locator(".cm-content").get_attribute("data-language")


def test_vm_cell_bodies_are_highlighted_as_shell(lab, browser, tmp_path):
    (Path(lab["root"]) / "highlight.ipynb").write_text(
        json.dumps(_notebook(HIGHLIGHT_CELLS)))
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    messages = _console(page)
    try:
        page.goto(f"{lab['base']}/lab?token={TOKEN}")
        page.wait_for_selector(".jp-LabShell", timeout=60_000)
        nb = _open(page, "highlight.ipynb")           # an IPython kernel: cells are Python
        python_cell, vm_cell, plain_cell = (nb.locator(".jp-Cell").nth(i) for i in range(3))
        vm_cell.locator(".cm-content[data-language='shell']").wait_for(timeout=20_000)
        assert _language(python_cell) == "python" and _language(plain_cell) == "python"

        def colour(variable: str) -> str:
            return page.evaluate(THEME_COLOUR_JS, variable)

        def check(theme: str) -> None:
            keyword = colour("--jp-mirror-editor-keyword-color")
            variable = colour("--jp-mirror-editor-def-color")      # the shell mode's $VAR
            command = colour("--jp-mirror-editor-builtin-color")
            shell, python = _tokens(vm_cell), _tokens(python_cell)
            for word in ("for", "do", "done"):
                assert shell.get(word) == (keyword, "700"), (theme, word, shell)
            assert shell.get("$HOME", (None,))[0] == variable, (theme, shell)
            assert shell.get("echo", (None,))[0] == command, (theme, shell)
            assert shell.get("in", (None,))[0] == keyword, (theme, shell)
            # Python: `for`/`in` are keywords, `done` and `echo` are plain names
            assert python.get("for") == (keyword, "700"), (theme, python)
            assert "done" not in python and "echo" not in python, (theme, python)
            assert "range" in python and python["range"][0] == command, (theme, python)

        check("light")
        _cells_shot(page, nb, tmp_path, "lab-vm-cell-shell.png")
        _set_theme(page, "JupyterLab Dark")
        check("dark")
        _cells_shot(page, nb, tmp_path, "lab-vm-cell-shell-dark.png")
        _set_theme(page, "JupyterLab Light")

        # typing %%vm into a Python cell makes it a shell cell; undo makes it Python again
        plain_cell.locator(".cm-content").click()
        page.keyboard.press("Control+Home")
        page.keyboard.type("%%vm\n")
        plain_cell.locator(".cm-content[data-language='shell']").wait_for(timeout=10_000)
        assert _language(python_cell) == "python"
        page.keyboard.press("Control+z")
        plain_cell.locator(".cm-content[data-language='python']").wait_for(timeout=10_000)
        assert "%%vm" not in plain_cell.locator(".cm-content").inner_text()
        # ... and removing the magic from a %%vm cell does too
        vm_cell.locator(".cm-line").first.click()
        page.keyboard.press("Home")
        page.keyboard.press("Delete")
        vm_cell.locator(".cm-content[data-language='python']").wait_for(timeout=10_000)
        page.keyboard.type("%")
        vm_cell.locator(".cm-content[data-language='shell']").wait_for(timeout=10_000)
        assert not _page_errors(messages), _page_errors(messages)
    except Exception:
        _show_failure(page, tmp_path, messages)
        raise
    finally:
        page.close()
