"""End to end: a real JupyterLab (subprocess, random port, token) in headless Chromium
(Debian's ``chromium`` driven by Playwright, no downloaded browser). A notebook starts a
named VM with ``%%vm``; its card appears in the "MicroVMs" sidebar; the balloon is set from
the card; Stop on the card stops the VM, and ``%vm list`` in the kernel no longer lists it.

Screenshots go to the test's tmp dir; with ``SUPERMACHINE_UPDATE_SCREENSHOTS=1`` they also
replace ``docs/labextension-sidebar*.png`` (the ones README shows).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("SUPERMACHINE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-dev-shm-usage"]
DOCS = Path(__file__).resolve().parents[2] / "docs"
UPDATE_SCREENSHOTS = os.environ.get("SUPERMACHINE_UPDATE_SCREENSHOTS") == "1"
TOKEN = "sm-ui-test-" + os.urandom(8).hex()

NOTEBOOK_CELLS = [
    "%load_ext supermachine_jupyter\nimport os\ndata = os.path.abspath('data')",
    "%%vm --name demo --memory 256 --balloon --mount {data}:data:/mnt/data\n"
    "uname -sr; cat /mnt/data/hello.txt",
    "%vm list",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(cells: list[str]) -> dict:
    return {"nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                        "language": "python"}},
            "cells": [{"cell_type": "code", "id": f"cell{i}", "metadata": {},
                       "execution_count": None, "outputs": [], "source": src}
                      for i, src in enumerate(cells)]}


def _api(base: str, path: str) -> dict:
    req = urllib.request.Request(f"{base}{path}", headers={"Authorization": f"token {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def lab(tmp_path_factory, guest_image):
    """A JupyterLab server with an isolated config, data and runtime dir."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make setup does)")
    top = tmp_path_factory.mktemp("lab")
    root, config, runtime = top / "root", top / "config", top / "runtime"
    for d in (root / "data", config / "labconfig", runtime):
        d.mkdir(parents=True)
    (root / "data" / "hello.txt").write_text("hello from the host\n")
    (root / "sidebar-demo.ipynb").write_text(json.dumps(_notebook(NOTEBOOK_CELLS)))
    # No "receive news?" toast over the screenshots.
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    env = {k: v for k, v in os.environ.items() if k != "SUPERMACHINE_REGISTRY_DIR"}
    env.update(JUPYTER_CONFIG_DIR=str(config), JUPYTER_RUNTIME_DIR=str(runtime),
               JUPYTERLAB_SETTINGS_DIR=str(top / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(top / "workspaces"))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(top / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
         "--ServerApp.allow_root=True", "--LabApp.expose_app_in_browser=True",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail("jupyter lab exited:\n" + (top / "lab.log").read_text()[-3000:])
            try:
                _api(base, "/api/status")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("jupyter lab did not answer:\n" +
                                (top / "lab.log").read_text()[-3000:])
                time.sleep(0.3)
        with urllib.request.urlopen(f"{base}/lab?token={TOKEN}", timeout=30) as response:
            page_config = response.read().decode()
        if "supermachine-jupyter" not in page_config:
            pytest.fail("JupyterLab does not load the supermachine-jupyter labextension: "
                        "`make setup` builds it and links it into the venv")
        yield {"base": base, "root": root, "log": top / "lab.log", "dir": top}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                      args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def _screenshot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path))
    if UPDATE_SCREENSHOTS:
        DOCS.mkdir(exist_ok=True)
        shutil.copy(path, DOCS / name)


def _show_failure(page, tmp_path: Path, messages: list[str], lab: dict | None = None) -> None:
    """What a failed UI test leaves to look at: a screenshot, the page's last console
    messages and (given ``lab``) the end of JupyterLab's log."""
    page.screenshot(path=str(tmp_path / "failure.png"))
    print("\n".join(messages[-40:]))
    if lab is not None:
        print(Path(lab["log"]).read_text()[-4000:])


