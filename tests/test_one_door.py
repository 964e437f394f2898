"""One door: a stage run by its command, by the recipe that command saves, and by the Python API gives
byte-identical output and the same record; a repeated command is answered from the cache and says so;
every config field has a CLI spelling and every stage-command flag a recipe spelling."""

from __future__ import annotations

import dataclasses
import json
import os

import click
import pytest
from conftest import sha256

import onnxforge
from onnxforge.cli import cli as cli_group
from onnxforge.pipeline.registry import registered_passes

# (command args after MODEL -o OUT, API function, API keyword arguments); data paths are filled in per test.
CASES = {
    "simplify": (["simplify"], "simplify", {}),
    "fp16": (["fp16"], "fp16", {}),
    "prune_magnitude": (["prune", "--sparsity", "0.4", "--eval", "{eval}"], "magnitude",
                        {"sparsity": 0.4, "eval": "{eval}"}),
    "prune_channels": (["prune", "--method", "channels", "--ratio", "0.5", "--calibration", "{calib}",
                        "--eval", "{eval}", "--tolerance", "100"], "prune_channels",
                       {"ratio": 0.5, "calibration": "{calib}", "eval": "{eval}", "tolerance": 100.0}),
    "low_rank": (["prune", "--method", "low-rank", "--ratio", "0.5", "--calibration", "{calib}"], "low_rank",
                 {"ratio": 0.5, "rule": "ratio", "calibration": "{calib}"}),
    "quantize": (["quantize", "--calibration", "{calib}", "--scheme", "qdq-u8s8-per-channel", "--no-mixed-precision"],
                 "quantize", {"calibration": "{calib}", "schemes": ["qdq-u8s8-per-channel"],
                              "mixed_precision": False}),
}


def _fill(value, paths):
    if isinstance(value, str):
        return value.format(**paths)
    if isinstance(value, (list, tuple)):
        return [_fill(v, paths) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, paths) for k, v in value.items()}
    return value


