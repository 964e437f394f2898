"""What a user is told about a model with no inputs and about a path that is not UTF-8: the real
problem, in one line, not a message about something else ("every input is a constant", "fails the
ONNX checker")."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx.helper as oh
import pytest
from conftest import make_classifier, save, write_npz

from onnxforge.errors import CalibrationDataError, InvalidModelError


def _no_inputs():
    from onnx import TensorProto

    node = oh.make_node("Constant", [], ["y"], value=oh.make_tensor("v", TensorProto.FLOAT, [2], [1.0, 2.0]))
    graph = oh.make_graph([node], "g", [], [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def test_a_model_with_no_inputs_is_told_so(tmp_path):
    from onnxforge.model_io import input_specs
    from onnxforge.pipeline.calibration import load_samples

    data = write_npz(tmp_path / "calib.npz", x=np.zeros((4, 2), np.float32))
    with pytest.raises(CalibrationDataError) as raised:
        load_samples(data, input_specs(_no_inputs()))
    assert "no inputs" in raised.value.message and "constant" not in raised.value.message


def test_a_model_with_no_inputs_through_the_cli(tmp_path, cli):
    model = save(_no_inputs(), tmp_path / "noinput.onnx")
    data = write_npz(tmp_path / "calib.npz", x=np.zeros((4, 2), np.float32))
    code, _, err = cli("quantize", model, "-o", tmp_path / "q.onnx", "--calibration", data)
    assert code == 2 and err.count("error:") == 1 and "no inputs" in err and "Traceback" not in err, err


def test_a_path_that_is_not_utf8_is_a_path_problem(tmp_path, cli):
    folder = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9"))  # Latin-1 bytes: not UTF-8
    folder.mkdir()
    model = save(make_classifier(0), folder / "model.onnx")
    before = os.fsencode(str(model))
    from onnxforge.model_io import load_model

    with pytest.raises(InvalidModelError) as raised:
        load_model(model)
    message = raised.value.message
    assert "UTF-8" in message and "checker" not in message
    code, _, err = cli("inspect", model)
    assert code == 2 and err.count("error:") == 1 and "UTF-8" in err and "Traceback" not in err, err
    assert os.path.exists(before)
