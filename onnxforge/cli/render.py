"""What a stage command prints, keyed by pass name and drawn from the stage's result JSON.

Renderers read JSON, not result objects, so a result restored from the cache prints exactly as a fresh
one. A pass without a renderer gets its registry ``summary()`` line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from onnxforge.cli.console import format_score, human_bytes, out, print_notes, speed_words

__all__ = ["render_stage", "renderer"]

Payload = dict[str, Any]
_RENDERERS: dict[str, Callable[[Payload, Path], None]] = {}


def renderer(kind: str) -> Callable[[Callable[[Payload, Path], None]], Callable[[Payload, Path], None]]:
    def add(function: Callable[[Payload, Path], None]) -> Callable[[Payload, Path], None]:
        _RENDERERS[kind] = function
        return function

    return add


def render_stage(kind: str, payload: Payload, output: Path, *, failed: bool) -> None:
    """Print a stage's result; a gate that failed shows every try (quantize shows its candidate table)."""
    if failed and kind != "quantize":
        _render_tries(payload)
        return
    found = _RENDERERS.get(kind)
    if found is not None:
        found(payload, output)
        return
    from onnxforge.pipeline.registry import get_pass

    pass_cls = get_pass(kind)
    out.print(f"[bold green]wrote[/] {escape(str(output))}: {escape(pass_cls.summary(payload) if pass_cls else kind)}")


def _render_tries(payload: Payload) -> None:
    tried = payload.get("tried") or []
    if not tried:
        return
    table = Table(title=f"tries ({payload.get('gate')}; {payload.get('quality', '')})")
    keys = [k for k in tried[0] if not isinstance(tried[0][k], dict)]
    for key in keys:
        table.add_column(key)
    for t in tried:
        table.add_row(*(f"{t[k]:.4g}" if isinstance(t[k], float) else str(t[k]) for k in keys))
    out.print(table)


def _input_name(payload: Payload) -> str:
    inputs = (payload.get("stage") or {}).get("inputs") or []
    return Path(inputs[0]).name if inputs else ""


def _quality_text(note: str) -> str:
    return f"[yellow]{escape(note)}[/]" if note.startswith("quality NOT") else escape(note)


def _speed_text(speed: dict[str, Any] | None) -> str:
    """A measured speedup, said as a person would (0.84x is 'slower', not '0.84x faster')."""
    if not speed:
        return "speed not measured"
    words = speed_words(speed["speedup"], "the input")
    return (f"measured {words} at batch {speed['batch']} (p50 {speed['input_p50_ms']:.3f} -> "
            f"{speed['candidate_p50_ms']:.3f} ms)")


def _parity_summary(parity: dict[str, Any]) -> str:
    from onnxforge.parity import ParityReport

    return ParityReport.from_json(parity).summary()


def _shape_text(spec: dict[str, Any]) -> str:
    return "x".join("?" if d is None else str(d) for d in spec["shape"]) or "scalar"


def _io_lines(payload: Payload) -> None:
    for spec in payload.get("inputs", []):
        out.print(f"  input  {spec['name']}: {_shape_text(spec)} {spec['dtype']}", highlight=False)
    for spec in payload.get("outputs", []):
        out.print(f"  output {spec['name']}: {_shape_text(spec)} {spec['dtype']}", highlight=False)


@renderer("export")
def _export(payload: Payload, output: Path) -> None:
    from onnxforge.model_io import model_file_size

    out.print(f"[bold green]exported[/] {output} ({human_bytes(model_file_size(output))}, opset {payload['opset']}, "
              f"exporter {payload['exporter']})")
    _io_lines(payload)
    if payload.get("parity") is not None:
        out.print(f"  {_parity_summary(payload['parity'])}")
        for o in payload["parity"]["outputs"]:
            bound = f" (allowed {o['allowed']:.3g}, max|ref| {o['scale']:.3g})" if "allowed" in o else ""
            out.print(f"    {o['name']}: max abs {o['max_abs_error']:.3g}{bound}, max rel {o['max_rel_error']:.3g}")
        out.print(f"    inputs run: {escape('; '.join(payload.get('parity_inputs') or []))}", highlight=False)
    print_notes(payload.get("notes", []))


