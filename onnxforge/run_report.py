"""The run report: ``report.html`` of a pipeline run folder, drawn from its ``manifest.json`` alone (so it
can be rebuilt later from a saved manifest). Self-contained like every report here: inline SVG, no
scripts, nothing fetched.

What it shows: per-stage size, quality and latency side by side (p90/p50 beside every p50, so a noisy
timing shows); where each stage's time goes per op type, before and after each stage (the runner's
profile, ``metrics["op_time"]``); a quantize stage's SQNR per layer in graph order, its graph outputs
always last; a distill stage's training curve (its ``history``); each stage's latency distribution.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxforge.report import REPORT_NAME, _latency_histogram, _page, _table, write_report
from onnxforge.report_charts import _PALETTE, _esc, _fmt, bar_chart_svg, line_chart_svg, stacked_bars_svg
from onnxforge.targets.latency import NOISY_P90

__all__ = ["op_classes", "run_report_html", "write_run_report"]

_CLASS_COVER = 0.9  # the op classes shown hold at least this share of a stage's time; the rest is "other"
_MAX_CLASSES = 7
_MAX_LAYER_BARS = 48
_STOPPED = {"epochs": "every epoch asked for", "patience": "stopped early: no progress",
            "time budget": "stopped by the time budget"}


def _quality_text(metric: str | None, value: float | None) -> str:
    if value is None:
        return "-"
    if metric in ("accuracy", "agreement"):
        return f"{value * 100:.2f}%"
    return f"{value:.4f}"


def _spread(metrics: dict[str, Any]) -> str:
    """p90/p50 of a stage's timing; flagged when it says the timing is noisy."""
    latency = metrics.get("latency")
    if not isinstance(latency, dict) or not latency.get("p50_ms"):
        return "-"
    ratio = latency["p90_ms"] / latency["p50_ms"]
    return f'<span class="note">{ratio:.2f} noisy</span>' if ratio > NOISY_P90 else f"{ratio:.2f}"


def op_classes(shares: Sequence[dict[str, float]]) -> list[str]:
    """The op types to name in the chart: in each stage, the slowest ones that together hold
    ``_CLASS_COVER`` of its time; over all stages, the largest share first, at most ``_MAX_CLASSES``."""
    best: dict[str, float] = {}
    for share in shares:
        held = 0.0
        for op, fraction in sorted(share.items(), key=lambda kv: -kv[1]):
            if held >= _CLASS_COVER - 1e-9:
                break
            best[op] = max(best.get(op, 0.0), fraction)
            held += fraction
    return sorted(best, key=lambda op: -best[op])[:_MAX_CLASSES]


def _op_time_section(measured: Sequence[dict]) -> list[str]:
    rows = []
    for s in measured:
        m = s.get("metrics", {})
        op_time = m.get("op_time")
        if not isinstance(op_time, dict) or not op_time.get("op_sum_us") or "latency_p50_ms" not in m:
            continue
        total = float(op_time["op_sum_us"])
        rows.append((s["name"], float(m["latency_p50_ms"]),
                     {op: float(us) / total for op, us in op_time["per_op_us"].items()}, op_time))
    if not rows:
        return []
    classes = op_classes([share for _, _, share, _ in rows])
    table_rows = [
        (_esc(name), _fmt(p50), *(f"{share.get(c, 0.0):.0%}" if c in share else "-" for c in classes),
         f"{max(0.0, 1 - sum(share.get(c, 0.0) for c in classes)):.0%}", op_time["runs"],
         f'{op_time["profiler_overhead"]:.2f}x')
        for name, p50, share, op_time in rows
    ]
    return [
        "<h2>Where the time goes, per op type</h2>",
        '<p class="meta">Each bar is the stage&#39;s p50 (batch 1, 1 thread, timed interleaved with the others), '
        "cut by the share of kernel time each op type took in onnxruntime&#39;s profiler (a few profiled runs "
        "per model, cached). Op types are those onnxruntime runs after its own fusions; the classes named hold "
        f"at least {_CLASS_COVER:.0%} of each stage&#39;s time, the rest is &quot;other&quot;.</p>",
        stacked_bars_svg([(name, p50, share) for name, p50, share, _ in rows], classes,
                         title="time per op type, before and after each stage (ms per run)"),
        _table(("stage", "p50 ms", *classes, "other", "profiled runs", "profiler overhead"), table_rows),
    ]


