"""Determinism: the same recipe on the same machine yields byte-identical .onnx files.

Every stage that involves a choice is covered: simplify (three simplifiers, the smallest with
parity kept), magnitude pruning (ranking ties), quantize (calibration, four candidate schemes
chosen by measured latency; see quantize._fastest for the tie rule that keeps latency noise from
flipping the choice).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import make_classifier, random_images, save, write_npz  # noqa: E402

RECIPE = """\
model: classifier.onnx
calibration: calib.npz
stages:
  - simplify
  - prune: {sparsity: 0.3}
  - quantize
"""


def _digests(run_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.glob("*.onnx"))}


def test_same_recipe_twice_gives_identical_models(cli, tmp_path):
    save(make_classifier(), tmp_path / "classifier.onnx")
    write_npz(tmp_path / "calib.npz", x=random_images(64, seed=1))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)

    runs = []
    for name in ("first", "second"):
        code, _, err = cli("run", recipe, "-o", tmp_path / name, "--force")
        assert code == 0, err
        runs.append(tmp_path / name)

    first, second = (_digests(r) for r in runs)
    assert list(first) == ["01_simplify.onnx", "02_prune.onnx", "03_quantize.onnx"]
    assert first == second, "the same recipe produced different model bytes"
    chosen = [
        next(s["result"]["chosen"] for s in json.loads((r / "manifest.json").read_text())["stages"]
             if s["kind"] == "quantize")
        for r in runs
    ]
    assert chosen[0] == chosen[1]