@renderer("simplify")
def _simplify(payload: Payload, output: Path) -> None:
    table = Table(title=f"simplify {_input_name(payload)}".rstrip())
    for col in ("method", "nodes", "size", "time", "parity"):
        table.add_column(col)
    table.add_row("input", str(payload["nodes_before"]), "", "", "")
    for c in payload["candidates"]:
        parity = c["parity"]
        usable = c["error"] is None and parity is not None and parity["ok"]
        worst = max((o["max_abs_error"] for o in parity["outputs"]), default=0.0) if parity else None
        text = c["error"] or ("ok" if usable else f"FAILED ({worst:.2g})" if parity else "-")
        table.add_row(c["method"], str(c["nodes"] or "-"), human_bytes(c["bytes"]), f"{c['seconds']:.2f}s", text)
    out.print(table)
    out.print(f"[bold green]kept[/] {payload['chosen']}: {payload['nodes_before']} -> {payload['nodes_after']} nodes, "
              f"{human_bytes(payload['bytes_before'])} -> {human_bytes(payload['bytes_after'])}, wrote {output}")
    out.print(f"  parity measured on {escape(payload['parity_inputs'])}")
    print_notes(payload.get("notes", []))
    if payload["parity_inputs"].startswith("random") and any(
            c["parity"] and not c["parity"]["ok"] for c in payload["candidates"]):
        out.print("  [yellow]note:[/] parity failed on random inputs; a model with large activations can fail on "
                  "noise and pass on real inputs: give real samples with --data")


@renderer("fp16")
def _fp16(payload: Payload, output: Path) -> None:
    out.print(f"[bold green]wrote[/] {output}: {human_bytes(payload['bytes_before'])} -> "
              f"{human_bytes(payload['bytes_after'])}; {_parity_summary(payload['parity'])}")
    out.print(f"  parity measured on {payload['parity_inputs']}")
    out.print("  fp16 runs fast on GPU tensor cores; on a CPU it is slower than fp32 (profile it with --target cuda)")
    print_notes(payload.get("notes", []))


def _op_classes(report: dict | None) -> None:
    """Where the time went: each op type's share of the per-op time, fp32 and the profiled candidate."""
    if not report:
        return

    def shares(rows: list[dict]) -> str:
        return ", ".join(f"{r['op_type']} {r['share']:.0%}" for r in rows[:6]) or "-"

    out.print(f"time by op type: fp32 {shares(report['before'])}; {escape(report['scheme'])} "
              f"{shares(report['after']) if report['after'] else '(not built)'}")


