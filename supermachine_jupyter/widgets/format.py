"""Text formatting shared by the widgets: sizes, counts, times and the HTML bits they share."""

from __future__ import annotations

import time
from html import escape

MIB = 1024 * 1024

#: Colours used across the panels, so every widget speaks one language: JupyterLab's theme
#: variables (tuned by each theme for its background), with the light theme's Material
#: colours as fallbacks outside JupyterLab. They go into ``style`` attributes only.
ERROR_COLOUR = "var(--jp-error-color1, #c62828)"
OK_COLOUR = "var(--jp-success-color1, #2e7d32)"
MUTED_COLOUR = "var(--jp-ui-font-color2, #616161)"

#: Marks on progress and status lines. Each is in DejaVu Sans and DejaVu Sans Mono (the fonts
#: Debian's Chromium falls back to), so none renders as an empty box: no emoji such as ⏳.
PROGRESS_MARK = "◷"
OK_MARK = "✓"
FAILED_MARK = "✗"
WARNING_MARK = "⚠"


def human_bytes(value: int | None) -> str:
    """``1536`` → ``'1.5 KiB'``; None (not reported) → ``'—'``."""
    if value is None:
        return "—"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def mib(value_bytes: int | None) -> float | None:
    """Bytes → MiB (None stays None)."""
    return None if value_bytes is None else value_bytes / MIB


def mib_text(value_mib: float | None) -> str:
    """``12.34`` → ``'12 MiB'``; None → ``'—'``."""
    return "—" if value_mib is None else f"{value_mib:.0f} MiB"


def count_text(value: int | None) -> str:
    """``1234567`` → ``'1,234,567'``; None → ``'—'``."""
    return "—" if value is None else f"{value:,}"


def clock(timestamp: float) -> str:
    """A wall-clock time as ``HH:MM:SS``."""
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


def error_html(message: str | None) -> str:
    """An inline error line (empty string when there is no error)."""
    if not message:
        return ""
    return f"<span style='color:{ERROR_COLOUR}'>⚠ {escape(message)}</span>"


def note_html(message: str | None, colour: str = MUTED_COLOUR) -> str:
    """A small status line in ``colour`` (empty string when there is nothing to say)."""
    if not message:
        return ""
    return f"<span style='color:{colour};font-size:90%'>{escape(message)}</span>"
