"""Small line charts drawn as SVG on the server (no JavaScript library, no CDN).

Only SVG presentation attributes are used (no ``style``), so the pages keep a strict
Content-Security-Policy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

#: Line colours, in series order (colour-blind safe, Okabe-Ito).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
#: The colour of global (all-site) lines, so that each site keeps its palette colour on every chart.
GLOBAL_COLOUR = "#222222"


def site_colour(index: int) -> str:
    """The colour of the ``index``-th site (sorted by name) on every chart."""
    return PALETTE[index % len(PALETTE)]
WIDTH, HEIGHT = 520, 250
LEFT, RIGHT, TOP, BOTTOM = 52, 130, 28, 34


@dataclass(frozen=True)
class Series:
    """One line: a label and its points ``(x, y)`` (None values are gaps, skipped); colour: by position if None."""

    label: str
    points: Sequence[tuple[float, float | None]]
    dashed: bool = False
    colour: str | None = None


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering ``[low, high]``."""
    if high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        if value >= low - step * 1e-9:
            ticks.append(round(value, 10))
        value += step
    return ticks


def _label(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def line_chart(
    *,
    chart_id: str,
    title: str,
    series: Sequence[Series],
    y_range: tuple[float, float] | None = None,
    x_label: str = "round",
    target: tuple[str, float] | None = None,
) -> str:
    """An SVG line chart.

    Args:
        chart_id: The chart's ``data-chart`` name (pages and tests find it by this).
        title: Shown above the plot and as the SVG's accessible title.
        series: The lines; points with ``y=None`` are left out.
        y_range: Fixed y axis (e.g. ``(0, 1)`` for AUC); default: the data's range.
        x_label: The x axis' name.
        target: ``(label, y)`` drawn as a dashed horizontal line (e.g. the ε target).
    """
    lines = [(s, [(float(x), float(y)) for x, y in s.points if y is not None and math.isfinite(y)]) for s in series]
    xs = [x for _, pts in lines for x, _ in pts]
    ys = [y for _, pts in lines for _, y in pts] + ([target[1]] if target else [])
    head = (f'<svg class="chart" data-chart="{escape(chart_id)}" xmlns="http://www.w3.org/2000/svg" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img">'
            f"<title>{escape(title)}</title>"
            f'<text x="{LEFT}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>')
    if not xs:
        return head + f'<text x="{LEFT}" y="{HEIGHT // 2}" font-size="12" fill="#666">no data yet</text></svg>'
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    y0, y1 = y_range if y_range else (min(ys), max(ys))
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return TOP + (1 - (min(max(y, y0), y1) - y0) / (y1 - y0)) * plot_h

    parts = [head, _axes(x0, x1, y0, y1, px, py, x_label)]
    if target is not None:
        ty = py(target[1])
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#B00020" '
                     f'stroke-dasharray="6 4"/><text x="{LEFT + plot_w - 4}" y="{ty - 4:.1f}" font-size="10" '
                     f'text-anchor="end" fill="#B00020">{escape(target[0])}</text>')
    for index, (s, pts) in enumerate(lines):
        colour = s.colour or PALETTE[index % len(PALETTE)]
        dash = ' stroke-dasharray="4 3"' if s.dashed else ""
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        if len(pts) > 1:
            parts.append(f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="2"{dash} '
                         f'points="{coords}"/>')
        parts.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}">'
                     f"<title>{escape(s.label)} round {x:g}: {y:.4g}</title></circle>" for x, y in pts)
        ly = TOP + 8 + index * 16
        parts.append(f'<line x1="{WIDTH - RIGHT + 10}" x2="{WIDTH - RIGHT + 28}" y1="{ly}" y2="{ly}" '
                     f'stroke="{colour}" stroke-width="2"{dash}/><text x="{WIDTH - RIGHT + 32}" y="{ly + 4}" '
                     f'font-size="11">{escape(s.label[:16])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _axes(x0: float, x1: float, y0: float, y1: float, px, py, x_label: str) -> str:  # noqa: ANN001
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    parts = [f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{bottom}" stroke="#444"/>',
             f'<line x1="{LEFT}" x2="{right}" y1="{bottom}" y2="{bottom}" stroke="#444"/>']
    for y in _ticks(y0, y1):
        parts.append(f'<line x1="{LEFT}" x2="{right}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#e4e4e4"/>'
                     f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" font-size="10" text-anchor="end">{_label(y)}</text>')
    x_ticks = [x for x in _ticks(x0, x1, 6) if float(x).is_integer()] or [x0, x1]
    for x in x_ticks:
        parts.append(f'<text x="{px(x):.1f}" y="{bottom + 14}" font-size="10" text-anchor="middle">{x:g}</text>')
    parts.append(f'<text x="{LEFT + (right - LEFT) / 2:.0f}" y="{HEIGHT - 4}" font-size="11" '
                 f'text-anchor="middle">{escape(x_label)}</text>')
    return "".join(parts)
