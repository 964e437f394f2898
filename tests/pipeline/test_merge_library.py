"""Why merge builds its own blocks beside onnxruntime-extensions' ``pre_post_processing`` steps: the
measured differences the choice rests on (benchmarks/merge_library.py times them). A library update
that removes a difference fails here, and the choice is to be measured again. Skipped without
onnxruntime-extensions."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime_extensions")

from onnxforge.pipeline.merge import ImagePre, PixelLayout, PostKind

pps = pytest.importorskip("onnxruntime_extensions.tools.pre_post_processing")

_BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "merge_library.py"
_spec = importlib.util.spec_from_file_location("merge_library", _BENCHMARK)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

RAW = ("batch", bench.H, bench.W, 3)


def _image(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)


def _pre_outputs(config: dict, steps: list, raw: tuple, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
    """What each version feeds the network (an Identity network), and the library graph."""
    mine = bench.ours(bench.network(identity=True), **config)
    theirs = bench.library(bench.network(identity=True), bench._uint8_images(raw), steps, [])
    ours_out = bench._outputs(mine, {mine.graph.input[0].name: image})[0]
    return ours_out, bench._outputs(theirs, {"image": image})[0], [n.op_type for n in theirs.graph.node]


def test_layout_and_bytes_to_float_are_the_same_graph_as_ours():
    image = _image((2, bench.H, bench.W, 3))
    ours, theirs, ops = _pre_outputs({"pre": ImagePre(layout=PixelLayout.HWC)},
                                     [pps.ChannelsLastToChannelsFirst(has_batch_dim=True), pps.ImageBytesToFloat()],
                                     RAW, image)
    np.testing.assert_array_equal(ours, theirs)
    assert {"Transpose", "Cast", "Mul"} <= set(ops) and not {"Sub", "Div"} & set(ops)


def test_library_normalize_takes_three_ops_where_ours_takes_two():
    image = _image((1, bench.H, bench.W, 3))
    config = {"pre": ImagePre(layout=PixelLayout.HWC, mean=bench.MEAN, std=bench.STD)}
    steps = [pps.ChannelsLastToChannelsFirst(has_batch_dim=True), pps.ImageBytesToFloat(),
             pps.Normalize(list(zip(bench.MEAN, bench.STD, strict=True)), layout="CHW")]
    ours, theirs, ops = _pre_outputs(config, steps, RAW, image)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)  # same values, to float rounding
    assert {"Mul", "Sub", "Div"} <= set(ops)  # scale, subtract the mean, divide by std: three passes
    mine = bench.ours(bench.network(identity=True), **config)
    assert [n.op_type for n in mine.graph.node].count("Mul") == 1 and "Div" not in {n.op_type for n in mine.graph.node}
    with pytest.raises(AssertionError):  # one or four channels: not covered
        pps.Normalize([(0.5, 0.5)] * 4)


def test_library_resize_is_another_resize_than_ours():
    image = _image((320, 320, 3))  # square: no crop, only the resize itself differs
    config = {"pre": ImagePre(layout=PixelLayout.HWC, batched=False, dynamic_size=True)}
    steps = [pps.Resize((bench.H, bench.W), layout="HWC"), pps.CenterCrop(bench.H, bench.W),
             pps.ChannelsLastToChannelsFirst(), pps.ImageBytesToFloat(), pps.Unsqueeze([0])]
    ours, theirs, _ = _pre_outputs(config, steps, ("h", "w", 3), image)
    assert ours.shape == theirs.shape == (1, 3, bench.H, bench.W)
    assert np.abs(ours - theirs).max() > 0.05  # antialiased (opset 18) vs plain bilinear, in [0, 1] units
    # not square: the library keeps the aspect ratio and crops; ours stretches the whole image
    wide = _image((240, 480, 3))
    ours, theirs, _ = _pre_outputs(config, steps, ("h", "w", 3), wide)
    assert np.abs(ours - theirs).max() > 0.1


def test_library_argmax_gives_no_score_and_topk_has_no_step():
    feeds = {"pixels": np.random.default_rng(1).normal(size=(4, 3, bench.H, bench.W)).astype(np.float32)}
    mine = bench.ours(bench.network(), post=PostKind.ARGMAX)
    theirs = bench.library(bench.network(), None, [], [pps.Softmax(), pps.ArgMax()])
    assert [o.name for o in mine.graph.output] == ["label", "score"]
    assert len(theirs.graph.output) == 1
    np.testing.assert_array_equal(bench._outputs(mine, feeds)[0], bench._outputs(theirs, feeds)[0])
    assert not hasattr(pps, "TopK")


def test_library_graphs_declare_the_extensions_domain_and_raise_the_opset():
    net = bench.network()
    net.opset_import[0].version = 17
    theirs = bench.library(net, bench._uint8_images(RAW), [pps.ImageBytesToFloat()], [])
    domains, loads = bench.deployability(theirs)
    assert loads and domains == ["declares com.microsoft.extensions"]
    assert {o.domain: o.version for o in theirs.opset_import}[""] == 18  # the network was converted to 18


def test_library_tokenizer_step_does_not_truncate(tmp_path: Path):
    row = bench.tokenizer_row(tmp_path)
    assert row["parity"].startswith("4/5") and "max_length" in row["parity"]
    assert row["library_domains"] == ["com.microsoft.extensions"] and not row["library_loads_without_extensions"]


def test_loading_the_extensions_library_leaves_the_protobuf_setting_alone():
    env = {k: v for k, v in os.environ.items() if k != "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"}
    code = ("import os\nfrom onnxforge.pipeline.merge.tokenizer import extensions_library\nextensions_library()\n"
            "import onnxruntime_extensions\nprint(os.environ.get('PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION'))")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": str(root)}, check=True)
    assert done.stdout.strip() == "None"
