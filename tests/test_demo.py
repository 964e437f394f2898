"""The demo writes its data and recipe into the run folder, so ``onnxforge run`` repeats it."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from onnxforge.datasets import load_digits_split

pytestmark = pytest.mark.slow  # shares the session's demo run (about 15-25 s, once)


def test_demo_data_is_the_fixed_digits_split(demo_run):
    assert demo_run.code == 0, demo_run.err
    split = load_digits_split()
    with np.load(demo_run.run_dir / "data" / "calibration.npz") as calib:
        assert set(calib.files) == {"image"}
        np.testing.assert_array_equal(calib["image"], split.train_images[:256])
    with np.load(demo_run.run_dir / "data" / "eval.npz") as held_out:
        np.testing.assert_array_equal(held_out["image"], split.test_images)
        np.testing.assert_array_equal(held_out["label"], split.test_labels)
    # calibration never sees an evaluation image
    train = {img.tobytes() for img in split.train_images[:256]}
    assert not any(img.tobytes() in train for img in split.test_images)


def test_written_recipe_repeats_the_run_from_cache(demo_run, cli):
    recipe = demo_run.run_dir / "recipe.yaml"
    data = yaml.safe_load(recipe.read_text())
    assert data["model"] == "builtin:digits_cnn"
    code, out, err = cli("run", recipe, "-o", demo_run.run_dir, "--json", "-", "--cache-dir", demo_run.cache_dir)
    assert code == 0, err
    import json

    manifest = json.loads(out)
    assert [s["status"] for s in manifest["stages"]] == ["cached"] * len(data["stages"])
