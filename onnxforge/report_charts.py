"""Two more inline-SVG charts for the HTML reports (beside ``report.bar_chart_svg`` and
``report.histogram_svg``): stacked bars of where each model's time goes, and a line chart of a
training run. Drawn here in Python: no scripts, nothing fetched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from onnxforge.report import _PALETTE, _esc, _fmt

__all__ = ["SHARE_COLORS", "line_chart_svg", "stacked_bars_svg"]

# one colour per op class; "other" is always the last, grey
SHARE_COLORS = ("#3b6fb6", "#d9822b", "#2f9e6e", "#b64a4a", "#7a5bb6", "#c9a227", "#4aa3b6", "#b65f9e")
OTHER_COLOR = "#a3a9b5"


def stacked_bars_svg(
    rows: Sequence[tuple[str, float, Mapping[str, float]]],
    classes: Sequence[str],
    *,
    title: str,
    unit: str = " ms",
    width: int = 760,
    label_width: int = 130,
) -> str:
    """One horizontal bar per ``(label, total, shares)``: its length is ``total`` (scaled to the largest),
    cut into segments by ``shares`` (class -> fraction of the total; classes not in ``classes`` are summed
    as "other"). A legend names the classes; each segment's tooltip gives its class, time and share, and
    a segment wide enough prints its share."""
    bar_h, gap, top = 22, 8, 48
    height = top + len(rows) * (bar_h + gap) + 6
    peak = max((total for _, total, _ in rows), default=0.0) or 1.0
    span = width - label_width - 90
    named = [*classes, "other"]
    color = {c: SHARE_COLORS[i % len(SHARE_COLORS)] for i, c in enumerate(classes)} | {"other": OTHER_COLOR}
    parts = [
        f'<svg class="chart stacked" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}">',
        f"<title>{_esc(title)}</title>",
        f'<text x="0" y="16" font-size="13" font-weight="600" fill="#1d2330">{_esc(title)}</text>',
    ]
    x = 0.0
    for name in named:  # the legend, one line under the title
        parts.append(f'<rect x="{x:.1f}" y="26" width="10" height="10" fill="{color[name]}"/>'
                     f'<text class="legend" x="{x + 14:.1f}" y="35" font-size="11" fill="#3a4355">{_esc(name)}</text>')
        x += 14 + 6.6 * len(name) + 14
    for i, (label, total, shares) in enumerate(rows):
        y = top + i * (bar_h + gap)
        shown = label if len(label) <= 18 else label[:16] + "…"
        parts.append(f'<text x="{label_width - 6}" y="{y + 15}" font-size="12" text-anchor="end" fill="#1d2330">'
                     f"<title>{_esc(label)}</title>{_esc(shown)}</text>")
        length = span * total / peak if total > 0 else 0.0
        split = {c: shares.get(c, 0.0) for c in classes}
        split["other"] = max(0.0, sum(shares.values()) - sum(split.values()))
        x = float(label_width)
        for name in named:
            w = length * split[name]
            if w <= 0:
                continue
            parts.append(
                f'<rect class="seg" data-class="{_esc(name)}" x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                f'fill="{color[name]}"><title>{_esc(label)}: {_esc(name)} {_esc(_fmt(total * split[name]))}'
                f"{_esc(unit)} ({split[name]:.0%})</title></rect>"
            )
            if w >= 34:
                parts.append(f'<text x="{x + w / 2:.1f}" y="{y + 15}" font-size="11" text-anchor="middle" '
                             f'fill="#fff">{split[name]:.0%}</text>')
            x += w
        parts.append(f'<text class="value" x="{x + 5:.1f}" y="{y + 15}" font-size="12" fill="#3a4355">'
                     f"{_esc(_fmt(total))}{_esc(unit)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def line_chart_svg(
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    *,
    title: str,
    x_label: str,
    y_label: str = "",
    width: int = 520,
    height: int = 240,
) -> str:
    """Lines of (x, y) points, one per ``(name, points)``, on shared axes (y from its data's range, never
    clamped: a loss that rises shows it); points marked and titled with their values, legend top right."""
    left, right, top, bottom = 56, 16, 30, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for _, pts in series for x, _ in pts] or [0.0, 1.0]
    ys = [y for _, pts in series for _, y in pts] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1 = x1 if x1 > x0 else x0 + 1.0
    pad = (y1 - y0) * 0.08 or abs(y1) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad

    def sx(v: float) -> float:
        return left + plot_w * (v - x0) / (x1 - x0)

    def sy(v: float) -> float:
        return top + plot_h * (1 - (v - y0) / (y1 - y0))

    parts = [
        f'<svg class="chart line" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}">',
        f"<title>{_esc(title)}</title>",
        f'<text x="0" y="16" font-size="13" font-weight="600" fill="#1d2330">{_esc(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#8a93a6"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#8a93a6"/>',
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" font-size="11" text-anchor="middle" fill="#5a6477">'
        f"{_esc(x_label)}</text>",
    ]
    if y_label:
        parts.append(f'<text x="12" y="{top + plot_h / 2:.1f}" font-size="11" text-anchor="middle" fill="#5a6477" '
                     f'transform="rotate(-90 12 {top + plot_h / 2:.1f})">{_esc(y_label)}</text>')
    for frac in (0.0, 0.5, 1.0):
        xv, yv = x0 + (x1 - x0) * frac, y0 + (y1 - y0) * frac
        parts.append(f'<text x="{sx(xv):.1f}" y="{top + plot_h + 14}" font-size="11" text-anchor="middle" '
                     f'fill="#5a6477">{_esc(_fmt(xv))}</text>')
        parts.append(f'<text x="{left - 4}" y="{sy(yv) + 4:.1f}" font-size="11" text-anchor="end" fill="#5a6477">'
                     f"{_esc(_fmt(yv))}</text>")
    legend_x = float(width - right)
    for i, (name, pts) in reversed(list(enumerate(series))):
        color = _PALETTE[i % len(_PALETTE)]
        if len(pts) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(f'<polyline class="series" data-series="{_esc(name)}" points="{path}" fill="none" '
                         f'stroke="{color}" stroke-width="2"/>')
        for x, y in pts:
            parts.append(f'<circle class="point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}">'
                         f"<title>{_esc(name)}: {_esc(_fmt(y))} at {_esc(_fmt(x))}</title></circle>")
        parts.append(f'<text class="legend" x="{legend_x}" y="16" font-size="11" text-anchor="end" fill="{color}">'
                     f"{_esc(name)}</text>")
        legend_x -= 6.6 * len(name) + 14
    parts.append("</svg>")
    return "".join(parts)
