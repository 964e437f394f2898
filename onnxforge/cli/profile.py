"""``onnxforge profile MODEL``: latency over batch sizes and threads, per-op time, mobile readiness."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from onnxforge.cli.app import cli
from onnxforge.cli.console import emit_json, human_bytes, out, quiet
from onnxforge.cli.options import input_shape_option, json_option, model_argument, target_option
from onnxforge.cli.progress_view import progress_display
from onnxforge.errors import UsageError


@cli.command()
@model_argument
@target_option
@click.option(
    "--batch",
    "batches",
    type=int,
    multiple=True,
    default=(1,),
    show_default=True,
    help="batch size (repeatable: a sweep)",
)
@click.option(
    "--threads",
    "threads",
    type=int,
    multiple=True,
    help="intra-op threads (repeatable; default: onnxruntime's, 2 on mobile)",
)
@input_shape_option
@click.option(
    "--data",
    "sample_data",
    type=click.Path(path_type=Path),
    default=None,
    help="inputs from this .npz instead of random data",
)
@click.option("--min-seconds", type=float, default=1.0, show_default=True, help="time spent per measurement")
@click.option(
    "--per-op", is_flag=True, help="also profile per node and op type (onnxruntime profiler) with EP placement"
)
@click.option("--top", type=int, default=10, show_default=True, help="rows in the per-op tables")
@click.option(
    "--compare",
    "compare",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="time this second model interleaved with MODEL and report the ratio",
)
@click.option(
    "-o",
    "--output-dir",
    "mobile_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="mobile: folder for the .ort and ops config (default: MODEL_mobile/ beside MODEL)",
)
@click.option(
    "--html", "html_path", metavar="PATH", default=None, help="also write a self-contained HTML report with charts"
)
@json_option
def profile(
    model,
    target,
    batches,
    threads,
    input_shapes,
    sample_data,
    min_seconds,
    per_op,
    top,
    compare,
    mobile_dir,
    html_path,
    json_path,
):
    """Measure MODEL's latency on a target (p50/p90/p99, throughput) over batch sizes and thread counts;
    with --per-op the time per op and node and where each ran; --target mobile adds the ORT-format model
    and NNAPI/CoreML readiness."""
    from onnxforge.targets.feeds import parse_input_shapes
    from onnxforge.targets.profile import ProfileConfig
    from onnxforge.targets.profile import profile as run_profile

    if any(b < 1 for b in batches) or any(t < 1 for t in threads):
        raise UsageError("--batch and --threads must be at least 1")
    if top < 1:
        raise UsageError("--top must be at least 1")
    if html_path:
        from onnxforge._atomic import check_output_path

        check_output_path(html_path, model)  # fail before measuring, not after
    config = ProfileConfig(
        target=target, batch_sizes=tuple(batches), threads=tuple(threads) or (None,),
        input_shapes=parse_input_shapes(input_shapes), sample_data=sample_data, min_seconds=min_seconds,
        per_op=per_op, compare=compare, mobile_dir=mobile_dir,
    )
    with progress_display(f"profiling {model}") as update:
        result = run_profile(model, config, update)
    payload = result.to_json()
    emit_json(json_path, payload)
    if html_path:
        from onnxforge.report import profile_report_html, write_report

        write_report(html_path, profile_report_html(payload))
    if quiet(json_path):
        return
    _render_profile(result, top)
    if html_path:
        out.print(f"report: {html_path}")


def _render_profile(result, top: int) -> None:
    emulation = " (host emulation, not a device measurement)" if result.host_emulation else ""
    out.print(f"inputs: {escape(result.inputs)}", highlight=False)
    if result.session_settings is not None:
        applied = ", ".join(f"{k}={v}" for k, v in result.session_settings.items()) or "onnxruntime defaults"
        out.print(f"session settings from {escape(result.path.with_suffix('.session.json').name)}: {escape(applied)}",
                  highlight=False)
    table = Table(title=f"{result.path.name} on {result.target}{emulation}")
    for col in ("batch", "threads", "p50 ms", "p90 ms", "p99 ms", "p90/p50", "p99/p50", "mean ms", "std ms",
                "samples/s", "runs"):
        table.add_column(col, justify="right")
    warnings = []
    for r in result.rows:
        s = r.latency
        noisy = s.noise_warning()
        if noisy:
            warnings.append(f"batch {r.batch}, threads {r.threads or 'default'}: {noisy}")
        mark = "[yellow]" if noisy else ""
        table.add_row(
            str(r.batch),
            str(r.threads or "default"),
            f"{s.p50_ms:.3f}",
            f"{s.p90_ms:.3f}",
            f"{s.p99_ms:.3f}",
            f"{mark}{s.p90_over_p50:.2f}",
            f"{mark}{s.p99_over_p50:.1f}",
            f"{s.mean_ms:.3f}",
            f"{s.std_ms:.3f}",
            f"{s.throughput:.1f}",
            str(s.runs),
        )
    out.print(table)
    for warning in warnings:
        out.print(f"  [yellow]warning:[/] {escape(warning)}")
    if result.op_profile is not None:
        ops = result.op_profile
        kinds = Table(title=f"time per op type (top {top})")
        for col in ("op type", "nodes", "us/run", "share"):
            kinds.add_column(col, justify="left" if col == "op type" else "right")
        for o in ops.op_types[:top]:
            kinds.add_row(o.op_type, str(o.nodes), f"{o.median_us:.1f}", f"{o.share:.1%}")
        out.print(kinds)
        nodes = Table(title=f"slowest nodes (top {top})")
        for col in ("node", "op", "provider", "us/run", "share"):
            nodes.add_column(col, justify="right" if col in ("us/run", "share") else "left")
        for n in ops.nodes[:top]:
            nodes.add_row(n.name, n.op_type, n.provider, f"{n.median_us:.1f}", f"{n.share:.1%}")
        out.print(nodes)
        placement = ", ".join(f"{p.provider}: {p.nodes} nodes ({p.share:.0%})" for p in ops.placement)
        out.print(f"EP placement: {placement}; fell back from {ops.expected_provider}: {len(ops.fallback_nodes)} nodes")
        out.print(
            f"per-op sum {ops.op_sum_ms:.3f} ms of onnxruntime's {ops.ort_run_ms:.3f} ms per profiled run: "
            f"kernels account for {ops.coverage:.0%} of it; the profiler made runs {ops.profiler_overhead:.2f}x "
            f"slower (plain p50 {ops.latency.p50_ms:.3f} ms), so per-op times are shares, not plain latencies "
            f"({ops.runs} runs)"
        )
        for note in ops.notes:
            out.print(f"  [yellow]note:[/] {note}")
    if result.comparison is not None:
        c = result.comparison
        out.print(f"compare (interleaved, batch {c.batch}): {c.model.name} p50 {c.model_latency.p50_ms:.3f} ms, "
                  f"{c.other.name} p50 {c.other_latency.p50_ms:.3f} ms; ratio {c.ratio:.3f} "
                  f"({c.other.name} is {1 / c.ratio:.2f}x as fast)")
    if result.mobile is not None:
        m = result.mobile
        verdicts = Table(title="mobile readiness (onnxruntime usability checker)")
        for col in ("EP", "as given", "fixed shapes", "supported nodes", "partitions", "unsupported ops"):
            verdicts.add_column(col)
        for given, fixed in zip(m.verdicts_as_given, m.verdicts, strict=False):
            verdicts.add_row(fixed.ep.value, given.readiness.value, fixed.readiness.value,
                             f"{fixed.supported_nodes}/{fixed.total_nodes}", str(fixed.partitions),
                             ", ".join(fixed.unsupported_ops) or "-")
        out.print(verdicts)
        fixed_text = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in m.fixed_inputs.items()) or "none needed"
        out.print(f"fixed shapes: {fixed_text}; wrote {m.ort_model} ({human_bytes(m.ort_model.stat().st_size)}), "
                  f"{m.operators_config} ({len(m.required_operators)} op lines)")
        out.print(f".ort vs .onnx: {m.parity.summary()}")
        for note in m.notes:
            out.print(f"  [yellow]note:[/] {note}")
