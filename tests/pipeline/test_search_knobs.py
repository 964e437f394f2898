"""``Pass.knobs(target, model)``: a pass proposes only what applies to the graph the search starts from,
and the search space reads it (no int4 or dynamic-quant seeds on a conv-only graph, no channel ratio
where no channel group can be pruned)."""

from __future__ import annotations

import numpy as np
import onnx.numpy_helper
import onnx.parser
import pytest
from conftest import make_classifier
from transformer_graphs import make_encoder

from onnxforge.errors import UsageError
from onnxforge.pipeline.registry import registered_passes
from onnxforge.pipeline.search.space import SearchSpace


def _schemes(model) -> list[str]:
    knobs = registered_passes()["quantize"].knobs("cpu", model)
    return [c[0] for c in next(k for k in knobs if k.field == "schemes").choices]


def _conv_to_output() -> onnx.ModelProto:
    """A single Conv whose channels are the graph's output: no group may lose a channel."""
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
            y = Conv <pads = [1, 1, 1, 1]> (x, w)
        }
    """)
    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(weight, "w"))
    return model


def test_a_conv_only_graph_gets_no_int4_and_no_dynamic_schemes():
    cnn = make_classifier(0, channels=8)
    assert not any("int4" in s or "dynamic" in s for s in _schemes(cnn))
    fields = {k.field for k in registered_passes()["quantize"].knobs("cpu", cnn)}
    assert fields == {"schemes", "float_share"}  # int4's block size and accuracy level go with int4
    seeds = SearchSpace("cpu", ("quantize",), model=cnn).seeds()
    assert seeds and not any("int4" in str(s) or "dynamic" in str(s) for s in seeds)


def test_a_graph_with_matmul_weights_keeps_them():
    encoder = make_encoder()
    schemes = _schemes(encoder)
    assert any(s.startswith("dynamic") for s in schemes) and any("matmul" in s for s in schemes)
    assert _schemes(encoder) != _schemes(make_classifier(0, channels=8))


def test_no_prunable_group_means_no_channel_ratio():
    blocked = _conv_to_output()
    assert registered_passes()["prune_channels"].knobs("cpu", blocked) == ()
    assert registered_passes()["prune_channels"].knobs("cpu", make_classifier(0, channels=8))
    space = SearchSpace("cpu", ("prune_channels", "quantize"), model=blocked)
    assert "prune_channels" not in space.knobs and space.inapplicable == ["prune_channels"]
    with pytest.raises(UsageError, match="nothing to act on"):
        SearchSpace("cpu", ("prune_channels",), model=blocked)
    with pytest.raises(UsageError, match="nothing to act on"):
        SearchSpace("cpu", ("prune_channels", "quantize"), {"prune_channels.ratio": [0.5]}, model=blocked)


def test_low_rank_needs_a_layer_large_enough_to_factor():
    assert registered_passes()["low_rank"].knobs("cpu", _conv_to_output()) == ()
    assert registered_passes()["low_rank"].knobs("cpu", None)


def test_every_pass_takes_the_model():
    model = make_classifier(0, channels=8)
    for name, cls in registered_passes().items():
        for knob in cls.knobs("cpu", model):  # a subset of the model-blind knobs, field for field
            assert knob.field in {k.field for k in cls.knobs("cpu")}, name


def test_recovery_is_sampled_only_after_a_structure_pass():
    """A distill after no pruning is skipped when the chain is built: the sampler never proposes it
    (it spent trials on such copies of a quantize-only plan), nor does the grid."""
    import optuna

    cnn = make_classifier(0, channels=8)
    space = SearchSpace("cpu", ("prune_channels", "distill", "quantize"), model=cnn,
                        pinned={"prune_channels.ratio": [0.5], "quantize.float_share": [0.0]})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), directions=["minimize"] * 2)
    plans = []
    for _ in range(40):
        trial = study.ask()
        plans.append(space.suggest(trial))
        study.tell(trial, (0.0, 1.0))
    assert any(p.params["recovery"] == "distill" for p in plans)  # it is still searched, after a prune
    for plan in [*plans, *(space.plan_from_params(p) for p in space.grid())]:
        names = [name for name, _ in plan.stages]
        assert "distill" not in names or names[0] == "prune_channels"
    assert any(p["recovery"] == "distill" for p in space.grid())
