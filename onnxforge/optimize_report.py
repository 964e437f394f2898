"""The HTML report of ``onnxforge optimize``: an accuracy-vs-cost scatter of every trial (the Pareto
front highlighted and joined, the single-stage baselines marked, the chosen model ringed) and the
per-trial table. Self-contained: inline SVG, no scripts, no network."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from onnxforge.report import _PALETTE, _esc, _fmt, _page, _table

__all__ = ["optimize_report_html", "scatter_svg"]


def _quality_label(metric: str) -> str:
    return {"accuracy": "accuracy drop (points)", "agreement": "disagreement (points)",
            "cosine": "1 - cosine", "min-cosine": "1 - min cosine", "rel-error": "relative error"}.get(metric, metric)


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
        f'<svg class="chart scatter" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}">',
        f"<title>{_esc(title)}</title>",
        f'<text x="0" y="16" font-size="13" font-weight="600" fill="#1d2330">{_esc(title)}</text>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#8a93a6"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#8a93a6"/>',
        f'<text x="{(left + width - right) / 2}" y="{height - 10}" font-size="12" text-anchor="middle" fill="#3a4355">'
        f"{_esc(x_label)}</text>",
        f'<text x="14" y="{(top + height - bottom) / 2}" font-size="12" text-anchor="middle" fill="#3a4355" '
        f'transform="rotate(-90 14 {(top + height - bottom) / 2})">{_esc(y_label)}</text>',
    ]
    for frac in (0.0, 0.5, 1.0):
        xv, yv = x0 + (x1 - x0) * frac, y0 + (y1 - y0) * frac
        parts.append(f'<text x="{sx(xv):.1f}" y="{height - bottom + 15}" font-size="11" text-anchor="middle" '
                     f'fill="#5b6478">{_esc(_fmt(xv))}</text>')
        parts.append(f'<text x="{left - 6}" y="{sy(yv) + 4:.1f}" font-size="11" text-anchor="end" fill="#5b6478">'
                     f"{_esc(_fmt(yv))}</text>")
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


def optimize_report_html(payload: dict[str, Any]) -> str:
    """The report for an optimize run folder, from its ``pareto.json`` payload."""
    size = (payload.get("config") or {}).get("objective") == "size"
    metric = payload.get("metric", "quality")
    trials = payload.get("trials") or []
    best = payload.get("best") or {}
    points = []
    for r in trials:
        if r.get("status") != "ok":
            continue
        seed = sum(v not in ("none", None) for k, v in (r.get("plan") or {}).items() if "." not in k) <= 1
        kind = "best" if r.get("number") == best.get("number") else "front" if r.get("on_front") else (
            "baseline" if seed else "trial")
        x = r["bytes"] / 1024 if size else r.get("speedup", 0.0)
        points.append({"x": x, "y": r.get("loss", 0.0), "kind": kind, "number": r.get("number"),
                       "label": f"trial {r.get('number')}: {r.get('describe')}"})
    x_label = "file size (KB)" if size else "speedup vs the input model (x, measured on the target)"
    config = payload.get("config") or {}
    body = [
        f"<h1>onnxforge optimize: {_esc(payload.get('run_dir', ''))}</h1>",
        f'<p class="meta">budget: {_esc(payload.get("gate", ""))}; '
        f'objective {_esc(config.get("objective", "latency"))} '
        f"on {_esc(config.get('target', 'cpu'))} (batch {_esc(config.get('batch', 1))}, "
        f"{_esc(config.get('threads', 1))} "
        f"thread); {len(trials)} trials in {_esc(_fmt(payload.get('wall_seconds', 0)))} s; "
        f"{_esc(payload.get('executor', ''))}; "
        f"{_esc((payload.get('machine') or {}).get('cpu', ''))}</p>",
    ]
    if best:
        body.append(
            f"<p><b>chosen:</b> trial {_esc(best.get('number'))} — {_esc(best.get('describe'))}: "
            f"{_esc(_fmt(best.get('speedup', 0)))}x faster, {_esc(metric)} {_esc(_fmt(best.get('quality', 0)))}, "
            f"{_esc(_fmt(best.get('bytes', 0) / 1024))} KB (best.onnx)</p>"
        )
    else:
        body.append("<p><b>no trial stayed within the budget</b></p>")
    body += ["<h2>Quality vs " + ("size" if size else "speed") + "</h2>",
             '<p class="meta">Lower is better on the vertical axis; front speedups were re-timed together, '
             "interleaved with the input model.</p>",
             '<div class="charts">', scatter_svg(points, x_label=x_label, y_label=_quality_label(metric),
                                                 title="every trial; the Pareto front joined"), "</div>"]
    for s in payload.get("settings") or []:  # one front per (batch, threads) setting
        body += [f"<h2>Front at batch {_esc(s['batch'])}, {_esc(s['threads'])} thread(s)</h2>",
                 _table(("trial", "chain", metric, "in budget", "speedup", "chosen"), [(
                     _esc(r["number"]), _esc(r["describe"]), _esc(_fmt(r["quality"])),
                     "yes" if r["within_budget"] else "no", f'{r["speedup"]:.2f}x' if r.get("speedup") else "-",
                     _esc(s["best_path"]) if r["number"] == s["best"] else "") for r in s["front"]], left=2)]
    rows = []
    for r in trials:
        ok = r.get("status") == "ok"
        rows.append((
            _esc(r.get("number")), _esc(r.get("describe", "")),
            _esc("front" if r.get("on_front") else r.get("status", "")),
            _esc(_fmt(r["quality"])) if ok else "-", _esc(_fmt(r["loss"])) if ok else "-",
            "yes" if ok and r.get("within_budget") else "no" if ok else "-",
            f'{r["speedup"]:.2f}x' if ok and r.get("speedup") else "-",
            f'{r["bytes"] / 1024:,.1f} KB' if ok else "-",
            _esc(f'{r["macs_estimate"]:,}') if ok and r.get("macs_estimate") else "-",
            _esc(_fmt(r.get("seconds", 0))),
            _esc(r.get("error") or ", ".join(f'{s["kind"]}: {s["cache"]}' for s in r.get("stages", []))),
        ))
    body += ["<h2>Trials</h2>",
             _table(("trial", "chain", "status", metric, "loss", "in budget", "speedup", "size", "MACs (estimate)",
                     "seconds", "stages / error"), rows, left=3)]
    return _page("onnxforge optimize", body)
