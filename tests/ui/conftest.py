"""The UI tests' fixtures, shared by every module here: ``lab`` (a JupyterLab server of its
own per module: isolated config, data and runtime dir, no news pop-up) and ``browser``
(Debian's headless Chromium driven by Playwright). They live in ``test_sidebar.py``, the
first UI test, and are re-exported here so other modules get them without importing."""

from tests.ui.test_sidebar import browser, lab  # noqa: F401 - pytest finds fixtures by name
