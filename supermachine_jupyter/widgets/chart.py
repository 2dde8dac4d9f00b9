"""A dependency-free line chart: inline SVG (polylines) for an ``ipywidgets.HTML``.

The balloon panel redraws it once per sample; an SVG string is a few kilobytes, so the
update is one small comm message and needs no JavaScript, matplotlib or image encoding.

Colours come from JupyterLab's theme variables (``var(--jp-…, fallback)`` in ``style``
attributes, where CSS variables apply), so the plot is light in the light theme and dark in
the dark one; the fallbacks are the light theme's, for a notebook rendered outside
JupyterLab (nbconvert, GitHub).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from html import escape

#: Theme colours of the chart's furniture (JupyterLab variables with light-theme fallbacks).
PLOT_BACKGROUND = "var(--jp-layout-color0, #ffffff)"
PLOT_BORDER = "var(--jp-border-color1, #bdbdbd)"
GRID_COLOUR = "var(--jp-border-color2, #e0e0e0)"
TEXT_COLOUR = "var(--jp-ui-font-color1, rgba(0,0,0,0.87))"
MUTED_TEXT_COLOUR = "var(--jp-ui-font-color2, rgba(0,0,0,0.54))"
MARKER_COLOUR = "var(--jp-ui-font-color2, rgba(0,0,0,0.54))"

#: Pixels: the chart's margins around the plot, and one legend row.
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 48, 12, 22, 20
LEGEND_ROW_PX = 16
#: Roughly how wide one character of the 11 px sans-serif legend is, to lay the legend out.
LEGEND_CHAR_PX = 6.2
#: Nice x-tick spacings in seconds; the first giving at most ``MAX_X_TICKS`` ticks is used.
X_TICK_STEPS_S = (5, 10, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)
MAX_X_TICKS = 6


@dataclasses.dataclass(frozen=True)
class Series:
    """One line of the chart: a label for the legend, a CSS colour (theme variables
    welcome), optional dashes, the values (one per timestamp; None leaves a gap) and a line
    width in pixels."""
    label: str
    colour: str
    values: Sequence[float | None]
    dashed: bool = False
    width: float = 1.8


@dataclasses.dataclass(frozen=True)
class Marker:
    """A vertical line at ``time`` with a short ``label`` at its top (e.g. a new target)."""
    time: float
    label: str


def _duration(seconds: float) -> str:
    """``90`` → ``'1.5 min'``, ``30`` → ``'30 s'`` (axis labels)."""
    if seconds >= 60 and seconds % 30 == 0:
        minutes = seconds / 60
        return f"{minutes:g} min"
    return f"{seconds:.0f} s"


def _legend_rows(series: Sequence[Series], width: int) -> list[list[tuple[float, Series]]]:
    """The legend's entries placed left to right, wrapping to a new row when full."""
    rows: list[list[tuple[float, Series]]] = [[]]
    x = 8.0
    for line in series:
        needed = 26 + LEGEND_CHAR_PX * len(line.label) + 12
        if rows[-1] and x + needed > width:
            rows.append([])
            x = 8.0
        rows[-1].append((x, line))
        x += needed
    return rows


def _stroke(colour: str, width: float, dashed: bool) -> str:
    dash = ";stroke-dasharray:5,3" if dashed else ""
    return f"style='stroke:{colour};stroke-width:{width:g}{dash};fill:none'"


