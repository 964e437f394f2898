"""HTML reports a person can read offline: one self-contained file, charts as inline SVG drawn
here in Python, no scripts, no fonts or styles fetched from anywhere.

Reports are built from the JSON the tools already write, so a report can be rebuilt later from a
saved result: here ``profile_report_html`` (the ``onnxforge profile --json`` payload: latency rows
with their spread and distribution, per-op and per-node time bars, EP placement, the comparison, the
mobile verdicts), the charts and page parts the others share; ``run_report.py`` draws a run folder's
``manifest.json``, ``optimize_report.py`` an optimize run's Pareto front.
"""

from __future__ import annotations

import datetime as _dt
import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxforge._atomic import atomic_write_text

__all__ = ["REPORT_NAME", "bar_chart_svg", "histogram_svg", "profile_report_html", "write_report"]

REPORT_NAME = "report.html"

_PALETTE = ("#3b6fb6", "#d9822b", "#2f9e6e", "#b64a4a", "#7a5bb6", "#8c8c8c")
_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; margin: 24px auto;
       max-width: 1100px; color: #1d2330; background: #fff; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #dde2ea;
     padding-bottom: 4px; } h3 { font-size: 14px; margin: 14px 0 4px; }
.meta { color: #5a6477; font-size: 13px; } .note { color: #8a5a00; font-size: 13px; }
.banner { background: #fff4d6; border: 1px solid #e9c46a; padding: 6px 10px; border-radius: 4px; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border-bottom: 1px solid #e3e7ee; padding: 4px 10px; text-align: right; }
th { background: #f3f5f9; } td.l, th.l { text-align: left; }
.charts { display: flex; flex-wrap: wrap; gap: 18px; } .chart { margin: 6px 0; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; color: #fff; font-weight: 600; font-size: 12px; }
.YES { background: #2f9e6e; } .MAYBE { background: #d9822b; } .NO { background: #b64a4a; }
svg text { font-family: inherit; }
"""


# ----------------------------------------------------------------------------------------------
# SVG charts


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
    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}">',
        f"<title>{_esc(title)}</title>",
        f'<text x="0" y="16" font-size="13" font-weight="600" fill="#1d2330">{_esc(title)}</text>',
    ]
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
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}">',
        f"<title>{_esc(title)}</title>",
        f'<text x="0" y="16" font-size="13" font-weight="600" fill="#1d2330">{_esc(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#8a93a6"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#8a93a6"/>',
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


def _latency_histogram(latency: dict, title: str, color: str = _PALETTE[0]) -> str:
    hist = latency.get("histogram")
    if not hist or not hist.get("counts"):
        return ""
    markers = [(k.split("_")[0], latency[k]) for k in ("p50_ms", "p90_ms", "p99_ms") if k in latency]
    return histogram_svg(
        hist["edges_ms"], hist["counts"], title=title, markers=markers, above=int(hist.get("above", 0)), color=color
    )


# ----------------------------------------------------------------------------------------------
# Page assembly


def _page(title: str, body: Sequence[str]) -> str:
    made = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        + "".join(body)
        + f'<p class="meta">written by onnxforge, {made}</p></body></html>\n'
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    head = "".join(f'<th class="l">{_esc(h)}</th>' if i < left else f"<th>{_esc(h)}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>"
        + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _spread_cells(row: dict) -> tuple[str, str]:
    """p90/p50 and p99/p50 of a latency row, each flagged when past the noise threshold."""
    from onnxforge.targets.latency import NOISY_P90, NOISY_P99

    p50 = row["p50_ms"] or float("nan")
    p90, p99 = row["p90_ms"] / p50, row["p99_ms"] / p50
    return (f'<span class="note">{p90:.2f}</span>' if p90 > NOISY_P90 else f"{p90:.2f}",
            f'<span class="note">{p99:.1f}</span>' if p99 > NOISY_P99 else f"{p99:.1f}")


def _noise_banner(rows: Sequence[dict]) -> list[str]:
    from onnxforge.targets.latency import NOISY_P90, NOISY_P99

    noisy = [r for r in rows if r["p50_ms"] and (r["p90_ms"] / r["p50_ms"] > NOISY_P90
                                                 or r["p99_ms"] / r["p50_ms"] > NOISY_P99)]
    if not noisy:
        return []
    return [f'<p class="banner">Noisy timing in {len(noisy)} of {len(rows)} rows (p90 above {NOISY_P90}x or p99 '
            f"above {NOISY_P99}x the p50): the machine was busy or the runs are too short to time alone. Trust the "
            "p50 and ratios measured side by side; re-run with more --min-seconds.</p>"]


def _latency_rows_table(rows: Sequence[dict]) -> str:
    return _table(
        ("batch", "threads", "p50 ms", "p90 ms", "p99 ms", "p90/p50", "p99/p50", "mean ms", "std ms", "samples/s",
         "runs"),
        [
            (r["batch"], r.get("threads") or "default", _fmt(r["p50_ms"]), _fmt(r["p90_ms"]), _fmt(r["p99_ms"]),
             *_spread_cells(r), _fmt(r["mean_ms"]), _fmt(r["std_ms"]), _fmt(r["throughput_per_s"]), r["runs"])
            for r in rows
        ],
        left=0,
    )


def _per_op_section(per_op: dict, top: int = 15) -> list[str]:
    lat = per_op["latency"]
    out = [
        "<h2>Per-op profile (onnxruntime profiler)</h2>",
        f'<p>Per-op sum <b>{_fmt(per_op["op_sum_ms"])} ms</b> of onnxruntime&#39;s own '
        f'<b>{_fmt(per_op["ort_run_ms"])} ms</b> per profiled run: the kernels account for '
        f'<b>{per_op["coverage"]:.0%}</b> of it. The profiler made each run {per_op["profiler_overhead"]:.2f}x '
        f'slower than a plain one (plain p50 {_fmt(lat["p50_ms"])} ms), so per-op times are shares of the run, '
        f'not plain latencies; {per_op["runs"]} profiled runs after warm-up.</p>',
        '<div class="charts">',
        bar_chart_svg(
            [(o["op_type"] + f' ×{o["nodes"]}', o["median_us"]) for o in per_op["op_types"][:top]],
            title="time per op type (µs per run)", unit=" µs",
        ),
        bar_chart_svg(
            [(n["name"], n["median_us"]) for n in per_op["nodes"][:top]],
            title=f"slowest {min(top, len(per_op['nodes']))} nodes (µs per run)", unit=" µs", color=_PALETTE[1],
        ),
        "</div>",
        "<h3>Top nodes</h3>",
        _table(
            ("node", "op", "provider", "µs/run", "share", "output shape"),
            [(_esc(n["name"]), _esc(n["op_type"]), _esc(n["provider"]), _fmt(n["median_us"]), f'{n["share"]:.1%}',
              _esc(" ".join("x".join(map(str, s)) for s in n["output_shapes"])))
             for n in per_op["nodes"][:top]],
            left=3,
        ),
        "<h3>EP placement</h3>",
        _table(
            ("provider", "nodes", "µs/run", "share"),
            [(_esc(p["provider"]), p["nodes"], _fmt(p["median_us"]), f'{p["share"]:.1%}') for p in per_op["placement"]],
        ),
    ]
    fallback = per_op.get("fallback_nodes") or []
    out.append(
        f'<p class="note">Fell back from {_esc(per_op["expected_provider"])}: {len(fallback)} nodes: '
        + _esc(", ".join(fallback[:30])) + "</p>"
        if fallback else f'<p>Every node ran on {_esc(per_op["expected_provider"])}.</p>'
    )
    out += [f'<p class="note">{_esc(n)}</p>' for n in per_op.get("notes", [])]
    return out


def _comparison_section(comp: dict) -> list[str]:
    a, b = comp["model_latency"], comp["other_latency"]
    name_a, name_b = Path(comp["model"]).name, Path(comp["other"]).name
    ratio = comp["ratio_other_over_model"]
    verdict = f"{name_b} is {1 / ratio:.2f}x as fast as {name_a}" if ratio else ""
    return [
        "<h2>Side-by-side comparison (interleaved)</h2>",
        f"<p>p50 ratio {_esc(name_b)} / {_esc(name_a)} = <b>{ratio:.3f}</b>: {_esc(verdict)} "
        f'(batch {comp["batch"]}, threads {comp.get("threads") or "default"}).</p>',
        '<div class="charts">',
        bar_chart_svg([(name_a, a["p50_ms"]), (name_b, b["p50_ms"])], title="p50 latency (ms)", unit=" ms"),
        _latency_histogram(a, f"{name_a}: latency distribution"),
        _latency_histogram(b, f"{name_b}: latency distribution", color=_PALETTE[1]),
        "</div>",
    ]


def _mobile_section(mobile: dict) -> list[str]:
    def verdict_rows(verdicts: list[dict]) -> list[tuple]:
        return [
            (_esc(v["ep"]), f'<span class="badge {_esc(v["readiness"])}">{_esc(v["readiness"])}</span>',
             f'{v["supported_nodes"]}/{v["total_nodes"]}', v["partitions"],
             _esc(", ".join(v["unsupported_ops"]) or "-"), v["nodes_unsupported_dynamic_shape"])
            for v in verdicts
        ]

    header = ("EP", "verdict", "supported nodes", "partitions", "unsupported ops", "dynamic-shape nodes")
    fixed = mobile.get("fixed_inputs") or {}
    parity = mobile["ort_parity"]
    worst = max((o["max_abs_error"] for o in parity["outputs"]), default=0.0)
    out = [
        "<h2>Mobile readiness</h2>",
        "<p>Fixed input shapes: "
        + (_esc(", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in fixed.items())) if fixed else "none needed")
        + "</p>",
        "<h3>Usability checker, after fixing shapes</h3>",
        _table(header, verdict_rows(mobile["verdicts"]), left=2),
        "<h3>As given</h3>",
        _table(header, verdict_rows(mobile["verdicts_as_given"]), left=2),
        f'<p>ORT format: {_esc(mobile["ort_model"])}; parity with the .onnx: '
        f'<b>{"ok" if parity["ok"] else "FAILED"}</b> (max abs error {worst:.3g}). '
        f'Reduced-build config {_esc(mobile["operators_config"])}: {_esc("; ".join(mobile["required_operators"]))}</p>',
        f'<p>XNNPACK in this build: {"yes" if mobile["xnnpack_available"] else "no"}.</p>',
    ]
    out += [f'<p class="note">{_esc(n)}</p>' for n in mobile.get("notes", [])]
    return out


def profile_report_html(result: dict) -> str:
    """The report for one ``onnxforge profile`` result (its ``to_json()`` payload)."""
    name = Path(result["path"]).name
    body = [
        f"<h1>{_esc(name)} on {_esc(result['target'])}</h1>",
        f'<p class="meta">{_esc(result["path"])}</p>',
    ]
    if result.get("host_emulation"):
        body.append(
            '<p class="banner">Host emulation: timed on this machine with a phone-like thread budget, '
            "not measured on a device.</p>"
        )
    body += ["<h2>Latency</h2>", *_noise_banner(result["rows"]), _latency_rows_table(result["rows"]),
             '<div class="charts">']
    for i, row in enumerate(result["rows"][:6]):
        body.append(
            _latency_histogram(row, f"batch {row['batch']}, threads {row.get('threads') or 'default'}",
                               _PALETTE[i % len(_PALETTE)])
        )
    body.append("</div>")
    if result.get("per_op"):
        body += _per_op_section(result["per_op"])
    if result.get("comparison"):
        body += _comparison_section(result["comparison"])
    if result.get("mobile"):
        body += _mobile_section(result["mobile"])
    return _page(f"onnxforge profile: {name}", body)


def write_report(path: str | os.PathLike, html_text: str) -> Path:
    """Write ``html_text`` to ``path`` atomically (a temporary file renamed into place)."""
    from onnxforge._atomic import check_output_path

    out = check_output_path(path)
    atomic_write_text(out, html_text)
    return out