@renderer("quantize")
def _quantize(payload: Payload, output: Path) -> None:
    """The candidate table, the kept model and its largest errors."""
    metric = payload["metric"]
    config = (payload.get("stage") or {}).get("config") or {}
    table = Table(title=f"quantize {_input_name(payload)} on {config.get('target', 'cpu')} ({payload['gate']})")
    # with labels: top-1 agreement with the input's predictions beside the accuracy (churn it can hide)
    churn = any(c.get("agreement_with_input") is not None for c in payload["candidates"])
    for col in ("candidate", metric, *(["agrees with input"] if churn else []), "p50 ms", "speed vs fp32", "size",
                "verdict"):
        table.add_column(col)
    kept_input = bool(payload.get("kept_input"))
    size_objective = payload.get("objective") == "size"
    table.add_row("fp32 (input)", format_score(metric, payload["fp32_score"]), *(["100.00%"] if churn else []),
                  f"{payload['fp32_latency']['p50_ms']:.3f}", "1.00x", "",
                  "[bold yellow]kept: the input[/]" if kept_input else "reference")
    for c in payload["candidates"]:
        speed = c["speedup_vs_fp32"]
        verdict = c["error"] or ("[bold green]chosen[/]" if c["scheme"] == payload["chosen"] and c["meets_tolerance"]
                                 else "[yellow]kept: the most accurate[/]" if c["scheme"] == payload["chosen"]
                                 else ("not smaller" if size_objective else "not faster") if kept_input
                                 and c["meets_tolerance"]
                                 else "ok" if c["meets_tolerance"] else "[red]over tolerance[/]")
        agreement = c.get("agreement_with_input")
        table.add_row(
            escape(c["scheme"]), format_score(metric, c["score"]),
            *([("-" if agreement is None else f"{agreement:.2%}")] if churn else []),
            f"{c['latency']['p50_ms']:.3f}" if c["latency"] else "-",
            "-" if speed is None else f"{speed:.2f}x" if speed >= 0.995 else f"[yellow]{speed:.2f}x (slower)[/]",
            human_bytes(c["bytes"]), verdict,
        )
    out.print(table)
    _op_classes(payload.get("op_classes"))
    if kept_input:
        better = "smaller" if size_objective else "faster"
        out.print(f"[bold yellow]kept the input:[/] no candidate within tolerance was {better} than the input; "
                  f"wrote it unchanged to {escape(str(payload['path']))}")
        print_notes(payload["notes"])
        return
    chosen = next(c for c in payload["candidates"] if c["scheme"] == payload["chosen"])
    out.print(
        f"[bold green]wrote[/] {payload['path']}: {escape(chosen['scheme'])}, "
        f"{speed_words(chosen['speedup_vs_fp32'])}, "
        f"{metric} {format_score(metric, chosen['score'])} (fp32 {format_score(metric, payload['fp32_score'])})"
    )
    if chosen.get("gate_checks"):
        out.print(f"  gate: {escape(chosen['gate_checks'])}")
    if chosen["float_nodes"]:
        out.print(f"  kept in float: {', '.join(chosen['float_nodes'])}")
    measured = payload.get("layer_errors", [])
    errors = {e["node"]: e for e in measured if not e.get("graph_output")}
    offenders = [errors[n] for n in payload.get("top_offenders", []) if n in errors]
    ends = [e for e in measured if e.get("graph_output")]
    if offenders or ends:
        # the graph outputs always close the table: five nodes above 40 dB say nothing if the output is at -15 dB
        worst = Table(title="largest quantization error vs fp32 (SQNR; lower is worse), and the graph outputs")
        for col in ("node", "op", "local dB", "end-to-end dB", "rel. error"):
            worst.add_column(col, justify="left" if col in ("node", "op") else "right")

        def db(v: float | None) -> str:
            return "inf" if v is None else f"{v:.1f}"

        for e in offenders:
            worst.add_row(
                escape(e["node"]), e["op_type"], db(e["local_sqnr_db"]), db(e["sqnr_db"]), f"{e['relative_error']:.3f}"
            )
        for e in ends:
            worst.add_row(f"[bold]output {escape(e['output'])}[/] ({escape(e['node'])})", e["op_type"], "-",
                          db(e["sqnr_db"]), f"{e['relative_error']:.3f}")
        out.print(worst)
    print_notes(payload["notes"])


@renderer("prune")
def _magnitude(payload: Payload, output: Path) -> None:
    out.print(f"[bold green]wrote[/] {output}: sparsity {payload['achieved_sparsity']:.1%} over "
              f"{len(payload['pruned_layers'])} layers (asked {payload['requested_sparsity']:.0%})")
    out.print(f"  gzip size {human_bytes(payload['gzip_bytes_before'])} -> {human_bytes(payload['gzip_bytes_after'])}; "
              "dense kernels run no faster with zeros, so latency is unchanged")
    _quality_lines(payload)


def _quality_lines(payload: Payload, extra: str = "") -> None:
    if payload.get("score_before") is not None:
        out.print(f"  quality {payload['score_before']:.4f} -> {payload['score_after']:.4f}{extra} ({payload['gate']})")
    out.print(f"  {_quality_text(payload['quality'])}")
    print_notes(payload.get("notes", []))


