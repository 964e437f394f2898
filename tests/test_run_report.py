"""The run report's charts: where each stage's time goes per op type (profiled by the runner, cached),
quantize's SQNR per layer with the graph outputs always shown, the distill training curve, p90/p50
beside every p50; and a missing number never drawn as a zero."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from browser import chromium, run_chromium  # noqa: F401  (chromium: a fixture)
from conftest import latency_stats, make_classifier, random_images, save, write_npz

from onnxforge.run_report import op_classes, run_report_html


def _stage(name: str, kind: str, p50: float, per_op: dict[str, float], **extra) -> dict:
    latency = {"p50_ms": p50, "p90_ms": p50 * 1.1, "p99_ms": p50 * 1.2}
    op_time = {"per_op_us": per_op, "op_sum_us": sum(per_op.values()), "runs": 12, "profiler_overhead": 1.1}
    return {"name": name, "kind": kind, "status": "done", "output": {"path": f"{name}.onnx", "bytes": 2048},
            "metrics": {"latency_p50_ms": p50, "latency": latency, "op_time": op_time}, **extra}


def _manifest() -> dict:
    layer_errors = [
        {"node": "conv1", "op_type": "Conv", "output": "h1", "local_sqnr_db": 45.0, "sqnr_db": 44.0,
         "relative_error": 0.006, "graph_output": False},
        {"node": "fc", "op_type": "Gemm", "output": "z", "local_sqnr_db": 41.0, "sqnr_db": None,
         "relative_error": 0.0, "graph_output": False},
        {"node": "fc", "op_type": "Gemm", "output": "logits", "local_sqnr_db": None, "sqnr_db": -15.6,
         "relative_error": 6.0, "graph_output": True},
    ]
    history = [{"epoch": e, "loss": None if e == 0 else 1.0 / e, "held_out": 0.5 + 0.1 * e,
                "held_out_loss": 2.0 / (e + 1), "seconds": 1.5 * e} for e in range(4)]
    return {
        "recipe": {"name": "charts"},
        "input": _stage("input", "input", 2.0, {"Conv": 1800.0, "Gemm": 150.0, "Relu": 50.0}),
        "stages": [
            _stage("distill", "distill", 1.0, {"Conv": 900.0, "Gemm": 100.0},
                   result={"history": history, "held_out_metric": "agreement", "loss": "kl", "best_epoch": 3,
                           "stopped": "epochs"}),
            _stage("quantize", "quantize", 0.5, {"QLinearConv": 300.0, "QuantizeLinear": 100.0, "Gemm": 50.0,
                                                 "Relu": 50.0}, result={"layer_errors": layer_errors}),
            {"name": "merge", "kind": "merge", "status": "done", "output": {"path": "m.onnx", "bytes": 10},
             "metrics": {"accuracy": 0.9}},
        ],
    }


def test_op_classes_name_what_holds_most_of_the_time():
    shares = [{"Conv": 0.9, "Gemm": 0.07, "Relu": 0.03}, {"QLinearConv": 0.6, "QuantizeLinear": 0.3, "Gemm": 0.1}]
    assert op_classes(shares) == ["Conv", "QLinearConv", "QuantizeLinear"]  # Relu and Gemm: under 10% each


def test_the_report_draws_op_time_sqnr_and_the_training_curve():
    page = run_report_html(_manifest())
    # op time: each bar as long as its stage's p50, cut by the op shares, the rest as "other"
    segments = re.findall(r'<rect class="seg" data-class="([^"]+)" x="[0-9.]+" y="([0-9.]+)" width="([0-9.]+)"', page)
    by_row: dict[str, dict[str, float]] = {}
    for op, y, width in segments:
        by_row.setdefault(y, {})[op] = float(width)
    rows = list(by_row.values())
    assert len(rows) == 3  # the merge stage has no profile: no bar, no zero
    assert sum(rows[0].values()) == pytest.approx(2 * sum(rows[1].values()), rel=0.01)
    assert rows[0]["Conv"] == pytest.approx(0.9 * sum(rows[0].values()), rel=0.01)
    # QLinearConv + QuantizeLinear hold 80%: Gemm is named too (90% covered); Relu is the "other"
    assert set(rows[2]) == {"QLinearConv", "QuantizeLinear", "Gemm", "other"}
    assert rows[2]["other"] == pytest.approx(rows[2]["Gemm"], rel=0.01)  # 50 µs each of 500
    assert "Relu" not in {op for op, _, _ in segments}
    # SQNR: the graph output is always there, with its real (negative) dB
    labels = re.findall(r'<text class="value"[^>]*>([^<]*)</text>', page)
    assert "-15.6 dB" in labels and "identical" in labels and "0 dB" not in labels
    assert "output logits" in page and "graph output logits at <b>-15.6 dB</b>" in page
    # training curve: one point per epoch with a loss (epoch 0 has none), per series
    curves = re.findall(r'<polyline class="series" data-series="([^"]+)" points="([^"]+)"', page)
    points = {name: len(pts.split()) for name, pts in curves}
    assert points == {"train loss": 3, "held-out loss": 4, "held-out agreement": 4}
    # a stage without a latency says so in the chart, never "0 ms"
    assert "not timed" in labels and "0 ms" not in labels
    assert "p90/p50" in page


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory):
    """A real run (export, simplify, quantize) of the tiny classifier; int8 timed 2x faster as in the
    quantize tests (conftest.int8_faster), so quantize keeps its int8 model. Per-op profiles are real."""
    from onnxforge.pipeline import reference
    from onnxforge.pipeline.recipe import load_recipe
    from onnxforge.pipeline.runner import run_recipe
    from onnxforge.targets import op_profile

    folder = tmp_path_factory.mktemp("run-report")
    save(make_classifier(), folder / "model.onnx")
    write_npz(folder / "calib.npz", x=random_images(64, seed=1))
    write_npz(folder / "eval.npz", x=random_images(32, seed=2))
    recipe = {"name": "tiny", "model": "model.onnx", "calibration": "calib.npz", "eval": "eval.npz",
              "stages": ["export", "simplify", {"quantize": {"tolerance": 0.5, "schemes": ["qdq-u8s8-per-channel"]}}]}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    calls: list[str] = []
    real_profile = op_profile.profile_ops

    def counted(path, feeds, config):
        calls.append(str(path))
        return real_profile(path, feeds, config)

    def timed(sessions, feeds, rounds=20, **_):
        first = next(iter(sessions))
        return {label: latency_stats(1.0 if label == first else 0.5) for label in sessions}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reference, "compare_latency", timed)
        patch.setattr("onnxforge.pipeline.op_time.profile_ops", counted)
        run_recipe(load_recipe(folder / "recipe.yaml"), folder / "run")
        first_calls = list(calls)
        run_recipe(load_recipe(folder / "recipe.yaml"), folder / "run")  # unchanged: every profile cached
    return folder / "run", first_calls, calls[len(first_calls):]


def test_a_run_profiles_each_model_once_and_the_cache_answers_a_rerun(quantized_run):
    run_dir, first, again = quantized_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    rows = [manifest["input"], *manifest["stages"]]
    # one profile per distinct file (simplify may write export's very bytes: the record answers), none again
    assert len(first) == len({r["output"]["sha256"] for r in rows}) and again == []
    assert all("op_time" in r["metrics"] for r in rows)
    quantize = rows[-1]
    ops = quantize["metrics"]["op_time"]["per_op_us"]
    assert any(op.startswith(("QLinear", "QGemm", "QuantizeLinear", "DequantizeLinear")) for op in ops), ops
    assert "Gemm" in rows[0]["metrics"]["op_time"]["per_op_us"]
    ends = [e for e in quantize["result"]["layer_errors"] if e["graph_output"]]
    assert [e["output"] for e in ends] == [o["name"] for o in quantize["output"]["outputs"]]


_PROBE = """
<script>
window.addEventListener('load', () => {
  const charts = [...document.querySelectorAll('svg.chart')].map(svg => ({
    title: svg.getAttribute('aria-label'),
    width: svg.getBoundingClientRect().width,
    segments: [...svg.querySelectorAll('rect.seg')].filter(r => r.getBBox().width > 0)
      .map(r => r.getAttribute('data-class')),
    bars: [...svg.querySelectorAll('rect.bar')].filter(r => r.getBBox().width > 0).length,
    labels: [...svg.querySelectorAll('text')].map(  // the text drawn, not a tooltip's <title>
      t => [...t.childNodes].filter(n => n.nodeType === Node.TEXT_NODE).map(n => n.textContent).join('')),
  }));
  const out = document.createElement('pre');
  out.id = 'probed';
  out.textContent = JSON.stringify(charts);
  document.body.appendChild(out);
});
</script>
"""


def test_the_run_report_renders_its_charts_in_chromium(chromium, quantized_run, tmp_path):
    """A real run's report.html in headless Chromium: the op-time bars and the SQNR chart are laid out
    with their labels, the graph outputs among them; the screenshot shows the op-time colours."""
    from PIL import Image

    run_dir, _, _ = quantized_run
    page = (run_dir / "report.html").read_text()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    quantize = manifest["stages"][-1]
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _PROBE + "</body>"))
    dom = run_chromium(chromium, "--virtual-time-budget=3000", "--dump-dom", probe.as_uri())
    match = re.search(r'<pre id="probed">(.*?)</pre>', dom.stdout, re.DOTALL)
    assert match, f"Chromium did not render the page: {dom.stderr[-500:]}"
    charts = {c["title"]: c for c in json.loads(match.group(1))}
    op_chart = charts["time per op type, before and after each stage (ms per run)"]
    assert op_chart["width"] > 500 and "Gemm" in op_chart["segments"]
    assert {"input", "export", "simplify", "quantize"} <= set(op_chart["labels"])
    assert any(label.startswith(("QLinear", "QGemm", "QuantizeLinear", "DequantizeLinear"))
               for label in op_chart["labels"]), op_chart["labels"]
    sqnr = charts["SQNR per layer, graph order (dB)"]
    outputs = [o["name"] for o in quantize["output"]["outputs"]]
    assert [f"output {name}" for name in outputs] == [t for t in sqnr["labels"] if t.startswith("output ")]
    ends = [e for e in quantize["result"]["layer_errors"] if e["graph_output"]]
    for end in ends:  # the real dB, as the manifest holds it
        assert f"{end['sqnr_db']:.1f} dB" in sqnr["labels"]
    assert sqnr["bars"] >= 1
    shot = tmp_path / "shot.png"
    result = run_chromium(chromium, "--window-size=1200,2400", f"--screenshot={shot}",
                          (run_dir / "report.html").as_uri())
    assert shot.is_file(), result.stderr[-500:]
    colors = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    from onnxforge.report_charts import SHARE_COLORS

    painted = {rgb for count, rgb in colors if count > 200}
    wanted = {tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in SHARE_COLORS[:2]}
    assert wanted <= painted, "the op-time bars are not visible in the screenshot"


def test_the_run_table_flags_a_noisy_stage_timing():
    from onnxforge.cli.run import _spread

    assert _spread({"p50_ms": 1.0, "p90_ms": 1.1}) == "1.10"
    assert _spread({"p50_ms": 1.0, "p90_ms": 7.0}) == "[yellow]7.00[/]"
    assert _spread(None) == "-"
