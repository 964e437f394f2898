"""The demo writes its data and recipe into the run folder, so ``onnxforge run`` repeats it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from onnxforge.datasets import load_digits_split
from onnxforge.demo import CACHE_DIR

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

    manifest = json.loads(out)
    assert [s["status"] for s in manifest["stages"]] == ["cached"] * len(data["stages"])


def test_a_first_demo_does_the_work_even_when_the_shared_cache_holds_it(demo_run, cli, tmp_path, monkeypatch):
    """A new clone's first ``make demo`` computes every stage: the shared cache (here the one the session's
    demo run filled, as a teammate's or another checkout's would be) is not the demo's; the demo keeps
    its own in the run folder, and a second run says which stages it restored, from where and when."""
    assert demo_run.code == 0, demo_run.err
    monkeypatch.setenv("ONNXFORGE_CACHE_DIR", str(demo_run.cache_dir))  # the shared cache holds every stage
    run_dir = tmp_path / "fresh"
    code, out, err = cli("demo", "-o", run_dir, "--json", "-")
    assert code == 0, err
    first = json.loads(out)
    assert first["stages"] and all(s["status"] == "done" for s in first["stages"])
    private = run_dir / CACHE_DIR
    assert private.is_dir() and any(private.iterdir())

    code, out, err = cli("demo", "-o", run_dir, "--json", "-")
    assert code == 0, err
    again = json.loads(out)
    assert [s["status"] for s in again["stages"]] == ["cached"] * len(first["stages"])
    for stage in again["stages"]:
        assert str(private) in stage["cache"] and "entry written" in stage["cache"], stage["cache"]

    code, out, err = cli("demo", "-o", run_dir)  # the table a person reads says the same under it
    assert code == 0, err
    flat = "".join(out.split())  # rich wraps long lines
    assert flat.count("cached:") == len(first["stages"]) and str(private) in flat and "entrywritten" in flat
