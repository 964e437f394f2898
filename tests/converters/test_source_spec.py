"""parse_source: the one place 'file.py:callable' is split into the file and the callable."""

from __future__ import annotations

from pathlib import Path

import pytest

from onnxforge.converters.source import SourceSpec, parse_source


@pytest.mark.parametrize(
    ("text", "path", "name"),
    [
        ("model.py:build", "model.py", "build"),
        ("dir/sub.py:make_model", "dir/sub.py", "make_model"),
        ("/abs/model.py:build", "/abs/model.py", "build"),
        ("a.py:b.py:build", "a.py:b.py", "build"),  # the last colon splits
        ("model.py", "model.py", None),
        ("model.onnx", "model.onnx", None),
        ("builtin:digits_cnn", "builtin:digits_cnn", None),  # only a .py file names a callable
        ("C:/models/m.onnx", "C:/models/m.onnx", None),
    ],
)
def test_parse_source(text, path, name):
    assert parse_source(text) == SourceSpec(Path(path), name)


def test_spec_prints_as_written():
    assert str(parse_source("dir/model.py:build")) == "dir/model.py:build"
    assert str(parse_source("dir/model.onnx")) == "dir/model.onnx"
