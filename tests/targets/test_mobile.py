"""Mobile target: shapes fixed, usability verdicts per EP with the unsupported ops, the .ort and
its operator config, .ort parity, and the host-emulation label."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from conftest import assert_numerically_equal, random_images, save

from onnxforge.model_io import input_specs
from onnxforge.targets import TARGETS
from onnxforge.targets.base import QuantFormat
from onnxforge.targets.mobile import (
    MobileConfig,
    MobileEp,
    MobileTarget,
    Readiness,
    check_mobile_usability,
    prepare_mobile,
    xnnpack_available,
)


def _cumsum_model() -> onnx.ModelProto:
    """x[N,16] -> Relu(CumSum(x) * w): CumSum is in neither the NNAPI nor the CoreML op list."""
    model = onnx.parser.parse_model(textwrap.dedent(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,16] x) => (float[N,16] y) {
            axis = Constant <value = int64 {1}> ()
            c = CumSum (x, axis)
            m = Mul (c, w)
            y = Relu (m)
        }
        """
    ))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.linspace(-1, 1, 16, dtype=np.float32), "w"))
    onnx.checker.check_model(model, full_check=True)
    return model


def _by_ep(verdicts):
    return {v.ep: v for v in verdicts}


def test_prepare_mobile_fixes_shapes_converts_and_matches(tmp_path, classifier_path):
    out = tmp_path / "mobile"
    result = prepare_mobile(classifier_path, out, MobileConfig(min_seconds=0.02))
    assert result.fixed_inputs == {"x": (1, 3, 8, 8)}
    fixed = onnx.load(str(result.fixed_onnx))
    assert all(spec.is_static for spec in input_specs(fixed))
    # The usability checker: with a dynamic batch nothing qualifies for NNAPI; after fixing, all of it.
    given, fixed_verdicts = _by_ep(result.verdicts_as_given), _by_ep(result.verdicts)
    assert given[MobileEp.NNAPI].readiness is Readiness.NO
    assert given[MobileEp.NNAPI].nodes_unsupported_dynamic_shape > 0
    assert fixed_verdicts[MobileEp.NNAPI].readiness is Readiness.YES
    assert fixed_verdicts[MobileEp.NNAPI].supported_nodes == fixed_verdicts[MobileEp.NNAPI].total_nodes
    # The ORT-format model and the reduced-build config
    assert result.ort_model.suffix == ".ort" and result.ort_model.stat().st_size > 0
    assert result.operators_config.name == "required_operators.config"
    assert any("Gemm" in line for line in result.required_operators)
    assert not list(out.glob(".onnxforge-mobile-*")), "temporary folder left behind"
    session = ort.InferenceSession(str(result.ort_model), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [[1, 3, 8, 8]]
    assert result.parity.ok
    assert_numerically_equal(classifier_path, result.ort_model, {"x": random_images(1, seed=5)})
    assert result.host_latency is not None and result.host_latency.runs > 0
    payload = json.loads(json.dumps(result.to_json()))
    assert payload["host_emulation_latency"]["label"].startswith("host emulation")


def test_unsupported_ops_are_named_per_ep(tmp_path):
    model_path = save(_cumsum_model(), tmp_path / "cumsum.onnx")
    verdicts = _by_ep(check_mobile_usability(model_path))
    for ep in (MobileEp.NNAPI, MobileEp.COREML_NEURALNETWORK, MobileEp.COREML_MLPROGRAM):
        assert "ai.onnx:CumSum" in verdicts[ep].unsupported_ops, ep
        assert verdicts[ep].supported_nodes < verdicts[ep].total_nodes


def test_other_dynamic_dims_need_input_shape(tmp_path):
    from onnxforge.errors import UsageError

    model = _cumsum_model()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"
    path = save(model, tmp_path / "dyn.onnx")
    with pytest.raises(UsageError, match="dynamic dimension 1") as raised:
        prepare_mobile(path, tmp_path / "out", MobileConfig(measure_latency=False))
    assert "--input-shape x=" in raised.value.hint
    assert not (tmp_path / "out").exists()  # nothing written for a refused model
    result = prepare_mobile(path, tmp_path / "out", MobileConfig(input_shapes={"x": (2, 16)}, measure_latency=False))
    assert result.fixed_inputs == {"x": (2, 16)}
    assert result.parity.ok


def test_mobile_target_registered_with_qdq_candidates():
    target = TARGETS["mobile"]
    assert isinstance(target, MobileTarget)
    assert target.unavailable_reason() is None
    assert all(s.format is QuantFormat.QDQ for s in target.quant_candidates())
    uses_xnnpack = target.provider_options()[0][0] == "XnnpackExecutionProvider"
    assert uses_xnnpack == ("XnnpackExecutionProvider" in ort.get_available_providers()) == xnnpack_available()


def test_cli_profile_target_mobile(cli, tmp_path, classifier_path):
    out_json = tmp_path / "mobile.json"
    code, stdout, stderr = cli(
        "profile", classifier_path, "--target", "mobile", "-o", tmp_path / "pkg", "--min-seconds", "0.05",
        "--json", out_json,
    )
    assert code == 0, stderr
    assert "host emulation" in stdout and "NNAPI" in stdout
    payload = json.loads(out_json.read_text())
    assert payload["host_emulation"] is True
    assert payload["rows"][0]["threads"] == 2
    mobile = payload["mobile"]
    assert {v["ep"] for v in mobile["verdicts"]} == {"NNAPI", "CoreML NeuralNetwork", "CoreML MLProgram"}
    assert (tmp_path / "pkg" / "classifier.ort").is_file()
    assert (tmp_path / "pkg" / "required_operators.config").is_file()
    assert mobile["ort_parity"]["ok"] is True


def test_cli_mobile_rejects_a_batch_sweep(cli, tmp_path, classifier_path):
    code, _, stderr = cli("profile", classifier_path, "--target", "mobile", "--batch", "1", "--batch", "4",
                          "-o", tmp_path / "pkg")
    assert code == 2
    assert "--batch" in stderr
    assert not (tmp_path / "pkg").exists()


@pytest.mark.parametrize("anonymous", ["?", -1])
def test_anonymous_dims_are_fixed_one_by_one(tmp_path, anonymous):
    # PaddleOCR declares [?, 3, ?, ?] (or [-1, 3, -1, -1]): fixing one '?' fixed all of them to one size,
    # so H != W was impossible ("dim value mismatch")
    model = onnx.parser.parse_model(textwrap.dedent(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,H,W] x) => (float[N,4] y) {
            c = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w)
            r = Relu (c)
            p = GlobalAveragePool (r)
            y = Flatten (p)
        }
        """
    ))
    model.graph.initializer.append(onnx.numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w"))
    for value in (model.graph.input[0], model.graph.output[0]):
        for d in value.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
                if anonymous == "?":
                    d.dim_param = "?"
                else:
                    d.dim_value = -1
    path = save(model, tmp_path / "anon.onnx")
    result = prepare_mobile(
        path, tmp_path / "out", MobileConfig(input_shapes={"x": (1, 3, 8, 12)}, measure_latency=False)
    )
    assert result.fixed_inputs == {"x": (1, 3, 8, 12)}
    fixed = onnx.load(str(result.fixed_onnx))
    assert [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 8, 12]
    assert result.parity.ok
