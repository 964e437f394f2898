"""The HTML report of ``onnxforge optimize``: an accuracy-vs-cost scatter of every trial (the Pareto
front highlighted and joined, the single-stage baselines marked, the chosen model ringed) and the
per-trial table. Self-contained: inline SVG, no scripts, no network."""

from __future__ import annotations

from typing import Any

from onnxforge.report import _page, _table
from onnxforge.report_charts import _esc, _fmt, scatter_svg

__all__ = ["optimize_report_html"]


def _quality_label(metric: str) -> str:
    return {"accuracy": "accuracy drop (points)", "agreement": "disagreement (points)",
            "cosine": "1 - cosine", "min-cosine": "1 - min cosine", "rel-error": "relative error"}.get(metric, metric)


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
