"""The pass registry and the config codec, as properties over every registered pass:
every config field round-trips through the codec, and changing any single field changes the cache key."""

from __future__ import annotations

import dataclasses
import enum
import json
import typing
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from onnxforge.errors import RecipeError
from onnxforge.parity import Tolerance
from onnxforge.pipeline import codec
from onnxforge.pipeline.cache import stage_key
from onnxforge.pipeline.calibration import ImageLayout, ImagePreprocessing
from onnxforge.pipeline.data_spec import DataKind, DataSpec
from onnxforge.pipeline.registry import Artifact, KnobKind, Pass, Phase, get_pass, registered_passes
from onnxforge.targets import QuantScheme

PASSES = registered_passes()


def test_every_stage_kind_is_registered_once_in_pipeline_order():
    assert {"export", "simplify", "prune", "prune_channels", "low_rank", "quantize", "fp16"} <= set(PASSES)
    phases = [cls.phase for cls in PASSES.values()]
    assert phases == sorted(phases)
    assert PASSES["export"].consumes == (Artifact.SOURCE,)
    assert PASSES["prune_channels"].phase < PASSES["quantize"].phase  # prune before quantize
    for name, cls in PASSES.items():
        assert cls.name == name and issubclass(cls, Pass)
        assert dataclasses.is_dataclass(cls.config_cls) and cls.config_cls.__dataclass_params__.frozen
        assert get_pass(name) is cls


def _data_file(folder: Path, name: str, seed: int) -> Path:
    path = folder / name
    np.savez(path, x=np.random.default_rng(seed).standard_normal((2, 3)).astype(np.float32))
    return path


