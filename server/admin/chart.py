"""Line charts as SVG text, drawn on the server: no chart library, no script, nothing to pin.

``line_chart`` is pure (series in, markup out). The SVG has a ``viewBox`` and no fixed
size, so it scales to its container (360 px phones included); every label is escaped.
A missing value (``None``: no attempt in that bucket) breaks the line instead of
pretending a zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Sequence

WIDTH, HEIGHT = 360, 180
LEFT, RIGHT, TOP, BOTTOM = 52, 10, 24, 34  # plot margins: y labels, x labels, legend
COLOURS = ("#2563eb", "#dc2626", "#059669", "#d97706")


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float | None]


def nice_max(value: float) -> float:
    """The smallest 1, 2 or 5 x 10^n at or above ``value`` (an axis top a reader can halve)."""
    if value <= 1e-9:  # nothing (or next to nothing) to show: a unit axis
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return float(step * power)
    return float(10 * power)  # unreachable: 10 * power >= value


def _number(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e6 else f"{value:.3g}"


def _fmt(value: float) -> str:
    """A coordinate with at most one decimal (small markup, exact enough at this size)."""
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def line_chart(series: Sequence[Series], labels: Sequence[str], *, title: str,
               unit: str = "", y_max: float | None = None, label_every: int | None = None
               ) -> str:
    """An SVG line chart of ``series`` over the x positions named by ``labels``.

    ``y_max``: a fixed top (100 for percentages); otherwise a nice number above the data.
    ``label_every``: x labels shown every n positions (default: about six in all).
    """
    count = len(labels)
    for s in series:
        if len(s.values) != count:
            raise ValueError(f"series {s.name!r} has {len(s.values)} values for {count} labels")
    present = [v for s in series for v in s.values if v is not None]
    top = y_max if y_max is not None and y_max > 0 else nice_max(max(present, default=0.0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(i: int) -> float:
        return LEFT + (plot_w * i / (count - 1) if count > 1 else plot_w / 2)

    def y(v: float) -> float:
        return TOP + plot_h - plot_h * min(max(v, 0.0), top) / top

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'role="img" class="chart" preserveAspectRatio="xMidYMid meet">',
             f"<title>{escape(title)}</title>"]
    # Grid and y axis labels: 0, half, top.
    for fraction in (0.0, 0.5, 1.0):
        value = top * fraction
        gy = _fmt(y(value))
        parts.append(f'<line x1="{LEFT}" y1="{gy}" x2="{WIDTH - RIGHT}" y2="{gy}" '
                     f'stroke="#d1d5db" stroke-width="{1 if fraction == 0 else 0.5}"/>')
        parts.append(f'<text x="{LEFT - 4}" y="{_fmt(y(value) + 3)}" text-anchor="end" '
                     f'font-size="11" fill="#374151">{escape(_number(value) + unit)}</text>')
    # x labels
    every = label_every or max(1, math.ceil(count / 6))
    for i, label in enumerate(labels):
        if i % every == 0:
            parts.append(f'<text x="{_fmt(x(i))}" y="{HEIGHT - BOTTOM + 12}" '
                         f'text-anchor="middle" font-size="11" fill="#374151">'
                         f"{escape(label)}</text>")
    # Lines, broken where a value is missing; a lone point is a dot.
    for index, s in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        runs: list[list[tuple[float, float]]] = [[]]
        for i, v in enumerate(s.values):
            if v is None:
                if runs[-1]:
                    runs.append([])
                continue
            runs[-1].append((x(i), y(v)))
        for run in runs:
            if len(run) == 1:
                parts.append(f'<circle cx="{_fmt(run[0][0])}" cy="{_fmt(run[0][1])}" r="2" '
                             f'fill="{colour}"/>')
            elif run:
                points = " ".join(f"{_fmt(px)},{_fmt(py)}" for px, py in run)
                parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" '
                             f'stroke-width="1.5" data-series="{escape(s.name)}"/>')
        # Legend along the top.
        lx = LEFT + index * 90
        parts.append(f'<rect x="{lx}" y="8" width="12" height="3" fill="{colour}"/>')
        parts.append(f'<text x="{lx + 16}" y="13" font-size="11" fill="#111827">'
                     f"{escape(s.name)}</text>")
    if not present:
        parts.append(f'<text x="{_fmt(LEFT + plot_w / 2)}" y="{_fmt(TOP + plot_h / 2)}" '
                     f'text-anchor="middle" font-size="12" fill="#6b7280">no attempts</text>')
    parts.append("</svg>")
    return "".join(parts)
