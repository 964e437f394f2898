"""PyTorch -> ONNX through onnxforge.converters.export: real exports of small modules (the integration
tier). Each test checks the converter's own parity report *and* compares torch with onnxruntime
independently, so a parity check that passes everything would be caught."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import run_model

from onnxforge.converters import ExportConfig, Exporter, export
from onnxforge.errors import UsageError

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(x + self.bn2(self.conv2(y)))


    class ResCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
            self.block1 = Block(8)
            self.block2 = Block(8)
            self.head = nn.Linear(8, 4)

        def forward(self, image):
            x = self.block2(self.block1(self.stem(image)))
            return self.head(x.mean(dim=(2, 3)))


    def _non_trivial_batchnorm(model):
        # fresh BatchNorm is the identity; give it statistics so folding it wrongly would show
        g = torch.Generator().manual_seed(1)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        return model


    def build_cnn():
        torch.manual_seed(0)
        return _non_trivial_batchnorm(ResCNN()).eval()


    class TwoInTwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 4)
            self.b = nn.Linear(3, 4)

        def forward(self, features, context):
            h = torch.tanh(self.a(features) + self.b(context))
            return h.sum(dim=1, keepdim=True), torch.softmax(h, dim=1)


    def build_two():
        torch.manual_seed(0)
        return TwoInTwoOut().eval()


    def build_with_examples():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).eval()
        return model, {"input": torch.randn(1, 4)}


    class DataDependent(nn.Module):
        # torch.export cannot guard on a tensor's value; TorchScript tracing records the branch taken
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            if x.abs().sum() >= 0:
                return self.fc(x)
            return -self.fc(x)


    def build_data_dependent():
        torch.manual_seed(0)
        return DataDependent().eval()


    class VarArgs(nn.Module):
        # forward(self, x, *rest): the inputs past x have no names of their own
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x, *rest):
            return self.fc(x) * rest[0] + rest[1]


    def build_varargs():
        torch.manual_seed(0)
        return VarArgs().eval(), (torch.randn(2, 4), torch.randn(2, 3), torch.randn(2, 3))


    def build_varargs_bare():
        torch.manual_seed(0)
        return VarArgs().eval()
    """
)


@pytest.fixture(scope="module")
def models_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("torch_models") / "models.py"
    path.write_text(MODELS)
    return path


@pytest.fixture(scope="module")
def models(models_file):
    """The same module, imported here, to build reference torch models independently of onnxforge."""
    spec = importlib.util.spec_from_file_location("onnxforge_test_torch_models", models_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torch_outputs(model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    outs = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in outs]


def _assert_torch_matches_onnx(torch_model, onnx_path, feeds, atol=1e-4, rtol=1e-3):
    expected = _torch_outputs(torch_model, feeds)
    got = run_model(onnx_path, feeds)
    assert len(got) == len(expected)
    for e, g in zip(expected, got, strict=True):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, atol=atol, rtol=rtol)


def _images(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(seed).standard_normal((batch, 3, 16, 16)).astype(np.float32)}


@pytest.mark.parametrize("exporter", [Exporter.DYNAMO, Exporter.TORCHSCRIPT])
def test_residual_cnn_with_batchnorm(tmp_path, models_file, models, exporter):
    output = tmp_path / "cnn.onnx"
    config = ExportConfig(input_shapes={"image": (1, 3, 16, 16)}, dynamic_batch=True, exporter=exporter)
    result = export(f"{models_file}:build_cnn", output, config)

    assert result.exporter == exporter.value
    assert result.fallback_reason is None
    assert result.parity is not None and result.parity.ok, result.parity.summary()
    assert result.parity.batch_sizes == (1, 3)  # dynamic batch: checked at two sizes
    assert result.verified
    assert [s.name for s in result.inputs] == ["image"]
    assert result.inputs[0].shape[1:] == (3, 16, 16) and not isinstance(result.inputs[0].shape[0], int)

    onnx.checker.check_model(onnx.load(str(output)))
    reference = models.build_cnn()
    for batch in (1, 3):
        _assert_torch_matches_onnx(reference, output, _images(batch, seed=batch))


@pytest.mark.parametrize("exporter", [Exporter.DYNAMO, Exporter.TORCHSCRIPT])
def test_two_inputs_two_outputs(tmp_path, models_file, models, exporter):
    output = tmp_path / "two.onnx"
    config = ExportConfig(
        input_shapes={"features": (1, 6), "context": (1, 3)}, dynamic_batch=True, exporter=exporter
    )
    result = export(f"{models_file}:build_two", output, config)

    assert result.parity.ok, result.parity.summary()
    assert [s.name for s in result.inputs] == ["features", "context"]
    assert [s.name for s in result.outputs] == ["output_0", "output_1"]
    assert {o.name for o in result.parity.outputs} == {"output_0", "output_1"}  # both outputs compared

    reference = models.build_two()
    rng = np.random.default_rng(5)
    for batch in (1, 3):
        feeds = {
            "features": rng.standard_normal((batch, 6)).astype(np.float32),
            "context": rng.standard_normal((batch, 3)).astype(np.float32),
        }
        _assert_torch_matches_onnx(reference, output, feeds)
        summed, probabilities = run_model(output, feeds)
        assert summed.shape == (batch, 1) and probabilities.shape == (batch, 4)
        np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)