def _changed(value, annotation, folder: Path):
    """Another valid value of the same type, or None when the field cannot take one."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, __import__("types").UnionType):
        inner = next(a for a in args if a is not type(None))
        if value is None:
            return _example(inner, folder)
        return _changed(value, inner, folder)
    if isinstance(value, bool):
        return not value
    if isinstance(value, enum.Enum):
        return next(m for m in type(value) if m is not value)
    if isinstance(value, float):
        return value * 0.9 if value else 0.25
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return "cuda" if value == "cpu" else value + "x"
    if isinstance(value, Path):
        return _data_file(folder, f"other-{value.name}", seed=7)
    if isinstance(value, tuple) and not value:
        return _example(annotation, folder)
    if isinstance(value, tuple):
        return value[:-1]
    if isinstance(value, Mapping) and not value:
        return _example(annotation, folder)
    if isinstance(value, Tolerance):
        return Tolerance(atol=value.atol * 2, rtol=value.rtol)
    if dataclasses.is_dataclass(value):  # a nested options block: change its first field that can change
        hints = typing.get_type_hints(type(value))
        for f in dataclasses.fields(value):
            new = _changed(getattr(value, f.name), hints[f.name], folder)
            if new is not None:
                return dataclasses.replace(value, **{f.name: new})
    return None


def _example(annotation, folder: Path):
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Path:
        return _data_file(folder, "example.npz", seed=3)
    if annotation is DataSpec:
        return DataSpec(path=_data_file(folder, "example.npz", seed=3))
    if annotation is QuantScheme:
        from onnxforge.pipeline.quantize import parse_scheme

        return parse_scheme("qdq-u8s8-per-tensor")
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):  # an optional choice: its first
        return next(iter(annotation))
    if annotation in (int, float):
        return annotation(3)
    if annotation is str:
        return "node_a"
    if origin is tuple:
        return (_example(args[0], folder),)
    if dataclasses.is_dataclass(annotation):  # a nested options block (merge's pre=ImagePre()): its defaults
        return annotation()
    if origin in (Mapping, dict, typing.get_origin(Mapping[str, int])):
        _, val_t = args
        if typing.get_origin(val_t) is tuple:
            return {"x": (1, 3, 8, 8)}
        if val_t is np.dtype:
            return {"x": np.dtype("int64")}
        return {"x": {1: "sequence"}}
    return None


def _configs(cls, folder: Path):
    """The default config of ``cls`` with data paths set, then one variant per field."""
    hints = typing.get_type_hints(cls)
    base_values = {}
    for f in dataclasses.fields(cls):
        if typing.get_origin(hints[f.name]) is not None and {Path, DataSpec} & set(typing.get_args(hints[f.name])):
            base_values[f.name] = _data_file(folder, f"{f.name}.npz", seed=1)
    base = cls(**base_values)
    variants = {}
    for f in codec.key_fields(cls):
        new = _changed(getattr(base, f.name), hints[f.name], folder)
        if new is None:
            continue
        old = getattr(base, f.name)
        tries = [new, old * 2, old - 1] if type(old) is int else [new]
        for value in tries:  # ints with rules of their own (a power of two, a small range) get other tries
            try:
                variants[f.name] = dataclasses.replace(base, **{f.name: value})
                break
            except Exception:  # a value the config's own checks refuse
                continue
    return base, variants


@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_config_round_trips_through_the_codec(name, tmp_path):
    cls = PASSES[name].config_cls
    base, variants = _configs(cls, tmp_path)
    for config in [base, *variants.values()]:
        data = json.loads(json.dumps(codec.encode(config)))  # really JSON
        assert codec.decode(cls, data) == config
        assert set(data) == {f.name for f in dataclasses.fields(cls)}  # a field that exists is saved


@pytest.mark.parametrize("name", sorted(PASSES))
def test_changing_any_single_field_changes_the_cache_key(name, tmp_path):
    cls = PASSES[name].config_cls
    base, variants = _configs(cls, tmp_path)
    key_fields = {f.name for f in codec.key_fields(cls)}
    assert set(variants) == key_fields, f"no variant built for {sorted(key_fields - set(variants))}"
    base_key = stage_key({"config": codec.fingerprint(base)})
    for field_name, config in variants.items():
        assert stage_key({"config": codec.fingerprint(config)}) != base_key, field_name


def test_non_key_fields_are_declared_and_saved():
    from onnxforge.pipeline.quantize import QuantizeConfig

    non_key = {f.name for f in dataclasses.fields(QuantizeConfig)} - {f.name for f in codec.key_fields(QuantizeConfig)}
    assert non_key == {"max_memory"}  # a limit decides whether the stage runs, not what it writes
    assert "max_memory" in codec.encode(QuantizeConfig(max_memory=1 << 30))


def test_fingerprint_hashes_data_by_content_not_by_path(tmp_path):
    from onnxforge.pipeline.prune.channels import ChannelPruneConfig

    a = _data_file(tmp_path, "a.npz", seed=1)
    (tmp_path / "moved").mkdir()
    b = (tmp_path / "moved" / "b.npz")
    b.write_bytes(a.read_bytes())
    same = [codec.fingerprint(ChannelPruneConfig(calibration_data=p)) for p in (a, b)]
    assert same[0] == same[1]
    _data_file(tmp_path, "a.npz", seed=2)  # edited in place
    assert codec.fingerprint(ChannelPruneConfig(calibration_data=a)) != same[0]


class TestDataSpec:
    def test_plain_path_and_mapping(self, tmp_path):
        (tmp_path / "imgs").mkdir()
        spec = codec.decode(DataSpec, "imgs", "calibration", tmp_path)
        assert spec == DataSpec(path=tmp_path / "imgs")
        assert codec.encode(spec) == str(tmp_path / "imgs")  # written back as the recipe would
        full = codec.decode(DataSpec, {"path": "imgs", "image_size": [24, 32], "mean": [0.5, 0.5, 0.5],
                                       "std": [0.25, 0.25, 0.25], "layout": "nhwc"}, "calibration", tmp_path)
        assert full.image.size == (24, 32) and full.resolved_kind() is DataKind.IMAGES
        assert codec.decode(DataSpec, json.loads(json.dumps(codec.encode(full)))) == full
        # the flat recipe spelling is one ImagePreprocessing: the object merge and calibration share
        assert full.image == ImagePreprocessing(size=(24, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                                layout=ImageLayout.NHWC)

    @pytest.mark.parametrize(("value", "fragment"), [
        ({"image_size": [1]}, "path"),
        ({"path": "imgs", "image_size": [1]}, "expected 2 values"),
        ({"path": "imgs", "std": [0.0]}, "non-zero"),
        ({"path": "imgs", "colour": 1}, "unknown key 'colour'"),
        (3, "expected a path"),
        ("missing", "does not exist"),
    ])
    def test_bad_specs_name_the_key(self, tmp_path, value, fragment):
        (tmp_path / "imgs").mkdir()
        with pytest.raises(RecipeError, match=fragment) as info:
            codec.decode(DataSpec, value, "calibration", tmp_path)
        assert info.value.message.startswith("calibration")


def test_knobs_name_real_config_fields_and_decode():
    for name, cls in PASSES.items():
        fields = {f.name for f in dataclasses.fields(cls.config_cls)}
        for knob in cls.knobs("cpu"):
            assert knob.field in fields, (name, knob.field)
            if knob.kind is KnobKind.CHOICE:
                annotation = typing.get_type_hints(cls.config_cls)[knob.field]
                for choice in knob.choices:  # every choice decodes as a recipe value would
                    codec.decode(annotation, choice, f"{name}.{knob.field}")
    assert {k.field for k in PASSES["prune_channels"].knobs("cpu")} >= {"ratio"}
    # the CPU runs MatMulNBits: int4 is a scheme choice, with its block size and accuracy level; dynamic
    # int8 on transformers brings the attention-fusion choice (pinnable before the model is read)
    assert {k.field for k in PASSES["quantize"].knobs("cpu")} == {"schemes", "int4_block_size", "int4_accuracy_level",
                                                            "float_share", "fuse_attention"}


def test_phase_orders_structure_before_precision():
    assert Phase.STRUCTURE < Phase.RECOVERY < Phase.PRECISION < Phase.PACKAGING