@renderer("low_rank")
def _low_rank(payload: Payload, output: Path) -> None:
    for name, info in payload["factored_layers"].items():
        error = f", output error {info['output_error']:.4f} on held-out samples" if "output_error" in info else ""
        out.print(f"  {name}: {info['shape'][0]}x{info['shape'][1]} -> rank {info['rank']} "
                  f"(energy {info['energy']:.4f}{error})")
    for name, reason in payload["skipped_layers"].items():
        out.print(f"  [yellow]skipped[/] {name}: {reason}")
    out.print(f"[bold green]wrote[/] {output}: {len(payload['factored_layers'])} layers factored, params "
              f"{payload['params_before']:,} -> {payload['params_after']:,}; {_speed_text(payload['speed'])}")
    _quality_lines(payload)


@renderer("prune_channels")
def _channels(payload: Payload, output: Path) -> None:
    table = Table(title=f"channel pruning of {_input_name(payload)} (ratio {payload['ratio']:.3g})")
    for col in ("layer", "channels", "note"):
        table.add_column(col)
    for name, change in payload["pruned_layers"].items():
        table.add_row(name, change, "pruned")
    for name, reason in payload["skipped_layers"].items():
        table.add_row(name, "-", f"[yellow]skipped:[/] {reason}")
    out.print(table)
    before, after = payload["macs_before"], payload["macs_after"]
    out.print(f"[bold green]wrote[/] {output}: params {payload['params_before']:,} -> {payload['params_after']:,}, "
              f"estimated MACs/sample {before:,} -> {after:,} ({before / max(after, 1):.2f}x fewer); "
              f"{_speed_text(payload['speed'])}")
    if not payload["repaired"]:
        out.print("  no least-squares repair (pass --calibration DATA to refit the layers after pruning)")
    repaired = f", before repair {payload['score_without_repair']:.4f}" if payload["repaired"] and \
        payload.get("score_without_repair") is not None else ""
    _quality_lines(payload, repaired)


@renderer("distill")
def _distill(payload: Payload, output: Path) -> None:
    pruned = next((s["result"] for s in payload.get("stages", []) if s["kind"] == "prune_channels"), None)
    payload = payload.get("distill", payload)
    if pruned:
        out.print(f"pruned {pruned['ratio']:.0%} of the channels: MACs/sample {pruned['macs_before']:,} -> "
                  f"{pruned['macs_after']:,}")
    out.print(
        f"[bold green]wrote[/] {output}: distilled {payload['epochs_run']} epochs in {payload['train_seconds']:.0f} s "
        f"(best epoch {payload['best_epoch']}, stopped by {payload['stopped']}); held-out "
        f"{payload['held_out_metric']} {payload['held_out_before']:.4f} -> {payload['held_out_after']:.4f}"
    )
    out.print(f"  student = pruned graph before training: max err {payload['parity_before']['max_abs_error']:.1e}; "
              f"exported vs trained: max err {payload['parity_after']['max_abs_error']:.1e}")
    if payload.get("scores"):
        s = payload["scores"]
        out.print(f"  eval: teacher {s['teacher']:.4f}, repair only {s['repair_only']:.4f}, distilled "
                  f"{s['distilled']:.4f} ({payload['gate']})")
    print_notes(payload.get("notes", []))


@renderer("merge")
def _merge(payload: Payload, output: Path) -> None:
    from onnxforge.model_io import model_file_size

    out.print(f"[bold green]merged[/] {escape(str(output))} ({human_bytes(model_file_size(output))}): "
              f"{escape(' + '.join(payload['blocks']))}", highlight=False)
    _io_lines(payload)
    out.print(f"  {_parity_summary(payload['parity'])}", highlight=False)
    accuracy = payload.get("accuracy")
    if accuracy:
        table = Table(title=f"top-1 accuracy on {accuracy['samples']} held-out samples")
        table.add_column("graph")
        table.add_column("accuracy", justify="right")
        rows = [(f"member {name}", value) for name, value in (accuracy.get("members") or {}).items()]
        if "network" in accuracy:
            rows.append(("model alone", accuracy["network"]))
        rows.append(("merged graph" if "network" in accuracy else "merged ensemble", accuracy.get("merged")))
        for name, value in rows:
            table.add_row(escape(name), "-" if value is None else f"{value:.2%}")
        out.print(table)
    for old, new in payload.get("renamed", {}).items():
        out.print(f"  renamed {old} -> {new} (the name was taken)", highlight=False)
    print_notes(payload.get("notes", []))