def test_static_batch_stays_static(tmp_path, models_file):
    config = ExportConfig(input_shapes={"image": (2, 3, 16, 16)})
    result = export(f"{models_file}:build_cnn", tmp_path / "cnn.onnx", config)
    assert result.inputs[0].shape == (2, 3, 16, 16)
    assert result.parity.batch_sizes == (2,)  # checked at the only batch the file accepts
    assert result.parity.ok


def test_example_inputs_returned_by_the_factory_fix_the_shapes(tmp_path, models_file, models):
    output = tmp_path / "ex.onnx"
    result = export(f"{models_file}:build_with_examples", output, ExportConfig(dynamic_batch=True))
    assert result.parity.ok
    assert result.inputs[0].name == "input" and result.inputs[0].shape[1:] == (4,)
    reference, _ = models.build_with_examples()
    for batch in (1, 3):
        _assert_torch_matches_onnx(reference, output, {"input": np.ones((batch, 4), np.float32) * 0.3})


def test_dynamo_failure_falls_back_to_torchscript(tmp_path, models_file, models):
    output = tmp_path / "dd.onnx"
    result = export(f"{models_file}:build_data_dependent", output, ExportConfig(input_shapes={"x": (1, 4)}))
    assert result.exporter == "torchscript"
    assert result.fallback_reason and "dynamo" in result.fallback_reason
    assert any("TorchScript" in note for note in result.notes)
    assert result.parity.ok
    _assert_torch_matches_onnx(models.build_data_dependent(), output, {"x": np.full((1, 4), 0.5, np.float32)})


@pytest.mark.parametrize("exporter", [Exporter.DYNAMO, Exporter.TORCHSCRIPT])
def test_forward_with_varargs_keeps_every_example_input(tmp_path, models_file, models, exporter):
    # forward(self, x, *rest) once lost the inputs *rest takes ("forward failed on inputs :")
    output = tmp_path / "va.onnx"
    result = export(f"{models_file}:build_varargs", output, ExportConfig(dynamic_batch=True, exporter=exporter))
    assert result.exporter == exporter.value and result.parity.ok
    assert [i.name for i in result.inputs] == ["x", "input_1", "input_2"]
    reference, _ = models.build_varargs()
    rng = np.random.default_rng(3)
    feeds = {
        "x": rng.standard_normal((5, 4)),
        "input_1": rng.standard_normal((5, 3)),
        "input_2": rng.standard_normal((5, 3)),
    }
    feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    with torch.no_grad():
        expected = reference(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    np.testing.assert_allclose(run_model(output, feeds)[0], expected, atol=1e-4, rtol=1e-3)


def test_forward_with_varargs_takes_input_shapes_by_position(tmp_path, models_file):
    output = tmp_path / "va.onnx"
    with pytest.raises(UsageError) as missing:
        export(f"{models_file}:build_varargs_bare", output, ExportConfig())
    assert "input_1" in missing.value.hint and "*args" in missing.value.hint
    shapes = {"x": (1, 4), "input_1": (1, 3), "input_2": (1, 3)}
    result = export(f"{models_file}:build_varargs_bare", output, ExportConfig(input_shapes=shapes))
    assert result.parity.ok and [i.name for i in result.inputs] == list(shapes)


def test_torchscript_file_source(tmp_path, models):
    scripted = torch.jit.script(models.build_two())
    path = tmp_path / "two.pt"
    scripted.save(str(path))
    output = tmp_path / "two.onnx"
    result = export(path, output, ExportConfig(input_shapes={"features": (2, 6), "context": (2, 3)}))
    assert result.source_kind == "torchscript"
    assert result.exporter == "torchscript"
    assert result.parity.ok
    feeds = {"features": np.ones((2, 6), np.float32), "context": np.zeros((2, 3), np.float32)}
    _assert_torch_matches_onnx(models.build_two(), output, feeds)


def test_opset_request_is_honoured_or_explained(tmp_path, models_file):
    shapes = {"features": (1, 6), "context": (1, 3)}
    scripted = export(f"{models_file}:build_two", tmp_path / "ts.onnx",
                      ExportConfig(input_shapes=shapes, exporter=Exporter.TORCHSCRIPT, opset=14))
    assert scripted.opset == 14
    assert onnx.load(str(tmp_path / "ts.onnx")).opset_import[0].version == 14
    dynamo = export(f"{models_file}:build_two", tmp_path / "dy.onnx",
                    ExportConfig(input_shapes=shapes, exporter=Exporter.DYNAMO, opset=14))
    assert dynamo.opset >= 18
    assert any("opset" in note for note in dynamo.notes)


def test_importing_the_source_leaves_sys_path_as_it_was(tmp_path, models_file):
    before = list(sys.path)
    export(f"{models_file}:build_two", tmp_path / "two.onnx",
           ExportConfig(input_shapes={"features": (1, 6), "context": (1, 3)}, exporter=Exporter.TORCHSCRIPT))
    assert sys.path == before
