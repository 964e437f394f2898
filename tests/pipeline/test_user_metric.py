"""A user metric (``--metric file.py:function``): scored in a child process, gating every stage through the
one Reference, part of the cache key, and a clear one-line error when it raises."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from conftest import random_images, run_model, write_npz

from onnxforge.pipeline import codec
from onnxforge.pipeline.evaluate import Metric
from onnxforge.pipeline.quantize import QuantizeConfig
from onnxforge.pipeline.user_metric import UserMetric

pytestmark = pytest.mark.usefixtures("int8_faster")

# 10 + top-1 agreement with the input: the input scores 11, so the result shows the file was used
AGREEMENT_PLUS_TEN = """
import numpy as np

def score(outputs, labels, reference):
    assert isinstance(outputs, dict) and set(outputs) == set(reference)
    (name,) = outputs
    assert labels is not None and len(labels) == len(outputs[name])
    return 10.0 + float((outputs[name].argmax(1) == reference[name].argmax(1)).mean())
"""

# only the input's own outputs score 1: every quantized candidate drops by 1
ONLY_THE_INPUT = """
import numpy as np

def exact(outputs, labels, reference):
    return float(all(np.array_equal(outputs[k], reference[k]) for k in outputs))
"""

RAISES = """
def score(outputs, labels, reference):
    raise ValueError("expected 3 outputs")
"""


def _quantize_args(model, calibration, eval_data, output, *extra):
    return ("quantize", model, "-o", output, "--calibration", calibration, "--eval", eval_data,
            "--scheme", "qdq-u8s8-per-tensor", "--no-cache", *extra)


def test_quantize_scores_and_gates_with_the_user_metric(cli, tmp_path, classifier_path, calibration_npz, eval_npz):
    metric = tmp_path / "metric.py"
    metric.write_text(AGREEMENT_PLUS_TEN)
    code, out, err = cli(*_quantize_args(classifier_path, calibration_npz, eval_npz, tmp_path / "q.onnx",
                                         "--metric", f"{metric}:score", "--tolerance", "0.5", "--json", "-"))
    assert code == 0, err
    result = json.loads(out[out.index("{"):])
    assert result["metric"] == "user" and f"{metric}:score" in result["gate"]
    assert result["fp32_score"] == pytest.approx(11.0)
    chosen = next(c for c in result["candidates"] if c["scheme"] == result["chosen"])
    assert 10.5 <= chosen["score"] <= 11.0 and chosen["meets_tolerance"]


def test_a_user_metric_the_candidates_fail_fails_the_stage(cli, tmp_path, classifier_path, calibration_npz,
                                                           eval_npz):
    metric = tmp_path / "exact.py"
    metric.write_text(ONLY_THE_INPUT)
    code, _, err = cli(*_quantize_args(classifier_path, calibration_npz, eval_npz, tmp_path / "q.onnx",
                                       "--metric", f"{metric}:exact", "--tolerance", "0.5"))
    assert code == 4, err
    assert "exact.py:exact drop from the input's score <= 0.5" in err


def test_a_recipe_names_the_metric_relative_to_itself(cli, tmp_path, classifier_path, calibration_npz, eval_npz):
    (tmp_path / "metric.py").write_text(AGREEMENT_PLUS_TEN)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""
        model: {classifier_path.name}
        calibration: {calibration_npz.name}
        eval: {eval_npz.name}
        stages:
          - quantize: {{metric: metric.py:score, tolerance: 0.5, schemes: [qdq-u8s8-per-tensor]}}
        """))
    code, out, err = cli("run", recipe, "-o", tmp_path / "run", "--json", "-", "--no-cache")
    assert code == 0, err
    manifest = json.loads(out[out.index("{"):])
    result = manifest["stages"][0]["result"]
    assert result["metric"] == "user" and result["fp32_score"] == pytest.approx(11.0)
    # the run table scores every stage with the run's own gate (accuracy: labels) and shows its other rules
    checks = manifest["stages"][0]["metrics"]["gate_checks"]
    assert "95% CI" in checks and "predictions changed on" in checks


def test_a_metric_that_raises_is_one_line_naming_the_file_and_the_exception(cli, tmp_path, classifier_path,
                                                                          calibration_npz, eval_npz):
    metric = tmp_path / "broken.py"
    metric.write_text(RAISES)
    code, _, err = cli(*_quantize_args(classifier_path, calibration_npz, eval_npz, tmp_path / "q.onnx",
                                       "--metric", f"{metric}:score"))
    assert code == 2
    assert "Traceback" not in err
    assert f"{metric}:score raised ValueError: expected 3 outputs" in err
    assert not (tmp_path / "q.onnx").exists()


