"""HTML reports a person can read offline: one self-contained file, charts as inline SVG drawn
here in Python, no scripts, no fonts or styles fetched from anywhere.

Reports are built from the JSON the tools already write, so a report can be rebuilt later from a
saved result: here ``profile_report_html`` (the ``onnxforge profile --json`` payload: latency rows
with their spread and distribution, per-op and per-node time bars, EP placement, the comparison, the
mobile verdicts) and the page parts the others share; ``run_report.py`` draws a run folder's
``manifest.json``, ``optimize_report.py`` an optimize run's Pareto front. Every chart is drawn in
``report_charts.py`` (bar_chart_svg and histogram_svg are imported from there).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxforge._atomic import atomic_write_text
from onnxforge.report_charts import _PALETTE, _esc, _fmt, bar_chart_svg, histogram_svg

__all__ = ["REPORT_NAME", "bar_chart_svg", "histogram_svg", "profile_report_html", "write_report"]

REPORT_NAME = "report.html"

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
# Charts (drawn in report_charts)


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
