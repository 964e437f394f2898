"""Every inline-SVG chart the HTML reports draw, and the pieces they share (the ``<svg>`` start with its
title, the axes, the tick labels): horizontal bars, a latency histogram, stacked bars of where each
model's time goes, a line chart of a training run, and the optimize report's quality-vs-cost scatter.
Drawn here in Python: no scripts, nothing fetched.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["SHARE_COLORS", "bar_chart_svg", "histogram_svg", "line_chart_svg", "scatter_svg", "stacked_bars_svg"]

_PALETTE = ("#3b6fb6", "#d9822b", "#2f9e6e", "#b64a4a", "#7a5bb6", "#8c8c8c")
# one colour per op class; "other" is always the last, grey
SHARE_COLORS = ("#3b6fb6", "#d9822b", "#2f9e6e", "#b64a4a", "#7a5bb6", "#c9a227", "#4aa3b6", "#b65f9e")
OTHER_COLOR = "#a3a9b5"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _open(kind: str, width: int, height: int, title: str) -> list[str]:
    """The start of a chart: the ``<svg>`` element (class ``chart`` and ``kind``), its accessible title,
    and the title drawn top left."""
    css = f"chart {kind}" if kind else "chart"
    return [
        f'<svg class="{css}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}">',
        f"<title>{_esc(title)}</title>",
        f'<text x="0" y="16" font-size="13" font-weight="600" fill="#1d2330">{_esc(title)}</text>',
    ]


def _axes(left: float, top: float, right: float, base: float) -> list[str]:
    """The x axis along ``base`` from ``left`` to ``right`` and the y axis along ``left`` from ``top`` down."""
    return [f'<line x1="{left}" y1="{base}" x2="{right}" y2="{base}" stroke="#8a93a6"/>',
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" stroke="#8a93a6"/>']


def _tick_labels(x_range: tuple[float, float], y_range: tuple[float, float], sx: Callable[[float], float],
                 sy: Callable[[float], float], *, left: float, base: float) -> list[str]:
    """The values at the start, the middle and the end of both axes (``sx``/``sy``: value -> pixel)."""
    (x0, x1), (y0, y1) = x_range, y_range
    parts = []
    for frac in (0.0, 0.5, 1.0):
        xv, yv = x0 + (x1 - x0) * frac, y0 + (y1 - y0) * frac
        parts.append(f'<text x="{sx(xv):.1f}" y="{base + 14}" font-size="11" text-anchor="middle" '
                     f'fill="#5a6477">{_esc(_fmt(xv))}</text>')
        parts.append(f'<text x="{left - 4}" y="{sy(yv) + 4:.1f}" font-size="11" text-anchor="end" fill="#5a6477">'
                     f"{_esc(_fmt(yv))}</text>")
    return parts


def bar_chart_svg(
    items: Sequence[tuple[str, float]],
    *,
    title: str,
    unit: str = "",
    width: int = 520,
    color: str = _PALETTE[0],
    label_width: int = 190,
    texts: Sequence[str] | None = None,
) -> str:
    """Horizontal bars, one per (label, value), in the order given; each bar's value printed at its end.

    A value at or below zero draws no bar but keeps its real number (−15.6 dB reads −15.6, never 0);
    ``texts`` replaces the printed values (e.g. "identical" for an infinite SQNR drawn at the cap)."""
    bar_h, gap, top = 18, 6, 26
    height = top + len(items) * (bar_h + gap) + 8
    peak = max((v for _, v in items), default=0.0) or 1.0
    span = width - label_width - 80
    parts = _open("", width, height, title)
    for i, (label, value) in enumerate(items):
        y = top + i * (bar_h + gap)
        w = max(1.0, span * (value / peak)) if value > 0 else 0.0
        shown = label if len(label) <= 28 else label[:26] + "…"
        parts.append(
            f'<text x="{label_width - 6}" y="{y + 13}" font-size="12" text-anchor="end" fill="#1d2330">'
            f"<title>{_esc(label)}</title>{_esc(shown)}</text>"
        )
        parts.append(
            f'<rect class="bar" x="{label_width}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}" rx="2"/>'
        )
        shown_value = texts[i] if texts is not None else _fmt(value) + unit
        parts.append(
            f'<text class="value" x="{label_width + w + 5:.1f}" y="{y + 13}" font-size="12" '
            f'fill="{"#b64a4a" if value < 0 else "#3a4355"}">{_esc(shown_value)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def histogram_svg(
    edges: Sequence[float],
    counts: Sequence[int],
    *,
    title: str,
    markers: Sequence[tuple[str, float]] = (),
    above: int = 0,
    width: int = 520,
    height: int = 200,
    color: str = _PALETTE[0],
) -> str:
    """Run counts per latency bin (ms), with dashed lines for the p50/p90/p99 markers (legend top right)."""
    left, right, top, bottom = 40, 26, 26, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    lo, hi = float(edges[0]), float(edges[-1])
    span = (hi - lo) or 1.0
    peak = max(counts, default=0) or 1

    def x_of(value: float) -> float:
        return left + plot_w * (value - lo) / span

    parts = [
        *_open("", width, height, title),
        *_axes(left, top, left + plot_w, top + plot_h),
        f'<text x="{left - 4}" y="{top + 10}" font-size="11" text-anchor="end" fill="#5a6477">{peak}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" font-size="11" text-anchor="end" fill="#5a6477">0</text>',
    ]
    for i, count in enumerate(counts):
        x0, x1 = x_of(edges[i]), x_of(edges[i + 1])
        h = plot_h * count / peak
        if count:
            parts.append(
                f'<rect class="bar" x="{x0 + 0.5:.1f}" y="{top + plot_h - h:.1f}" width="{max(1.0, x1 - x0 - 1):.1f}" '
                f'height="{h:.1f}" fill="{color}">'
                f"<title>{_fmt(edges[i])}-{_fmt(edges[i + 1])} ms: {count} runs</title></rect>"
            )
    for tick in (lo, (lo + hi) / 2, hi):
        parts.append(
            f'<text x="{x_of(tick):.1f}" y="{top + plot_h + 14}" font-size="11" text-anchor="middle" fill="#5a6477">'
            f"{_esc(_fmt(tick))}</text>"
        )
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" font-size="11" text-anchor="middle" fill="#5a6477">'
        "ms per run</text>"
    )
    legend_x = width - right
    for i, (name, value) in reversed(list(enumerate(markers))):
        marker_color = _PALETTE[(i + 1) % len(_PALETTE)]
        if lo <= value <= hi:  # a marker in the clipped tail keeps its legend entry only
            x = x_of(value)
            parts.append(
                f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="{marker_color}" '
                'stroke-dasharray="4 3" stroke-width="1.5"/>'
            )
        label = f"{name} {_fmt(value)}"
        parts.append(
            f'<text x="{legend_x}" y="16" font-size="11" text-anchor="end" fill="{marker_color}">{_esc(label)}</text>'
        )
        legend_x -= 7 * len(label) + 10
    if above:
        parts.append(
            f'<text x="{left + plot_w}" y="{top + plot_h + 28}" font-size="11" text-anchor="end" fill="#5a6477">'
            f"+{above} slower runs not drawn</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


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
    parts = _open("stacked", width, height, title)
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
        *_open("line", width, height, title),
        *_axes(left, top, left + plot_w, top + plot_h),
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" font-size="11" text-anchor="middle" fill="#5a6477">'
        f"{_esc(x_label)}</text>",
    ]
    if y_label:
        parts.append(f'<text x="12" y="{top + plot_h / 2:.1f}" font-size="11" text-anchor="middle" fill="#5a6477" '
                     f'transform="rotate(-90 12 {top + plot_h / 2:.1f})">{_esc(y_label)}</text>')
    parts += _tick_labels((x0, x1), (y0, y1), sx, sy, left=left, base=top + plot_h)
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


def scatter_svg(points: Sequence[dict[str, Any]], *, x_label: str, y_label: str, title: str,
                width: int = 620, height: int = 380) -> str:
    """Points with ``x``, ``y``, ``label``, ``kind`` (trial | front | baseline | best | failed); the front joined."""
    left, right, top, bottom = 64, 18, 30, 48
    xs = [p["x"] for p in points] or [0.0, 1.0]
    ys = [p["y"] for p in points] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(min(ys), 0.0), max(ys)
    x1 = x1 if x1 > x0 else x0 + 1.0
    y1 = y1 if y1 > y0 else y0 + 1.0
    pad_x, pad_y = (x1 - x0) * 0.06, (y1 - y0) * 0.08

    def sx(v: float) -> float:
        return left + (v - x0 + pad_x) / (x1 - x0 + 2 * pad_x) * (width - left - right)

    def sy(v: float) -> float:
        return height - bottom - (v - y0 + pad_y) / (y1 - y0 + 2 * pad_y) * (height - top - bottom)

    parts = [
        *_open("scatter", width, height, title),
        *_axes(left, top, width - right, height - bottom),
        f'<text x="{(left + width - right) / 2}" y="{height - 10}" font-size="12" text-anchor="middle" fill="#3a4355">'
        f"{_esc(x_label)}</text>",
        f'<text x="14" y="{(top + height - bottom) / 2}" font-size="12" text-anchor="middle" fill="#3a4355" '
        f'transform="rotate(-90 14 {(top + height - bottom) / 2})">{_esc(y_label)}</text>',
    ]
    parts += _tick_labels((x0, x1), (y0, y1), sx, sy, left=left, base=height - bottom)
    front = sorted((p for p in points if p["kind"] in ("front", "best")), key=lambda p: p["x"])
    if len(front) > 1:
        path = " ".join(f"{sx(p['x']):.1f},{sy(p['y']):.1f}" for p in front)
        parts.append(
            f'<polyline class="front-line" points="{path}" fill="none" stroke="{_PALETTE[1]}" stroke-width="1.5"/>'
        )
    style = {"trial": ("#9aa3b5", 4), "failed": ("#b64a4a", 3), "baseline": (_PALETTE[2], 5),
             "front": (_PALETTE[1], 6), "best": (_PALETTE[1], 7)}
    for p in sorted(points, key=lambda p: ("trial", "failed", "baseline", "front", "best").index(p["kind"])):
        color, r = style[p["kind"]]
        shape = (
            f'<rect x="{sx(p["x"]) - r:.1f}" y="{sy(p["y"]) - r:.1f}" width="{2 * r}" height="{2 * r}" fill="{color}"'
            if p["kind"] == "baseline"
            else f'<circle cx="{sx(p["x"]):.1f}" cy="{sy(p["y"]):.1f}" r="{r}" fill="{color}"'
        )
        ring = ' stroke="#1d2330" stroke-width="2.5"' if p["kind"] == "best" else ""
        parts.append(f'{shape}{ring} class="point {p["kind"]}" data-trial="{_esc(p.get("number", ""))}">'
                     f'<title>{_esc(p["label"])}</title></{"rect" if p["kind"] == "baseline" else "circle"}>')
    legend = [
        ("front", "Pareto front"),
        ("best", "chosen"),
        ("baseline", "single-stage seed"),
        ("trial", "other trial"),
    ]
    for i, (kind, text) in enumerate(legend):
        x = width - right - 130
        y = top + 4 + i * 16
        parts.append(f'<circle cx="{x}" cy="{y}" r="4" fill="{style[kind][0]}"/>'
                     f'<text x="{x + 9}" y="{y + 4}" font-size="11" fill="#3a4355">{_esc(text)}</text>')
    parts.append("</svg>")
    return "".join(parts)
