"""Where channel pruning's ratio goes: ``depth_scales`` move it between early, middle and late groups (the
total share removed stays the ratio), through the config the codec saves, the CLI spells and the search varies."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import run_model, save
from onnx_graphs import model_from_text

from onnxforge.errors import UsageError
from onnxforge.pipeline import codec
from onnxforge.pipeline.prune.allocation import allocated_ratios
from onnxforge.pipeline.prune.channels import ChannelPruneConfig, Repair, prune_channels, prune_model
from onnxforge.pipeline.registry import registered_passes


def _three_groups(seed: int = 0) -> onnx.ModelProto:
    """Three 8-wide Conv groups in a chain (named against graph order: z, m, a), then a 4-wide output Conv."""
    rng = np.random.default_rng(seed)

    def conv(cout: int, cin: int, k: int = 3) -> np.ndarray:
        return (rng.standard_normal((cout, cin, k, k)) * 0.3).astype(np.float32)

    return model_from_text(
        """
        z = Conv <pads = [1, 1, 1, 1]> (x, w1)
        rz = Relu (z)
        m = Conv <pads = [1, 1, 1, 1]> (rz, w2)
        rm = Relu (m)
        a = Conv <pads = [1, 1, 1, 1]> (rm, w3)
        ra = Relu (a)
        y = Conv (ra, w4)
        """,
        dict(w1=conv(8, 3), w2=conv(8, 8), w3=conv(8, 8), w4=conv(4, 8, 1)),
        "float[N,3,8,8] x",
        "float[N,4,8,8] y",
    )


def _kept(model: onnx.ModelProto, **fields) -> dict[str, int]:
    config = ChannelPruneConfig(ratio=0.5, repair=Repair.NONE, round_to=1, **fields)
    pruned = prune_model(model, config, None, allocated_ratios(model, config, None))
    return {name: len(pruned.kept_outputs[name]) for name in ("z", "m", "a")}


def test_depth_scales_move_the_ratio_between_early_and_late_groups_and_keep_the_total():
    model = _three_groups()
    assert _kept(model) == {"z": 4, "m": 4, "a": 4}
    # 0.5 x (0.5, 1, 1.5): ratios 0.25, 0.5, 0.75 of 8 channels, by graph order (not by name)
    assert _kept(model, depth_scales=(0.5, 1.0, 1.5)) == {"z": 6, "m": 4, "a": 2}
    assert _kept(model, depth_scales=(1.5, 1.0, 0.5)) == {"z": 2, "m": 4, "a": 6}
    assert _kept(model, depth_scales=(2.0, 2.0, 2.0)) == _kept(model)  # only the shape counts, not the level
    # two buckets (z, m | a): 0.375, 0.375, 0.75, still half of the 24 channels removed
    assert _kept(model, depth_scales=(0.5, 1.0)) == {"z": 5, "m": 5, "a": 2}


def test_no_group_is_asked_for_more_than_the_cap():
    ratios = allocated_ratios(_three_groups(), ChannelPruneConfig(ratio=0.7, repair=Repair.NONE,
                                                                  depth_scales=(0.1, 0.1, 4.0)), None)
    assert ratios is not None and max(ratios.values()) == pytest.approx(0.9)
    assert allocated_ratios(_three_groups(), ChannelPruneConfig(ratio=0.5, repair=Repair.NONE), None) is None


@pytest.mark.parametrize("scales", [(0.0, 1.0), (-1.0,), (1.0, 5.0)])
def test_a_scale_out_of_range_is_a_usage_error(scales):
    with pytest.raises(UsageError, match="--depth-scales"):
        ChannelPruneConfig(ratio=0.5, depth_scales=scales)


def test_the_stage_prunes_by_depth_and_records_the_group_ratios(tmp_path):
    source = save(_three_groups(), tmp_path / "m.onnx")
    config = ChannelPruneConfig(ratio=0.5, repair=Repair.NONE, round_to=1, gate=False, depth_scales=(0.5, 1.0, 1.5))
    result = prune_channels(source, tmp_path / "out.onnx", config)
    assert sorted(result.tried[0]["group_ratios"].values()) == [0.25, 0.5, 0.75]
    assert sorted(result.pruned_layers.values()) == ["8 -> 2", "8 -> 4", "8 -> 6"]
    out = onnx.load(tmp_path / "out.onnx")
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert run_model(out, {"x": x})[0].shape == (2, 4, 8, 8)
    # saved with the config: the codec spells it, and a different shape is a different config (cache key)
    assert codec.encode(config)["depth_scales"] == [0.5, 1.0, 1.5]
    assert codec.decode(ChannelPruneConfig, codec.encode(config)) == config
    assert codec.encode(config) != codec.encode(ChannelPruneConfig(ratio=0.5, repair=Repair.NONE, round_to=1,
                                                                   gate=False, depth_scales=(1.5, 1.0, 0.5)))


def test_cli_spells_depth_scales(tmp_path, cli):
    source = save(_three_groups(), tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    code, stdout, err = cli("prune", source, "-o", out, "--method", "channels", "--ratio", "0.5", "--round-to", "1",
                            "--no-gate", "--depth-scales", "1.5", "--depth-scales", "1", "--depth-scales", "0.5")
    assert code == 0, err
    convs = [n for n in onnx.load(out).graph.node if n.op_type == "Conv"]
    inits = {t.name: t.dims[0] for t in onnx.load(out).graph.initializer}
    assert [inits[n.input[1]] for n in convs] == [2, 4, 6, 4]  # early pruned hardest, the output Conv whole
    code, stdout, err = cli("prune", source, "-o", tmp_path / "bad.onnx", "--method", "channels",
                            "--depth-scales", "0")
    assert code == 2 and "--depth-scales" in err and "Traceback" not in err + stdout
    assert not (tmp_path / "bad.onnx").exists()


def test_the_search_varies_allocation_and_depth_only_where_groups_can_differ():
    knobs = registered_passes()["prune_channels"].knobs
    fields = {k.field for k in knobs("cpu", _three_groups())}
    assert {"ratio", "allocation", "depth_scales"} <= fields
    one_group = model_from_text(
        "h = Conv <pads = [1, 1, 1, 1]> (x, w1)\nr = Relu (h)\ny = Conv (r, w2)",
        dict(w1=np.ones((8, 3, 3, 3), np.float32), w2=np.ones((4, 8, 1, 1), np.float32)),
        "float[N,3,8,8] x", "float[N,4,8,8] y")
    fields = {k.field for k in knobs("cpu", one_group)}
    assert "ratio" in fields and not fields & {"allocation", "depth_scales"}
    depth = next(k for k in knobs("cpu", _three_groups()) if k.field == "depth_scales")
    assert depth.choices[0] == []  # the seed trial prunes uniformly
