"""``--max-samples`` bounds every use of the data (issue 17): calibration, the held-out split, eval
scoring and the reading of the file itself. A 130,000-sample file used for 64 samples once had
26,000 samples held out and scored, and was decoded whole (a 5 GB file: over 10 minutes at 5.5 GB).

The tests count what is read from the file (every row range ``StoredArray.rows`` returns) and how many
samples are scored, rather than timing anything.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import run_model, save
from onnx_graphs import model_from_text

from onnxforge.pipeline.calibration import npy_rows

# The tiny test models are overhead-bound (int8 measures ~0.73x fp32), so quantize would keep the input
# and exit 4 (issue 23); these tests are about other things, so int8 is timed 2x faster (conftest.int8_faster).
pytestmark = pytest.mark.usefixtures("int8_faster")

BIG = 130_000
FEATURES = 8
PROBE = 8  # samples of a file read up front to see how its inputs are fed (files._PROBE)
PLAN = 1  # quantize's memory plan reads the first sample again for the data's real shapes


def _mlp():
    rng = np.random.default_rng(0)
    return model_from_text(
        """
        h = MatMul (x, w1)
        a = Relu (h)
        y = MatMul (a, w2)
        """,
        {"w1": rng.standard_normal((FEATURES, 16)).astype(np.float32),
         "w2": rng.standard_normal((16, 4)).astype(np.float32)},
        f"float[N,{FEATURES}] x", "float[N,4] y",
    )


@pytest.fixture
def model_path(tmp_path) -> Path:
    return save(_mlp(), tmp_path / "mlp.onnx")


def _big_npz(path: Path, *, labels: bool = False, compressed: bool = False, seed: int = 1) -> Path:
    x = np.random.default_rng(seed).standard_normal((BIG, FEATURES)).astype(np.float32)
    arrays = {"x": x}
    if labels:
        arrays["label"] = run_model(_mlp(), {"x": x})[0].argmax(1).astype(np.int64)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


@pytest.fixture
def rows_read(monkeypatch) -> Counter:
    """{(file name, key): rows read}, counted at the one place file data is read."""
    counts: Counter = Counter()
    original = npy_rows.StoredArray.rows

    def counting(self, start, stop):
        out = original(self, start, stop)
        counts[(self.path.name, (self.member or "").removesuffix(".npy"))] += len(out) if out.ndim else 1
        return out

    monkeypatch.setattr(npy_rows.StoredArray, "rows", counting)
    return counts


@pytest.fixture
def scored(monkeypatch) -> list[int]:
    """How many samples each scoring pass of quantize's candidates (and fp32) ran on."""
    from onnxforge.pipeline import reference

    sizes: list[int] = []
    original = reference.run_outputs

    def counting(session, samples, batch_size):
        sizes.append(len(samples))
        return original(session, samples, batch_size)

    monkeypatch.setattr(reference, "run_outputs", counting)  # every scoring goes through Reference
    return sizes


def _quantize(cli, model_path, tmp_path, *extra) -> dict:
    code, out, err = cli("quantize", model_path, "-o", tmp_path / "int8.onnx", "--scheme", "qdq-u8s8-per-tensor",
                         "--tolerance", "100", "--no-mixed-precision", "--json", "-", *extra)
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
def test_max_samples_bounds_calibration_and_the_held_out_split(cli, model_path, tmp_path, rows_read, scored,
                                                               compressed):
    data = _big_npz(tmp_path / "big.npz", compressed=compressed)
    result = _quantize(cli, model_path, tmp_path, "--calibration", data, "--max-samples", "64")
    assert result["calibration_samples"] == 64
    assert result["eval_samples"] == 16  # 64 * 0.2 / 0.8 held out, not 20% of 130,000
    assert scored and max(scored) == 16
    assert rows_read[("big.npz", "x")] <= 64 + 16 + PROBE + PLAN  # the file is never read whole


def test_max_samples_bounds_the_eval_file(cli, model_path, tmp_path, rows_read, scored):
    calibration = _big_npz(tmp_path / "calib.npz")
    evaluation = _big_npz(tmp_path / "eval.npz", labels=True, seed=2)
    result = _quantize(cli, model_path, tmp_path, "--calibration", calibration, "--eval", evaluation,
                       "--max-samples", "64")
    assert result["calibration_samples"] == 64 and result["eval_samples"] == 64
    assert max(scored) == 64
    assert rows_read[("eval.npz", "x")] <= 64 + PROBE + PLAN and rows_read[("eval.npz", "label")] <= 64 + PROBE
    assert rows_read[("calib.npz", "x")] <= 64 + PROBE + PLAN
    assert any("first 64 samples" in note for note in result["notes"])  # the report says eval was cut


