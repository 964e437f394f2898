"""HTML reports: self-contained (no scripts, no network), written atomically, rebuilt from JSON,
and rendered for real in headless Chromium with charts of non-zero size."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml
from browser import chromium, run_chromium  # noqa: F401  (chromium: a fixture)
from conftest import make_classifier, random_images, save, write_npz

from onnxforge.report import REPORT_NAME, bar_chart_svg, histogram_svg, profile_report_html
from onnxforge.run_report import run_report_html


def _assert_self_contained(text: str) -> None:
    assert "<script" not in text.lower()
    # The only URL allowed is the SVG namespace, which is an identifier, not a fetch.
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", text))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls
    assert not re.search(r"""(src|href)\s*=""", text, re.IGNORECASE)
    assert "@import" not in text and "url(" not in text


@pytest.fixture(scope="module")
def profile_payload(tmp_path_factory) -> dict:
    """A real ``onnxforge profile --per-op --compare`` result on the tiny classifier."""
    from onnxforge.targets.profile import ProfileConfig, profile

    folder = tmp_path_factory.mktemp("report")
    a = save(make_classifier(seed=0), folder / "a.onnx")
    b = save(make_classifier(seed=1), folder / "b.onnx")
    config = ProfileConfig(threads=(1,), per_op=True, per_op_runs=15, compare=b, min_seconds=0.05, min_runs=30)
    return json.loads(json.dumps(profile(a, config).to_json()))


def test_bar_chart_scales_bars_to_values():
    svg = bar_chart_svg([("conv", 300.0), ("relu", 100.0), ("zero", 0.0)], title="t <&>", unit=" µs")
    widths = [float(w) for w in re.findall(r'class="bar"[^>]*width="([0-9.]+)"', svg)]
    assert widths[0] == pytest.approx(3 * widths[1], rel=0.01) and widths[2] == 0
    assert "t &lt;&amp;&gt;" in svg  # labels are escaped


def test_histogram_draws_one_bar_per_nonempty_bin():
    svg = histogram_svg([0.0, 1.0, 2.0, 3.0], [5, 0, 2], title="h", markers=[("p50", 0.5)])
    heights = [float(h) for h in re.findall(r'class="bar"[^>]*height="([0-9.]+)"', svg)]
    assert len(heights) == 2 and heights[0] == pytest.approx(2.5 * heights[1], rel=0.01)
    assert "p50 0.5" in svg


def test_profile_report_is_self_contained_and_complete(profile_payload):
    text = profile_report_html(profile_payload)
    _assert_self_contained(text)
    assert text.count("<svg") >= 5  # latency histogram, op types, nodes, comparison bars + histograms
    for node in profile_payload["per_op"]["nodes"][:3]:
        assert node["name"] in text
    assert "CPUExecutionProvider" in text and "p50 ratio" in text


def test_cli_html_written_atomically(cli, tmp_path, classifier_path):
    report = tmp_path / "out" / "report.html"
    code, _stdout, stderr = cli("profile", classifier_path, "--per-op", "--min-seconds", "0.05", "--html", report)
    assert code == 0, stderr
    assert report.is_file() and "<svg" in report.read_text()
    assert [p.name for p in report.parent.iterdir()] == ["report.html"]  # no temporary file left
    code, _, stderr = cli("profile", classifier_path, "--html", tmp_path / "out")  # a folder: refused up front
    assert code == 2 and "folder" in stderr


def test_run_folder_gets_a_report_from_its_manifest(tmp_path):
    from onnxforge.pipeline.recipe import load_recipe
    from onnxforge.pipeline.runner import run_recipe

    save(make_classifier(), tmp_path / "model.onnx")
    images = random_images(32, seed=2)
    write_npz(tmp_path / "eval.npz", x=images, label=np.zeros(32, dtype=np.int64))
    recipe = {"name": "tiny", "model": "model.onnx", "eval": "eval.npz", "stages": ["export", "simplify"]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "run"
    run_recipe(load_recipe(tmp_path / "recipe.yaml"), run_dir)
    report = run_dir / REPORT_NAME
    assert report.is_file()
    text = report.read_text()
    _assert_self_contained(text)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    def undated(page: str) -> str:
        return re.sub(r"written by onnxforge, [^<]*", "", page)

    assert undated(text) == undated(run_report_html(manifest))  # the report is the manifest, drawn
    for stage in manifest["stages"]:
        assert stage["name"] in text
    assert "size (KB)" in text and "p50 latency" in text and "latency distribution" in text


# ----------------------------------------------------------------------------------------------
# Real rendering in headless Chromium


_MEASURE_SCRIPT = """
<script>
window.addEventListener('load', () => {
  const sizes = [...document.querySelectorAll('svg.chart')].map(svg => {
    const box = svg.getBoundingClientRect();
    const bars = [...svg.querySelectorAll('rect.bar')].map(r => r.getBBox().width * r.getBBox().height);
    return [box.width, box.height, bars.filter(a => a > 0).length];
  });
  const out = document.createElement('pre');
  out.id = 'measured';
  out.textContent = JSON.stringify(sizes);
  document.body.appendChild(out);
});
</script>
"""


def test_report_renders_in_chromium(chromium, tmp_path, profile_payload):
    from PIL import Image

    html_text = profile_report_html(profile_payload)
    page = tmp_path / "report.html"
    page.write_text(html_text)
    # Layout: every chart has a real size in the browser and draws visible bars.
    probe = tmp_path / "probe.html"
    probe.write_text(html_text.replace("</body>", _MEASURE_SCRIPT + "</body>"))
    dom = run_chromium(chromium, "--virtual-time-budget=3000", "--dump-dom", probe.as_uri())
    match = re.search(r'<pre id="measured">(.*?)</pre>', dom.stdout, re.DOTALL)
    assert match, f"Chromium did not render the page: {dom.stderr[-500:]}"
    sizes = json.loads(match.group(1))
    assert len(sizes) == html_text.count('<svg class="chart"')
    assert all(w > 100 and h > 50 for w, h, _ in sizes), sizes
    assert all(bars >= 1 for _, _, bars in sizes), sizes
    # Pixels: the unmodified report's screenshot is not blank and has the bar colours in it.
    shot = tmp_path / "shot.png"
    result = run_chromium(chromium, "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri())
    assert shot.is_file(), result.stderr[-500:]
    image = Image.open(shot).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 20)
    assert len(colors) > 50  # text and charts, not one flat colour
    blue = sum(count for count, (r, g, b) in colors if (r, g, b) == (0x3B, 0x6F, 0xB6))
    assert blue > 500, "no chart bars visible in the screenshot"


def test_profile_report_puts_the_spread_beside_every_latency_and_flags_noise(profile_payload):
    quiet = json.loads(json.dumps(profile_payload))
    for row in quiet["rows"]:
        row["p90_ms"], row["p99_ms"] = row["p50_ms"] * 1.1, row["p50_ms"] * 1.5
    text = profile_report_html(quiet)
    assert "p90/p50" in text and "<td>1.10</td>" in text and "Noisy timing" not in text
    noisy = json.loads(json.dumps(quiet))
    noisy["rows"][0]["p99_ms"] = noisy["rows"][0]["p50_ms"] * 200  # the p99 of issue 25
    text = profile_report_html(noisy)
    assert "Noisy timing in 1 of" in text and '<span class="note">200.0</span>' in text