def test_a_missing_metric_file_or_function_is_a_usage_error(cli, tmp_path, classifier_path, calibration_npz,
                                                           eval_npz):
    code, _, err = cli(*_quantize_args(classifier_path, calibration_npz, eval_npz, tmp_path / "q.onnx",
                                       "--metric", f"{tmp_path / 'nope.py'}:score"))
    assert code == 2 and "nope.py: no such file" in err
    (tmp_path / "m.py").write_text(AGREEMENT_PLUS_TEN)
    code, _, err = cli(*_quantize_args(classifier_path, calibration_npz, eval_npz, tmp_path / "q.onnx",
                                       "--metric", f"{tmp_path / 'm.py'}:nothing"))
    assert code == 2 and "has no function 'nothing'" in err and "Traceback" not in err


def test_the_metric_file_bytes_are_part_of_the_cache_key(tmp_path):
    metric = tmp_path / "metric.py"
    metric.write_text(AGREEMENT_PLUS_TEN)
    config = codec.decode_dataclass(QuantizeConfig, {"metric": "metric.py:score"}, "quantize", tmp_path)
    assert config.metric == UserMetric(path=tmp_path / "metric.py", function="score")
    assert codec.encode(config)["metric"] == f"{tmp_path / 'metric.py'}:score"
    before = json.dumps(codec.fingerprint(config), sort_keys=True)
    metric.write_text(AGREEMENT_PLUS_TEN + "\n# edited\n")
    from onnxforge.pipeline.evaluations import clear_evaluations

    clear_evaluations()
    assert json.dumps(codec.fingerprint(config), sort_keys=True) != before
    builtin = codec.decode_dataclass(QuantizeConfig, {"metric": "cosine"}, "quantize", tmp_path)
    assert builtin.metric is Metric.COSINE


def test_a_recipe_metric_that_is_neither_a_name_nor_a_file_says_both(tmp_path):
    from onnxforge.errors import RecipeError

    with pytest.raises(RecipeError, match=r"not one of auto, accuracy.*or file.py:function"):
        codec.decode_dataclass(QuantizeConfig, {"metric": "acuracy"}, "quantize", tmp_path)
    with pytest.raises(RecipeError, match="does not exist"):
        codec.decode_dataclass(QuantizeConfig, {"metric": "missing.py:score"}, "quantize", tmp_path)


def test_the_api_takes_the_metric_as_the_command_does(tmp_path, classifier_path, calibration_npz, eval_npz):
    import onnxforge.api as api

    metric = tmp_path / "metric.py"
    metric.write_text(AGREEMENT_PLUS_TEN)
    record = api.quantize(classifier_path, tmp_path / "q.onnx", calibration=calibration_npz, eval=eval_npz,
                          metric=f"{metric}:score", tolerance=0.5, schemes=["qdq-u8s8-per-tensor"], cache=False)
    assert record.result["metric"] == "user" and record.result["fp32_score"] == pytest.approx(11.0)


# the class names as text labels: the metric reads them (a unicode array, no pickle) and names its own
# prediction per sample; the input model reads every label right, so it scores 1
NAMES_READ = """
import numpy as np

def score(outputs, labels, reference):
    assert labels.dtype.kind == "U", labels.dtype
    (name,) = outputs
    said = np.array([f"class {i}" for i in outputs[name].argmax(1)])
    return float((said == labels).mean())
"""


def test_text_labels_reach_the_user_metric_and_no_builtin_takes_them_for_class_ids(
        cli, tmp_path, classifier, classifier_path, calibration_npz):
    images = random_images(32, seed=2)
    names = np.array([f"class {i}" for i in run_model(classifier, {"x": images})[0].argmax(1)])
    eval_data = write_npz(tmp_path / "eval_text.npz", x=images, label=names)
    metric = tmp_path / "names.py"
    metric.write_text(NAMES_READ)
    code, out, err = cli(*_quantize_args(classifier_path, calibration_npz, eval_data, tmp_path / "q.onnx",
                                         "--metric", f"{metric}:score", "--tolerance", "0.5", "--json", "-"))
    assert code == 0, err
    result = json.loads(out[out.index("{"):])
    assert result["metric"] == "user" and result["fp32_score"] == pytest.approx(1.0)
    # without a user metric, text labels are no class ids: auto falls back to agreement, accuracy says why
    code, out, err = cli(*_quantize_args(classifier_path, calibration_npz, eval_data, tmp_path / "q2.onnx",
                                         "--json", "-"))
    assert code == 0, err
    assert json.loads(out[out.index("{"):])["metric"] == "agreement"
    code, _, err = cli(*_quantize_args(classifier_path, calibration_npz, eval_data, tmp_path / "q3.onnx",
                                       "--metric", "accuracy"))
    assert code == 2 and "integer class ids" in err and "Traceback" not in err


def test_a_config_built_in_python_takes_the_metric_as_text(tmp_path):
    from onnxforge.errors import UsageError

    (tmp_path / "m.py").write_text(AGREEMENT_PLUS_TEN)
    assert QuantizeConfig(metric=f"{tmp_path / 'm.py'}:score").metric == UserMetric(path=tmp_path / "m.py",
                                                                                  function="score")
    assert QuantizeConfig(metric="cosine").metric is Metric.COSINE
    with pytest.raises(UsageError, match="not one of auto, accuracy"):
        QuantizeConfig(metric="acuracy")