def _normal(config: dict) -> dict:
    """The config with its paths spelled one way (a recipe writes ``saved/../eval.npz`` for ``eval.npz``)."""
    return {k: os.path.normpath(v) if isinstance(v, str) and os.path.isabs(v) else v for k, v in config.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_command_recipe_and_api_give_the_same_bytes_and_record(case, tmp_path, cli, classifier_path,
                                                                 calibration_npz, eval_npz, request):
    if case == "quantize":  # the tiny classifier's int8 is slower than fp32: quantize would keep the input (exit 4)
        request.getfixturevalue("int8_faster")
    paths = {"calib": str(calibration_npz), "eval": str(eval_npz)}
    args, function, kwargs = _fill(CASES[case], paths)
    command_out, recipe = tmp_path / "command.onnx", tmp_path / "saved" / "recipe.yaml"
    report = tmp_path / "command.json"
    code, _out, err = cli(*args[:1], classifier_path, "-o", command_out, *args[1:], "--save-recipe", recipe,
                          "--json", report, "--cache-dir", tmp_path / "cache-command")
    assert code == 0, err
    record = json.loads(report.read_text())["stage"]
    assert record["status"] == "done"

    # the saved recipe reruns it (paths relative to the recipe's folder), with a cache of its own
    code, _out, err = cli("run", recipe, "-o", tmp_path / "run", "--cache-dir", tmp_path / "cache-recipe",
                          "--json", tmp_path / "run.json")
    assert code == 0, err
    manifest = json.loads((tmp_path / "run.json").read_text())
    stage = manifest["stages"][-1]
    assert stage["status"] == "done"
    assert sha256(tmp_path / "run" / stage["output"]["path"]) == sha256(command_out)
    assert (stage["key"], _normal(stage["config"])) == (record["key"], _normal(record["config"]))

    # the Python API, with a third cache
    api_out = tmp_path / "api.onnx"
    api_record = getattr(onnxforge, function)(classifier_path, api_out, cache=tmp_path / "cache-api", **kwargs)
    assert api_record.status == "done"
    assert sha256(api_out) == sha256(command_out)
    assert (api_record.key, _normal(api_record.config)) == (record["key"], _normal(record["config"]))


def test_a_repeated_command_is_answered_from_the_cache_and_says_so(tmp_path, cli, classifier_path,
                                                                     calibration_npz):
    args = [
        "prune",
        classifier_path,
        "--method",
        "channels",
        "--ratio",
        "0.5",
        "--calibration",
        calibration_npz,
        "--tolerance",
        "100",
        "--cache-dir",
        tmp_path / "cache",
    ]
    code, _, err = cli(*args, "-o", tmp_path / "a.onnx", "--json", tmp_path / "a.json")
    assert code == 0, err
    assert json.loads((tmp_path / "a.json").read_text())["stage"]["status"] == "done"
    code, out, err = cli(*args, "-o", tmp_path / "b.onnx", "--json", tmp_path / "b.json")
    assert code == 0, err
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["stage"]["status"] == "cached"
    assert "cached" in err and "restored" in err
    assert "channel pruning of" in out  # rendered from the cached result as a fresh one is
    assert sha256(tmp_path / "a.onnx") == sha256(tmp_path / "b.onnx")


def test_a_gate_miss_raises_with_the_outcome(tmp_path, classifier_path, calibration_npz, eval_npz):
    with pytest.raises(onnxforge.QualityGateError) as caught:
        onnxforge.prune_channels(classifier_path, tmp_path / "p.onnx", ratio=0.9, calibration=calibration_npz,
                                 eval=eval_npz, metric="agreement", tolerance=0.0, cache=False)
    error = caught.value
    assert error.result["tried"], "every try's numbers are on the error"
    assert error.record.status == "quality-gate-failed"
    assert error.best_path is not None  # the best model kept (here the unpruned input), said in the message


# ----------------------------------------------------------------------------------------------
# Spellings: which command spells which passes, and the command options that are not stage options.

COMMANDS = {"export": ["export"], "simplify": ["simplify"], "fp16": ["fp16"], "quantize": ["quantize"],
            "prune": ["prune", "prune_channels", "low_rank", "distill"], "merge": ["merge"]}
# recipe-level spellings: CLI parameter -> the recipe key it writes
RECIPE_LEVEL = {"calibration": "calibration", "eval_data": "eval", "target": "target", "max_samples": "max_samples",
                "image_size": "calibration.image_size", "mean": "calibration.mean", "std": "calibration.std",
                "layout": "calibration.layout", "model": "model", "source": "model", "models": "model + inputs",
                "distill_source": "model (the teacher) + inputs", "prune_method": "the stage kind",
                "tune_session": "tune_session"}
# fields spelled by shared groups or composite flags, per field name -> the flag(s)
COMPOSITE = {"input_shapes": "--input-shape", "input_dtypes": "--input-shape", "dynamic_axes": "--dynamic",
             "tolerance": "--tolerance / --atol --rtol", "calibration_data": "--calibration", "eval_data": "--eval",
             "metric": "--metric", "target": "--target", "max_samples": "--max-samples",
             "pre": "--pre ...", "tokenizer": "--tokenizer ...", "top_k": "--top-k", "softmax": "--no-softmax",
             "post_output": "--post-output", "mask_input": "--mask-input", "ensemble": "--ensemble", "post": "--post"}
# command-line only: where the output goes and how it is reported (not part of what a stage computes)
OUTPUT_SIDE = {"output", "json_path", "save_recipe", "cache_dir", "no_cache", "force", "dynamic_dims", "atol", "rtol",
               "input_shapes"}


def _params(command: str) -> dict[str, click.Parameter]:
    return {p.name: p for p in cli_group.commands[command].params}


def _flags(command: str) -> dict[str, str]:
    """field -> click parameter name, from the command module's Flag declarations."""
    import importlib

    module = importlib.import_module(f"onnxforge.cli.{command}")
    return {f.field: f.param for f in getattr(module, "FLAGS", ())}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_config_field_has_a_cli_spelling(command):
    params, flags = _params(command), _flags(command)
    for kind in COMMANDS[command]:
        for f in dataclasses.fields(registered_passes()[kind].config_cls):
            assert flags.get(f.name, f.name) in params or f.name in COMPOSITE, \
                f"{kind}.{f.name} has no spelling on 'onnxforge {command}'"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "merge"])
def test_every_stage_command_flag_has_a_recipe_spelling(command):
    fields = {f.name for kind in COMMANDS[command] for f in dataclasses.fields(registered_passes()[kind].config_cls)}
    by_param = {param: field for field, param in _flags(command).items()}
    for name in _params(command):
        assert by_param.get(name, name) in fields or name in RECIPE_LEVEL or name in OUTPUT_SIDE, \
            f"'onnxforge {command}' option {name} has no recipe spelling"


def test_the_readme_command_reference_is_current():
    from pathlib import Path

    from onnxforge.cli.reference import END, START, command_reference

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    current = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert current == command_reference().strip(), "run: python -m onnxforge.cli.reference --write README.md"
