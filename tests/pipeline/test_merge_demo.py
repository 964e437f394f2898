"""The demo ends in a merge stage: uint8 digit images in, label and score out, and the merged graph
keeps the accuracy of the network it wraps (shares the session's demo run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_model

from onnxforge.datasets import load_digits_split

pytestmark = pytest.mark.slow


def test_demo_merge_stage_takes_uint8_images_and_keeps_the_networks_accuracy(demo_run):
    assert demo_run.code == 0, demo_run.err
    manifest = json.loads((demo_run.run_dir / "manifest.json").read_text())
    stages = {s["name"]: s for s in manifest["stages"]}
    merge, network = manifest["stages"][-1], stages["quantize"]
    assert merge["kind"] == "merge" and merge["inputs"] == [str(demo_run.run_dir / "04_quantize.onnx")]
    assert merge["output"]["inputs"] == [{"name": "image", "shape": ["batch", 32, 32, 1], "dtype": "uint8"}]
    assert [o["name"] for o in merge["output"]["outputs"]] == ["label", "score"]
    assert merge["verified"] and merge["result"]["parity"]["ok"]
    accuracy = merge["result"]["accuracy"]
    assert accuracy["samples"] == 450
    assert accuracy["merged"] == accuracy["network"] == network["metrics"]["accuracy"]
    assert merge["metrics"]["accuracy"] == accuracy["merged"]

    # what a deployed caller does: raw pixels in, labels out
    split = load_digits_split()
    pixels = np.rint(split.test_images * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    label, score = run_model(demo_run.run_dir / merge["output"]["path"], {"image": pixels})
    assert (label == split.test_labels).mean() == pytest.approx(accuracy["merged"])
    assert ((0 < score) & (score <= 1)).all()
