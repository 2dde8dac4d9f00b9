"""A dependency-free line chart: inline SVG (polylines) for an ``ipywidgets.HTML``.

The balloon panel redraws it once per sample; an SVG string is a few kilobytes, so the
update is one small comm message and needs no JavaScript, matplotlib or image encoding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from html import escape


@dataclasses.dataclass(frozen=True)
class Series:
    """One line of the chart: a label for the legend, a colour, optional dashes, the values
    (one per timestamp; None leaves a gap) and a line width in pixels."""
    label: str
    colour: str
    values: Sequence[float | None]
    dashed: bool = False
    width: float = 1.8


def line_chart(times: Sequence[float], series: Sequence[Series], y_max: float, *,
               y_unit: str = "MiB", width: int = 520, height: int = 180,
               window_s: float | None = None) -> str:
    """An SVG line chart of ``series`` over ``times`` (seconds; the newest at the right).

    The x axis spans ``window_s`` seconds ending at the last timestamp (default: the
    history's span), the y axis 0 … ``y_max``. With fewer than two samples the chart shows
    its axes and a "waiting for samples" note.
    """
    left, right, top, bottom = 44, 8, 8, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    y_max = max(float(y_max), 1.0)
    parts = [(f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
              f"viewBox='0 0 {width} {height}' style='font:10px sans-serif'>"),
             (f"<rect x='{left}' y='{top}' width='{plot_w}' height='{plot_h}' "
              "fill='#fafafa' stroke='#bdbdbd'/>")]
    for quarter in range(5):
        value = y_max * quarter / 4
        y = top + plot_h - plot_h * quarter / 4
        parts.append(f"<line x1='{left}' y1='{y:.1f}' x2='{left + plot_w}' y2='{y:.1f}' "
                     "stroke='#e0e0e0'/>")
        parts.append(f"<text x='{left - 4}' y='{y + 3:.1f}' text-anchor='end' "
                     f"fill='#616161'>{value:.0f}</text>")
    parts.append(f"<text x='4' y='{top + 10}' fill='#616161'>{escape(y_unit)}</text>")
    if len(times) >= 2:
        end = times[-1]
        span = window_s if window_s else max(end - times[0], 1e-9)
        start = end - span
        parts.append(f"<text x='{left}' y='{top + plot_h + 12}' fill='#616161'>"
                     f"−{span:.0f} s</text>")
        parts.append(f"<text x='{left + plot_w}' y='{top + plot_h + 12}' text-anchor='end' "
                     "fill='#616161'>now</text>")
        for line in series:
            for segment in _segments(times, line.values):
                points = " ".join(
                    f"{left + plot_w * (t - start) / span:.1f},"
                    f"{top + plot_h - plot_h * min(max(v, 0.0), y_max) / y_max:.1f}"
                    for t, v in segment if t >= start)
                if points:
                    dash = " stroke-dasharray='5,3'" if line.dashed else ""
                    parts.append(f"<polyline fill='none' stroke='{line.colour}' "
                                 f"stroke-width='{line.width:g}'{dash} points='{points}'/>")
    else:
        parts.append(f"<text x='{left + plot_w / 2}' y='{top + plot_h / 2}' "
                     "text-anchor='middle' fill='#9e9e9e'>waiting for samples…</text>")
    x = left
    for line in series:
        dash = " stroke-dasharray='5,3'" if line.dashed else ""
        parts.append(f"<line x1='{x}' y1='{height - 8}' x2='{x + 18}' y2='{height - 8}' "
                     f"stroke='{line.colour}' stroke-width='2'{dash}/>")
        parts.append(f"<text x='{x + 22}' y='{height - 5}' fill='#424242'>"
                     f"{escape(line.label)}</text>")
        x += 30 + 6 * len(line.label)
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
