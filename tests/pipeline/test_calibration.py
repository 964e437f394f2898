"""Calibration/evaluation data: loading .npz/.npy files and folders, checking them against the model,
and feeding them in batches."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_images, write_npz

from onnxforge.errors import CalibrationDataError
from onnxforge.model_io import TensorSpec
from onnxforge.pipeline.calibration import CalibrationReader, SampleSet, load_samples, model_batch_size

X = TensorSpec("x", ("N", 3, 8, 8), np.dtype("float32"))
IDS = TensorSpec("ids", ("N", 4), np.dtype("int64"))


def test_npz_with_labels(tmp_path):
    images = random_images(10).astype(np.float64)  # float64 is cast to the model's float32
    path = write_npz(tmp_path / "d.npz", x=images, label=np.arange(10) % 3, extra=np.zeros(2))
    samples = load_samples(path, [X])
    assert set(samples.inputs) == {"x"}  # labels and unrelated arrays are not inputs
    assert samples.inputs["x"].dtype == np.float32
    np.testing.assert_allclose(samples.inputs["x"], images.astype(np.float32))
    np.testing.assert_array_equal(samples.labels, np.arange(10) % 3)
    assert len(samples) == 10


def test_integer_inputs_are_cast_between_integer_types(tmp_path):
    path = write_npz(tmp_path / "ids.npz", ids=np.arange(8, dtype=np.int32).reshape(2, 4))
    samples = load_samples(path, [IDS])
    assert samples.inputs["ids"].dtype == np.int64


def test_folder_of_npz_is_concatenated_in_name_order(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    a, b = random_images(3, seed=1), random_images(2, seed=2)
    write_npz(folder / "b.npz", x=b)
    write_npz(folder / "a.npz", x=a)
    samples = load_samples(folder, [X])
    np.testing.assert_array_equal(samples.inputs["x"], np.concatenate([a, b]))


def test_npy_feeds_a_single_input_model(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, random_images(4))
    assert len(load_samples(path, [X])) == 4
    with pytest.raises(CalibrationDataError, match="single-input"):
        load_samples(path, [X, IDS])


def test_inputs_with_different_sample_counts(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=random_images(4), ids=np.zeros((3, 4), np.int64))
    with pytest.raises(CalibrationDataError, match="x"):
        load_samples(path, [X, IDS])


def test_too_few_samples(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=random_images(2))
    with pytest.raises(CalibrationDataError, match="2 samples"):
        load_samples(path, [X], min_samples=5)


def test_labels_required(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=random_images(2))
    with pytest.raises(CalibrationDataError, match="label"):
        load_samples(path, [X], want_labels=True)


def test_split_holds_out_the_last_samples():
    samples = SampleSet({"x": np.arange(10)[:, None]}, np.arange(10), "mem")
    first, held = samples.split(0.2)
    np.testing.assert_array_equal(first.inputs["x"][:, 0], np.arange(8))
    np.testing.assert_array_equal(held.inputs["x"][:, 0], [8, 9])
    np.testing.assert_array_equal(held.labels, [8, 9])
    assert len(SampleSet({"x": np.zeros((3, 1))}, None, "mem").split(0.01)[1]) == 1  # at least one


def test_reader_feeds_every_sample_in_batches_and_rewinds():
    samples = SampleSet({"x": np.arange(10, dtype=np.float32)[:, None]}, None, "mem")
    reader = CalibrationReader(samples, 4, fixed_batch=False)
    batches = list(iter(reader.get_next, None))
    assert [len(b["x"]) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches])[:, 0], np.arange(10))
    reader.rewind()
    assert len(list(iter(reader.get_next, None))) == 3


def test_reader_drops_a_short_batch_for_fixed_batch_models():
    samples = SampleSet({"x": np.arange(10, dtype=np.float32)[:, None]}, None, "mem")
    batches = list(iter(CalibrationReader(samples, 4, fixed_batch=True).get_next, None))
    assert [len(b["x"]) for b in batches] == [4, 4]


def test_model_batch_size():
    assert model_batch_size([X], preferred=16) == 16
    assert model_batch_size([TensorSpec("x", (4, 3), np.dtype("float32"))], preferred=16) == 4