def line_chart(times: Sequence[float], series: Sequence[Series], y_max: float, *,
               y_unit: str = "MiB", width: int = 640, height: int = 200,
               window_s: float | None = None, markers: Sequence[Marker] = ()) -> str:
    """An SVG line chart of ``series`` over ``times`` (seconds; the newest at the right).

    The x axis spans ``window_s`` seconds ending at the last timestamp (default: the
    history's span), ticked at round intervals; the y axis 0 … ``y_max``, its unit above the tick
    labels. ``markers`` draw dashed vertical lines with a
    label. The legend sits under the plot and wraps to more rows when it must; ``height`` is
    the plot's part, the legend adds to it. With fewer than two samples the chart shows its
    axes and a "waiting for samples" note.
    """
    left, right, top, bottom = MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM
    legend = _legend_rows(series, width)
    total_height = height + LEGEND_ROW_PX * len(legend)
    plot_w, plot_h = width - left - right, height - top - bottom
    y_max = max(float(y_max), 1.0)
    parts = [(f"<svg xmlns='http://www.w3.org/2000/svg' class='sm-chart' width='{width}' "
              f"height='{total_height}' viewBox='0 0 {width} {total_height}' "
              "style='font:11px sans-serif;display:block'>"),
             (f"<rect class='sm-chart-plot' x='{left}' y='{top}' width='{plot_w}' "
              f"height='{plot_h}' style='fill:{PLOT_BACKGROUND};stroke:{PLOT_BORDER}'/>")]
    for quarter in range(5):
        value = y_max * quarter / 4
        y = top + plot_h - plot_h * quarter / 4
        if 0 < quarter < 4:
            parts.append(f"<line x1='{left}' y1='{y:.1f}' x2='{left + plot_w}' y2='{y:.1f}' "
                         f"style='stroke:{GRID_COLOUR}'/>")
        parts.append(f"<text x='{left - 5}' y='{y + 4:.1f}' text-anchor='end' "
                     f"style='fill:{MUTED_TEXT_COLOUR}'>{value:.0f}</text>")
    # The unit above the tick column, clear of the top tick's label.
    parts.append(f"<text x='{left - 5}' y='{top - 8}' text-anchor='end' "
                 f"style='fill:{MUTED_TEXT_COLOUR}'>{escape(y_unit)}</text>")
    axis_y = top + plot_h + 14
    if len(times) >= 2:
        end = times[-1]
        span = window_s if window_s else max(end - times[0], 1e-9)
        start = end - span

        def x_of(t: float) -> float:
            return left + plot_w * (t - start) / span

        step = next((s for s in X_TICK_STEPS_S if span / s <= MAX_X_TICKS), X_TICK_STEPS_S[-1])
        ago = step
        while ago < span - step / 3:      # no tick crowding the left edge
            x = x_of(end - ago)
            parts.append(f"<line x1='{x:.1f}' y1='{top + plot_h}' x2='{x:.1f}' "
                         f"y2='{top + plot_h + 3}' style='stroke:{PLOT_BORDER}'/>")
            parts.append(f"<text x='{x:.1f}' y='{axis_y}' text-anchor='middle' "
                         f"style='fill:{MUTED_TEXT_COLOUR}'>−{_duration(ago)}</text>")
            ago += step
        parts.append(f"<text x='{left + plot_w}' y='{axis_y}' text-anchor='end' "
                     f"style='fill:{MUTED_TEXT_COLOUR}'>now</text>")
        for marker in markers:
            if not start <= marker.time <= end:
                continue
            x = x_of(marker.time)
            parts.append(f"<line class='sm-chart-marker' x1='{x:.1f}' y1='{top}' x2='{x:.1f}' "
                         f"y2='{top + plot_h}' {_stroke(MARKER_COLOUR, 1, True)}/>")
            parts.append(f"<text x='{x + 3:.1f}' y='{top + 11}' "
                         f"style='fill:{MUTED_TEXT_COLOUR}'>{escape(marker.label)}</text>")
        for line in series:
            for segment in _segments(times, line.values):
                points = " ".join(
                    f"{x_of(t):.1f},"
                    f"{top + plot_h - plot_h * min(max(v, 0.0), y_max) / y_max:.1f}"
                    for t, v in segment if t >= start)
                if points:
                    parts.append(f"<polyline {_stroke(line.colour, line.width, line.dashed)} "
                                 f"points='{points}'/>")
    else:
        parts.append(f"<text x='{left + plot_w / 2}' y='{top + plot_h / 2}' "
                     f"text-anchor='middle' style='fill:{MUTED_TEXT_COLOUR}'>"
                     "waiting for samples…</text>")
    for row_number, row in enumerate(legend):
        y = height + LEGEND_ROW_PX * row_number + 4
        for x, line in row:
            parts.append(f"<line x1='{x:.1f}' y1='{y:.1f}' x2='{x + 20:.1f}' y2='{y:.1f}' "
                         f"{_stroke(line.colour, 2.5, line.dashed)}/>")
            parts.append(f"<text class='sm-chart-legend' x='{x + 26:.1f}' y='{y + 4:.1f}' "
                         f"style='fill:{TEXT_COLOUR}'>{escape(line.label)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _segments(times: Sequence[float], values: Sequence[float | None]):
    """Runs of consecutive (time, value) pairs without None (a None breaks the line)."""
    segment: list[tuple[float, float]] = []
    for t, v in zip(times, values):
        if v is None:
            if segment:
                yield segment
            segment = []
        else:
            segment.append((t, float(v)))
    if segment:
        yield segment