def _sqnr_section(stage: dict) -> list[str]:
    errors = (stage.get("result") or {}).get("layer_errors") or []
    if not errors:
        return []
    nodes = [e for e in errors if not e.get("graph_output")]
    ends = [e for e in errors if e.get("graph_output")]
    step = max(1, math.ceil(len(nodes) / _MAX_LAYER_BARS))
    shown = [*nodes[::step], *ends]  # the graph outputs always: they are what the network gives
    finite = [e["sqnr_db"] for e in errors if e.get("sqnr_db") is not None]
    cap = max(finite, default=100.0)
    items = [((f"output {e['output']}" if e.get("graph_output") else f"{e['node']} ({e['op_type']})"),
              e["sqnr_db"] if e.get("sqnr_db") is not None else cap) for e in shown]
    texts = [f"{e['sqnr_db']:.1f} dB" if e.get("sqnr_db") is not None else "identical" for e in shown]
    worst_end = min((e for e in ends if e.get("sqnr_db") is not None), key=lambda e: e["sqnr_db"], default=None)
    lead = (f"graph output {_esc(worst_end['output'])} at <b>{worst_end['sqnr_db']:.1f} dB</b>; "
            if worst_end else "")
    return [
        f"<h2>{_esc(stage['name'])}: quantization error per layer (SQNR vs fp32)</h2>",
        f'<p>{lead}end-to-end SQNR of each quantized node&#39;s output in graph order'
        + (f" (every {step}th)" if step > 1 else "")
        + ", the graph outputs last; higher is better, 20 dB is a 10% relative error, below 0 dB the error "
        "is larger than the signal. Measured on calibration samples.</p>",
        bar_chart_svg(items, title="SQNR per layer, graph order (dB)", unit=" dB", width=760, label_width=300,
                      texts=texts, color=_PALETTE[4]),
    ]


def _distill_section(stage: dict) -> list[str]:
    result = stage.get("result") or {}
    history = result.get("history") or []
    if len(history) < 2:
        return []
    metric = result.get("held_out_metric", "held-out metric")
    train = [(h["epoch"], h["loss"]) for h in history if h.get("loss") is not None]
    held_loss = [(h["epoch"], h["held_out_loss"]) for h in history if h.get("held_out_loss") is not None]
    held = [(h["epoch"], h["held_out"] * (100.0 if metric in ("accuracy", "agreement") else 1.0))
            for h in history if h.get("held_out") is not None]
    rows = [(h["epoch"], "-" if h.get("loss") is None else f"{h['loss']:.4f}",
             "-" if h.get("held_out_loss") is None else f"{h['held_out_loss']:.4f}",
             _quality_text(metric, h.get("held_out")), "-" if h.get("seconds") is None else f"{h['seconds']:.1f}")
            for h in history]
    return [
        f"<h2>{_esc(stage['name'])}: training curve</h2>",
        f"<p>{len(history) - 1} epochs ({_esc(_STOPPED.get(result.get('stopped', ''), result.get('stopped', '')))}); "
        "best epoch "
        f"{_esc(result.get('best_epoch', '?'))}, whose weights were kept. Epoch 0 is the untrained student.</p>",
        '<div class="charts">',
        line_chart_svg([("train loss", train), ("held-out loss", held_loss)], title="distillation loss per epoch",
                       x_label="epoch", y_label=f"{result.get('loss', '')} loss"),
        line_chart_svg([(f"held-out {metric}", held)], title=f"held-out {metric} per epoch", x_label="epoch",
                       y_label=metric + (" (%)" if metric in ("accuracy", "agreement") else "")),
        "</div>",
        _table(("epoch", "train loss", "held-out loss", f"held-out {metric}", "seconds"), rows, left=0),
    ]