def _set_theme(page, theme: str) -> None:
    page.evaluate("theme => window.jupyterapp.commands.execute('apputils:change-theme', "
                  "{theme})", theme)
    light = "true" if theme == "JupyterLab Light" else "false"
    page.wait_for_selector(f"body[data-jp-theme-light='{light}']", state="attached",
                           timeout=20_000)
    page.wait_for_timeout(500)      # let the theme's CSS settle before a screenshot


def _run_cell(page, index: int) -> None:
    """Click into a cell and press Shift+Enter, as a person would; a keypress that lands
    before the editor is ready is retried (the prompt must leave "[ ]")."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
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


def test_sidebar_lists_a_notebook_vm_and_stops_it(lab, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1360, "height": 820})
    messages: list[str] = []
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
    try:
        page.goto(f"{lab['base']}/lab/tree/sidebar-demo.ipynb?token={TOKEN}")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']",
                               timeout=60_000)

        # The sidebar first shows how to start a VM.
        page.click("li.lm-TabBar-tab[data-id='supermachine-vms']")
        page.wait_for_selector(".sm-VmSidebar-empty:visible", timeout=20_000)
        assert "%%vm --name demo" in page.inner_text(".sm-VmSidebar-empty")

        _run_cell(page, 0)
        _run_cell(page, 1)
        out = page.locator(".jp-Notebook .jp-Cell").nth(1).locator(".jp-OutputArea")
        out.get_by_text("exit 0").wait_for(timeout=120_000)
        assert "hello from the host" in out.inner_text()

        # The card (listed since the VM started booting) shows it running (polling, 1 s).
        card = page.locator(".sm-VmCard[data-vm-name='demo']")
        page.locator(".sm-VmCard[data-vm-name='demo'][data-state='running']").wait_for(
            timeout=20_000)
        assert card.locator(".sm-VmCard-state").inner_text() == "running"
        meta = card.locator(".sm-VmCard-meta").inner_text()
        assert "256 MiB" in meta and "1 vCPU" in meta, meta
        assert "from sidebar-demo.ipynb" in card.locator(".sm-VmCard-owner").inner_text()
        (listed,) = _api(lab["base"], "/supermachine/api/vms")["vms"]
        kernels = [k["id"] for k in _api(lab["base"], "/api/kernels")]
        assert listed["kernel_id"] in kernels and listed["notebook"].endswith("sidebar-demo.ipynb")
        card.locator(".sm-Device-path", has_text="/mnt/data").wait_for(timeout=10_000)

        # The balloon, set from the card (a browser POST: token + XSRF rules apply).
        card.locator(".sm-Balloon-input").fill("64")
        card.locator(".sm-Balloon-form button").click()
        card.locator(".sm-Balloon-label", has_text="balloon 64 MiB ·").wait_for(timeout=30_000)
        card.locator(".sm-Balloon-label", has_text="guest uses").wait_for(timeout=30_000)
        page.wait_for_timeout(600)          # the bar's width transition
        _screenshot(page, tmp_path, "labextension-sidebar.png")
        _set_theme(page, "JupyterLab Dark")
        _screenshot(page, tmp_path, "labextension-sidebar-dark.png")
        _set_theme(page, "JupyterLab Light")

        # Stop from the card: the card goes, the VM is stopped in the kernel.
        card.locator(".sm-VmCard-stop").click()
        card.wait_for(state="detached", timeout=60_000)
        page.wait_for_selector(".sm-VmSidebar-empty:visible", timeout=10_000)
        assert _api(lab["base"], "/supermachine/api/vms")["vms"] == []

        _run_cell(page, 2)
        listing = page.locator(".jp-Notebook .jp-Cell").nth(2).locator(".jp-OutputArea")
        listing.get_by_text("no named VMs").wait_for(timeout=30_000)
        assert "demo" not in listing.inner_text()
        _screenshot(page, tmp_path, "labextension-sidebar-empty.png")
        errors = [m for m in messages if m.startswith("pageerror") or "supermachine" in m
                  and m.startswith("error")]
        assert not errors, errors
    except Exception:
        _show_failure(page, tmp_path, messages, lab)
        raise
    finally:
        page.close()
