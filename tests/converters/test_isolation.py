"""The parent side of a child-process export: what the child leaves in its staging folder is checked
and renamed into place whole, and errors cross the process boundary with their hint and paths."""

from __future__ import annotations

import pickle

import onnx
import pytest
from conftest import make_classifier

from onnxforge.converters._isolation import _publish
from onnxforge.errors import ExportError, ModelSourceError, QualityGateError


def _staged_with_external_data(tmp_path):
    staging = tmp_path / ".onnxforge-staging"
    staging.mkdir()
    staged = staging / "model.onnx"
    onnx.save_model(make_classifier(), str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    return staging, staged


def test_publish_moves_the_model_with_its_data(tmp_path):
    staging, staged = _staged_with_external_data(tmp_path)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    _publish(staged, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert list(staging.iterdir()) == []
    onnx.checker.check_model(str(out), full_check=True)


def test_publish_refuses_a_model_without_its_data(tmp_path):
    staging, staged = _staged_with_external_data(tmp_path)
    (staging / "model.onnx.data").unlink()
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    with pytest.raises(ExportError, match="incomplete"):
        _publish(staged, out)
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("error", [
    QualityGateError("parity failed", hint="loosen --atol", best_path="/x/model.onnx"),
    ModelSourceError("exited with code 3", hint="return the model"),
])
def test_errors_survive_pickling(error):
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert (again.message, again.hint, str(again)) == (error.message, error.hint, str(error))
    assert getattr(again, "best_path", None) == getattr(error, "best_path", None)
    assert again.exit_code == error.exit_code