def _comparison_charts(measured: Sequence[dict], metric: str | None) -> list[str]:
    charts = [
        bar_chart_svg([(s["name"], s["output"]["bytes"] / 1024) for s in measured], title="size (KB)", unit=" KB",
                      width=360, label_width=100, color=_PALETTE[0]),
    ]
    if metric and any(metric in s.get("metrics", {}) for s in measured):
        scale = 100.0 if metric in ("accuracy", "agreement") else 1.0
        unit = "%" if scale == 100.0 else ""
        values = [s["metrics"].get(metric) for s in measured]
        charts.append(bar_chart_svg(
            [(s["name"], (v or 0.0) * scale) for s, v in zip(measured, values, strict=True)],
            title=f"{metric}" + (" (%)" if scale == 100.0 else ""), unit=unit, width=360, label_width=100,
            color=_PALETTE[2], texts=["not scored" if v is None else _fmt(v * scale) + unit for v in values],
        ))
    if any("latency_p50_ms" in s.get("metrics", {}) for s in measured):
        values = [s["metrics"].get("latency_p50_ms") for s in measured]
        charts.append(bar_chart_svg(
            [(s["name"], v or 0.0) for s, v in zip(measured, values, strict=True)],
            title="p50 latency, batch 1 (ms)", unit=" ms", width=360, label_width=100, color=_PALETTE[1],
            texts=["not timed" if v is None else _fmt(v) + " ms" for v in values],
        ))
    return ["<h2>Per-stage comparison</h2>", '<div class="charts">', *charts, "</div>"]


def run_report_html(manifest: dict) -> str:
    """The report for a pipeline run folder, from its manifest (``Manifest.to_json()``)."""
    recipe = manifest.get("recipe") or {}
    # an .onnx recipe's input model is the baseline row, ahead of the stages
    stages = ([manifest["input"]] if manifest.get("input") else []) + (manifest.get("stages") or [])
    measured = [s for s in stages if s.get("output")]
    metric = next(
        (k for s in measured for k in ("accuracy", "agreement", "cosine", "rel-error") if k in s.get("metrics", {})),
        None,
    )
    machine = manifest.get("machine") or {}
    versions = manifest.get("tool_versions") or {}
    body = [
        f"<h1>onnxforge run: {_esc(recipe.get('name', 'pipeline'))}</h1>",
        f'<p class="meta">model {_esc(recipe.get("model", "?"))}, target {_esc(recipe.get("target", "?"))}, '
        f"created {_esc(manifest.get('created', '?'))}; {_esc(machine.get('cpu', ''))}, "
        f"{_esc(machine.get('cores', '?'))} cores; "
        + _esc(", ".join(f"{k} {v}" for k, v in versions.items()))
        + "</p>",
    ]
    rows = []
    for s in stages:
        m = s.get("metrics", {})
        out = s.get("output") or {}
        rows.append((
            _esc(s["name"]), _esc(s["status"]), _esc(out.get("path", "-")),
            f'{out["bytes"] / 1024:,.1f} KB' if out.get("bytes") is not None else "-",
            _quality_text(metric, m.get(metric) if metric else None),
            _fmt(m["latency_p50_ms"]) if "latency_p50_ms" in m else "-",
            _spread(m),
            f'{m["speedup_vs_first"]:.2f}x' if "speedup_vs_first" in m else "-",
            _esc(s.get("error") or s.get("summary") or ""),
        ))
    body += [
        "<h2>Stages</h2>",
        _table(("stage", "status", "file", "size", metric or "quality", "p50 ms (b=1)", "p90/p50", "speedup",
                "what it did"), rows, left=3),
    ]
    if measured:
        body += _comparison_charts(measured, metric)
        body += _op_time_section(measured)
    for s in stages:
        if s.get("kind") == "quantize":
            body += _sqnr_section(s)
        elif s.get("kind") == "distill":
            body += _distill_section(s)
    histograms = [
        _latency_histogram(s["metrics"]["latency"], f"{s['name']}: latency distribution", _PALETTE[i % len(_PALETTE)])
        for i, s in enumerate(measured)
        if isinstance(s.get("metrics", {}).get("latency"), dict)
    ]
    if any(histograms):
        body += [
            "<h2>Latency distribution per stage</h2>",
            '<p class="meta">All stages timed interleaved in one process (batch 1, 1 thread), so their ratios hold '
            "even when the machine drifts.</p>",
            '<div class="charts">', *histograms, "</div>",
        ]
    return _page(f"onnxforge run: {recipe.get('name', 'pipeline')}", body)


def write_run_report(manifest_json: dict, run_dir: str | os.PathLike) -> Path:
    """``report.html`` next to ``manifest.json`` in ``run_dir``."""
    return write_report(
        Path(run_dir) / REPORT_NAME, run_report_html(json.loads(json.dumps(manifest_json, default=str)))
    )