def test_without_max_samples_calibration_is_still_bounded(cli, model_path, tmp_path, rows_read, scored):
    data = _big_npz(tmp_path / "big.npz")
    result = _quantize(cli, model_path, tmp_path, "--calibration", data)
    assert result["calibration_samples"] == 256 and result["eval_samples"] == 64
    assert rows_read[("big.npz", "x")] <= 256 + 64 + PROBE + PLAN


@pytest.mark.parametrize("method", ["channels", "low-rank"])
def test_prune_reads_only_what_it_fits_and_holds_out(cli, model_path, tmp_path, rows_read, method):
    data = _big_npz(tmp_path / "big.npz")
    code, _out, err = cli("prune", model_path, "-o", tmp_path / "small.onnx", "--method", method, "--ratio", "0.25",
                          "--calibration", data, "--tolerance", "100", "--json", "-")
    assert code == 0, err
    assert rows_read[("big.npz", "x")] <= 256 + 256 + PROBE  # calibration_samples + MAX_HELD_OUT


@pytest.mark.parametrize("method", ["channels", "low-rank", "magnitude"])
def test_prune_max_samples_bounds_the_eval_scoring_and_the_fit(cli, model_path, tmp_path, rows_read, method):
    # prune scored every sample of --eval, whatever was asked: 130,000 here
    evaluation = _big_npz(tmp_path / "eval.npz", labels=True, seed=2)
    args = ["--eval", evaluation, "--max-samples", "32", "--tolerance", "100", "--json", "-"]
    if method != "magnitude":
        args += ["--calibration", _big_npz(tmp_path / "calib.npz"), "--ratio", "0.25"]
    code, out, err = cli("prune", model_path, "-o", tmp_path / "small.onnx", "--method", method, *args)
    assert code == 0, err
    assert rows_read[("eval.npz", "x")] <= 32 + PROBE and rows_read[("eval.npz", "label")] <= 32 + PROBE
    if method != "magnitude":
        assert rows_read[("calib.npz", "x")] <= 32 + PROBE
    assert "the first 32" in out  # the report says the eval data was cut


def test_recipe_max_samples_bounds_the_stages_and_the_runners_scoring(cli, model_path, tmp_path, rows_read):
    _big_npz(tmp_path / "calib.npz")
    _big_npz(tmp_path / "eval.npz", labels=True, seed=2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {model_path.name}\ncalibration: calib.npz\neval: eval.npz\nmax_samples: 32\n"
        "stages:\n  - quantize: {schemes: [qdq-u8s8-per-tensor], mixed_precision: false, tolerance: 100}\n"
    )
    code, _, err = cli("run", recipe, "-o", tmp_path / "run", "--json", tmp_path / "run.json")
    assert code == 0, err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    stage = manifest["stages"][0]
    assert stage["config"]["max_samples"] == 32  # filled from the recipe's top level
    assert stage["result"]["eval_samples"] == 32
    assert stage["metrics"]["accuracy"] == pytest.approx(
        next(c["score"] for c in stage["result"]["candidates"] if c["scheme"] == stage["result"]["chosen"]))
    # the stage reads 32 (+ probe), the runner's scoring 32 (+ probe) again: never the 130,000
    assert rows_read[("eval.npz", "x")] <= 2 * (32 + PROBE)


# ----------------------------------------------------------------------------------------------
# Reading rows by seeking gives exactly numpy's rows


@pytest.mark.parametrize("form", ["npy", "savez", "savez_compressed", "fortran"])
def test_rows_equal_numpy_slices(tmp_path, form):
    rng = np.random.default_rng(3)
    array = rng.standard_normal((1000, 3, 5)).astype(np.float32)
    if form == "fortran":
        array = np.asfortranarray(array)
    if form == "npy":
        path = tmp_path / "a.npy"
        np.save(path, array)
        stored = npy_rows.stored_arrays(path)[""]
    else:
        path = tmp_path / "a.npz"
        (np.savez_compressed if form == "savez_compressed" else np.savez)(path, a=array, other=np.arange(7))
        stored = npy_rows.stored_arrays(path)["a"]
    assert stored.shape == array.shape and stored.dtype == array.dtype
    for start, stop in [(0, 1), (0, 1000), (17, 80), (999, 1000), (990, 5000), (500, 500), (1200, 1300)]:
        np.testing.assert_array_equal(stored.rows(start, stop), array[start:stop])


def test_a_truncated_file_is_a_clear_error(tmp_path):
    from onnxforge.errors import CalibrationDataError

    path = tmp_path / "a.npy"
    np.save(path, np.zeros((1000, 8), np.float32))
    path.write_bytes(path.read_bytes()[:2000])
    stored = npy_rows.stored_arrays(path)[""]
    np.testing.assert_array_equal(stored.rows(0, 10), np.zeros((10, 8), np.float32))  # what is there reads fine
    with pytest.raises(CalibrationDataError, match="truncated"):
        stored.rows(0, 1000)
