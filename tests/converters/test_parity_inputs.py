"""The inputs the export parity check runs: two sizes of every dynamic dim, shared dim names kept
consistent, token ids from the example's values, padding when the example mask had it."""

from __future__ import annotations

import numpy as np
import pytest

from onnxforge.converters._parity_inputs import parity_feeds, sample_feeds
from onnxforge.errors import CalibrationDataError, UsageError
from onnxforge.model_io import TensorSpec

IDS = TensorSpec("input_ids", ("batch", "sequence"), np.dtype(np.int64))
MASK = TensorSpec("attention_mask", ("batch", "sequence"), np.dtype(np.int64))


def _examples():
    ids = np.array([[101, 7592, 2088, 102, 0, 0], [101, 2023, 2003, 1037, 3231, 102]])
    mask = (ids != 0).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


def test_two_sizes_of_each_dynamic_dim_shared_by_name():
    feeds = parity_feeds([IDS, MASK], examples=_examples())
    assert [f["input_ids"].shape for f in feeds] == [(1, 6), (3, 5)]
    for feed in feeds:
        assert feed["input_ids"].shape == feed["attention_mask"].shape
        assert feed["input_ids"].dtype == np.int64
        assert set(np.unique(feed["input_ids"])) <= {0, 101, 102, 1037, 2003, 2023, 2088, 3231, 7592}


def test_padded_example_mask_gives_padded_masks():
    mask = parity_feeds([IDS, MASK], examples=_examples())[1]["attention_mask"]
    assert mask[0].all()  # first row unpadded
    assert (mask.sum(axis=1) >= 1).all()
    assert not mask.all()  # seed 1 pads at least one of the other rows
    for row in mask:  # ones then zeros: a prefix, like padding
        assert (np.diff(row) <= 0).all()


def test_static_model_gets_one_feed():
    spec = TensorSpec("x", (2, 3), np.dtype(np.float32))
    feeds = parity_feeds([spec])
    assert len(feeds) == 1 and feeds[0]["x"].shape == (2, 3)


def test_dynamic_dim_without_a_size_is_a_usage_error():
    with pytest.raises(UsageError, match="dynamic dimension 1"):
        parity_feeds([IDS])


def test_sample_at_two_batch_sizes(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(path, input_ids=np.arange(40).reshape(5, 8), attention_mask=np.ones((5, 8), np.int32))
    spec_ids = TensorSpec("input_ids", ("batch", 8), np.dtype(np.int64))
    spec_mask = TensorSpec("attention_mask", ("batch", 8), np.dtype(np.int64))
    feeds = sample_feeds(path, [spec_ids, spec_mask])
    assert [f["input_ids"].shape for f in feeds] == [(1, 8), (3, 8)]
    assert feeds[0]["attention_mask"].dtype == np.int64  # cast to the model's dtype
    np.testing.assert_array_equal(feeds[1]["input_ids"], np.arange(24).reshape(3, 8))


def test_sample_with_the_wrong_shape(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(path, input_ids=np.zeros((2, 7), np.int64))
    with pytest.raises(CalibrationDataError, match="shape 2x7"):
        sample_feeds(path, [TensorSpec("input_ids", ("batch", 8), np.dtype(np.int64))])
