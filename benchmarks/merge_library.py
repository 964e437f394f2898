"""Library vs our own: merge's pre/post-processing blocks against onnxruntime-extensions' ``pre_post_processing`` steps.

For each block both versions are joined to the same small network (uint8 images [1, 224, 224, 3] in;
GlobalAveragePool + Gemm to 10 classes) and compared on the same random raw inputs: parity (max abs
difference of what the block feeds the network, or of the block's outputs), latency of the whole
merged graph (p50, batch 1, 1 thread, interleaved side by side, ratio library / ours) and
deployability (the op domains the merged graph uses; whether a plain onnxruntime session loads it
without the onnxruntime-extensions custom-op library). The tokenizer row compares the two
BertTokenizer blocks over a small WordPiece vocabulary, on short texts and on one longer than
``max_length``.

``python -m benchmarks merge_library`` (needs onnxruntime-extensions: the ``tokenizer`` or ``bench`` extra).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

H = W = 224
CLASSES = 10
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet
ROUNDS = 40


def network(*, identity: bool = False) -> onnx.ModelProto:
    """The network the blocks wrap: float NCHW images -> class scores (or the images themselves)."""
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, H, W])
    if identity:
        y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, H, W])
        graph = helper.make_graph([helper.make_node("Identity", ["pixels"], ["logits"])], "identity", [x], [y])
    else:
        rng = np.random.default_rng(0)
        y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])
        graph = helper.make_graph(
            [helper.make_node("GlobalAveragePool", ["pixels"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1)],
            "tiny", [x], [y],
            [numpy_helper.from_array(rng.normal(size=(CLASSES, 3)).astype(np.float32) * 4, "w"),
             numpy_helper.from_array(rng.normal(size=CLASSES).astype(np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def ours(net: onnx.ModelProto, **config: Any) -> onnx.ModelProto:
    from onnxforge.pipeline.merge import MergeConfig
    from onnxforge.pipeline.merge.build import compose_merged

    return compose_merged([("net", net)], MergeConfig(**config), None, []).model


def library(net: onnx.ModelProto, raw: onnx.ValueInfoProto | None, pre: list, post: list) -> onnx.ModelProto:
    from onnxruntime_extensions.tools.pre_post_processing import PrePostProcessor

    inputs = [raw] if raw is not None else [helper.make_tensor_value_info("pixels", TensorProto.FLOAT,
                                                                          ["batch", 3, H, W])]
    processor = PrePostProcessor(inputs, 18)
    if pre:
        processor.add_pre_processing(pre)
    if post:
        processor.add_post_processing(post)
    return processor.run(net)


def _uint8_images(shape: tuple[int, ...]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("image", TensorProto.UINT8, list(shape))


def deployability(model: onnx.ModelProto) -> tuple[list[str], bool]:
    """(the non-standard op domains the graph uses, whether plain onnxruntime loads it)."""
    import onnxruntime as ort

    domains = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    declared = sorted({o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx")} - set(domains))
    domains += [f"declares {d}" for d in declared]  # an opset import no node uses: loads, but says otherwise
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        loads = True
    except Exception:  # any failure to load is "does not load"
        loads = False
    return domains, loads


def _session(model: onnx.ModelProto, extensions: bool = False):
    from onnxforge.pipeline.merge.check import session

    return session(model, extensions=extensions)


def _single_thread(model: onnx.ModelProto, extensions: bool = False):
    import onnxruntime as ort

    from onnxforge._ort_logs import session_options

    options = session_options()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    if extensions:
        from onnxforge.pipeline.merge.tokenizer import extensions_library

        options.register_custom_ops_library(extensions_library())
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray], extensions: bool = False) -> list[np.ndarray]:
    return _session(model, extensions).run(None, feeds)


def _latency(mine: onnx.ModelProto, theirs: onnx.ModelProto, feeds_mine: dict, feeds_theirs: dict,
             extensions: bool = False) -> tuple[float, float]:
    from onnxforge.targets.latency import compare_latency

    stats = compare_latency({"ours": _single_thread(mine, extensions), "library": _single_thread(theirs, extensions)},
                            {"ours": feeds_mine, "library": feeds_theirs}, rounds=ROUNDS)
    return stats["ours"].p50_ms, stats["library"].p50_ms


Row = dict[str, Any]


def _image_row(block: str, library_steps: Callable[[], list], config: dict[str, Any], raw_shape: tuple[int, ...],
               feed_shape: tuple[int, ...], note: str) -> Row:
    """One pre-processing block: parity on what reaches the network, latency of the merged graph."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=feed_shape, dtype=np.uint8)
    mine_id = ours(network(identity=True), **config)
    theirs_id = library(network(identity=True), _uint8_images(raw_shape), library_steps(), [])
    mine_feed = {mine_id.graph.input[0].name: image}  # ours keeps the network input's name
    got_mine, got_theirs = _outputs(mine_id, mine_feed)[0], _outputs(theirs_id, {"image": image})[0]
    if got_mine.shape != got_theirs.shape:
        parity = f"different shapes {got_mine.shape} vs {got_theirs.shape}"
        max_abs = None
    else:
        max_abs = float(np.abs(got_mine.astype(np.float64) - got_theirs).max())
        parity = f"max abs {max_abs:.2g}"
    mine = ours(network(), **config)
    theirs = library(network(), _uint8_images(raw_shape), library_steps(), [])
    ms_mine, ms_theirs = _latency(mine, theirs, mine_feed, {"image": image})
    domains, loads = deployability(theirs)
    return {"block": block, "parity": parity, "max_abs": max_abs, "ours_ms": ms_mine, "library_ms": ms_theirs,
            "library_domains": domains, "library_loads_without_extensions": loads,
            "ours_nodes": len(mine.graph.node), "library_nodes": len(theirs.graph.node), "note": note}


def image_rows() -> list[Row]:
    from onnxruntime_extensions.tools.pre_post_processing import (
        CenterCrop,
        ChannelsLastToChannelsFirst,
        ImageBytesToFloat,
        Normalize,
        Resize,
        Unsqueeze,
    )

    from onnxforge.pipeline.merge import ImagePre, PixelLayout

    batch = (1, H, W, 3)
    rows = [
        _image_row("layout (HWC -> NCHW) + uint8 -> float",
                   lambda: [ChannelsLastToChannelsFirst(has_batch_dim=True), ImageBytesToFloat()],
                   {"pre": ImagePre(layout=PixelLayout.HWC)}, ("batch", H, W, 3), batch,
                   "same ops (Transpose, Cast, Mul)"),
        _image_row("normalize (ImageNet mean/std)",
                   lambda: [ChannelsLastToChannelsFirst(has_batch_dim=True), ImageBytesToFloat(),
                            Normalize(list(zip(MEAN, STD, strict=True)), layout="CHW")],
                   {"pre": ImagePre(layout=PixelLayout.HWC, mean=MEAN, std=STD)}, ("batch", H, W, 3), batch,
                   "library: Mul, Sub, Div (3 channels only); ours: one Mul + one Add"),
    ]
    # Resize: the library keeps the aspect ratio (then CenterCrop, unbatched HWC only) and antialiases
    # (opset 18); ours stretches to the network's H x W without antialiasing. A square 320 x 320
    # image isolates the antialiasing (no crop).
    rows.append(_image_row(
        "resize 320x320 -> 224x224",
        lambda: [Resize((H, W), layout="HWC"), CenterCrop(H, W), ChannelsLastToChannelsFirst(),
                 ImageBytesToFloat(), Unsqueeze([0])],
        {"pre": ImagePre(layout=PixelLayout.HWC, batched=False, dynamic_size=True)}, ("h", "w", 3), (320, 320, 3),
        "library: aspect-keeping resize + center crop, antialiased; ours: stretch, half_pixel bilinear"))
    return rows


def post_rows() -> list[Row]:
    from onnxruntime_extensions.tools.pre_post_processing import ArgMax, Softmax

    from onnxforge.pipeline.merge import PostKind

    rng = np.random.default_rng(2)
    feeds = {"pixels": rng.normal(size=(32, 3, H, W)).astype(np.float32)}  # parity on 32 samples
    one = {"pixels": feeds["pixels"][:1]}  # latency at batch 1
    rows = []
    for block, kind, steps in (("softmax", PostKind.SOFTMAX, [Softmax()]),
                               ("argmax (label + score)", PostKind.ARGMAX, [Softmax(), ArgMax()])):
        mine = ours(network(), post=kind)
        theirs = library(network(), None, [], steps)
        got_mine, got_theirs = _outputs(mine, feeds), _outputs(theirs, feeds)
        if kind is PostKind.SOFTMAX:
            max_abs: float | None = float(np.abs(got_mine[0] - got_theirs[0]).max())
            parity = f"max abs {max_abs:.2g}"
            note = "same op (Softmax)"
        else:
            max_abs = None
            same = bool(np.array_equal(got_mine[0], got_theirs[0]))
            parity = f"label {'equal' if same else 'DIFFERS'}; no score output"
            note = "library: ArgMax gives the label only; ours: TopK(k=1) gives label and score"
        ms_mine, ms_theirs = _latency(mine, theirs, one, one)
        domains, loads = deployability(theirs)
        rows.append({"block": block, "parity": parity, "max_abs": max_abs, "ours_ms": ms_mine,
                     "library_ms": ms_theirs, "library_domains": domains,
                     "library_loads_without_extensions": loads, "ours_nodes": len(mine.graph.node),
                     "library_nodes": len(theirs.graph.node), "note": note})
    rows.append({"block": "top-k", "parity": "no library step", "max_abs": None, "ours_ms": None,
                 "library_ms": None, "library_domains": [], "library_loads_without_extensions": None,
                 "note": "pre_post_processing has no TopK step (TopK only inside its NMS step)"})
    return rows


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "quick", "brown", "fox", "jump", "##s", "over",
         "lazy", "dog", ".", "!", "on", "##nx", "o", "run", "##time", "token", "##izer", "in", "graph", "a",
         "cafe", "naive", "resume", ",", "12", "5", "%", "faster", "or", "not", "?", "—", "runs", "inside"]


def tokenizer_row(folder: Path) -> Row:
    """Both BertTokenizer blocks over the same vocabulary, fed one text at a time."""
    from onnxruntime_extensions.tools.pre_post_processing import BertTokenizer, TokenizerParam

    from onnxforge.pipeline.merge import TokenizerConfig
    from onnxforge.pipeline.merge.tokenizer import EXAMPLE_TEXTS

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    max_length = 16
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, [1, "tokens"])
           for n in ("input_ids", "attention_mask", "token_type_ids")]
    net = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", [i.name], [f"out_{i.name}"]) for i in ids], "ids", ids,
        [helper.make_tensor_value_info(f"out_{i.name}", TensorProto.INT64, [1, "tokens"]) for i in ids]),
        opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    net_path = folder / "net.onnx"
    onnx.save(net, net_path)
    from onnxforge.pipeline.merge.build import compose_merged
    from onnxforge.pipeline.merge.config import MergeConfig

    mine = compose_merged([("net", net)], MergeConfig(tokenizer=TokenizerConfig(max_length=max_length)),
                          net_path, []).model
    text = helper.make_tensor_value_info("text", TensorProto.STRING, [1])
    param = TokenizerParam(vocab_or_file={t: i for i, t in enumerate(VOCAB)}, do_lower_case=True, strip_accents=True)
    # need_token_type_ids_output=False is the spelling that keeps all three outputs (the flag reads inverted)
    theirs = library(net, text, [BertTokenizer(param, need_token_type_ids_output=False)], [])
    texts = [*EXAMPLE_TEXTS, " ".join(["the quick brown fox"] * 10)]  # the last: 41 tokens > max_length
    equal, truncated, differ = 0, [], []
    for t in texts:
        a = _outputs(mine, {"text": np.array([t], dtype=object)}, extensions=True)
        b = _outputs(theirs, {"text": np.array([t], dtype=object)}, extensions=True)
        same = len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        equal += same
        if not same:
            differ.append(t[:20])
        truncated.append((a[0].shape[-1], b[0].shape[-1]))
    feed = {"text": np.array([EXAMPLE_TEXTS[0]], dtype=object)}
    ms_mine, ms_theirs = _latency(mine, theirs, feed, feed, extensions=True)
    domains, loads = deployability(theirs)
    long_mine, long_theirs = truncated[-1]
    short = f"{equal}/{len(texts)} texts equal ids" + (" (the one longer than max_length differs)"
                                                     if differ == [texts[-1][:20]] else f" (differ: {differ})")
    return {"block": "tokenizer (BertTokenizer)", "parity": short,
            "max_abs": None, "ours_ms": ms_mine, "library_ms": ms_theirs, "library_domains": domains,
            "library_loads_without_extensions": loads, "ours_nodes": len(mine.graph.node),
            "library_nodes": len(theirs.graph.node),
            "note": f"both use the extensions' BertTokenizer op; a {long_theirs}-token text: ours keeps "
                    f"{long_mine} (max_length), the library step sets no max_length"}


def build_cost(repeats: int = 3) -> dict[str, float]:
    """CPU seconds to start Python and import what building a block needs: onnx + onnxruntime (ours) vs
    those + onnxruntime_extensions' pre_post_processing (the library's; it imports transformers when
    installed). Interleaved, the median of ``repeats`` fresh processes each."""
    import resource
    import subprocess
    import sys

    code = {"ours": "import onnx, onnxruntime",
            "library": "import onnx, onnxruntime; import onnxruntime_extensions.tools.pre_post_processing"}
    seconds: dict[str, list[float]] = {k: [] for k in code}
    for _ in range(repeats):
        for name, text in code.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run([sys.executable, "-c", text], check=True, capture_output=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            seconds[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return {name: float(np.median(v)) for name, v in seconds.items()}


# What merge keeps for each block, and why (the same reasons stand beside the code that builds it).
KEPT = {
    "layout (HWC -> NCHW) + uint8 -> float": "ours: same graph; the library adds only build cost (import row)",
    "normalize (ImageNet mean/std)": "ours: library 3 ops vs 2, slower; 3 channels only",
    "resize 320x320 -> 224x224": "ours: library is another resize (antialias, aspect crop), slower",
    "softmax": "ours: the same one op; the library adds only build cost",
    "argmax (label + score)": "ours: the library has no score output",
    "top-k": "ours: not in the library",
    "tokenizer (BertTokenizer)": "ours: same op, but the library step cannot truncate",
}


def run() -> dict:
    from benchmarks._common import markdown_table, write_results

    rows = image_rows() + post_rows()
    with tempfile.TemporaryDirectory(prefix="bench-merge-library-") as tmp:
        rows.append(tokenizer_row(Path(tmp)))
    cost = build_cost()
    rows.append({"block": "building a block: import", "parity": "-", "max_abs": None, "ours_ms": None,
                 "library_ms": None, "library_domains": [], "library_loads_without_extensions": None,
                 "ours_cpu_s": cost["ours"], "library_cpu_s": cost["library"],
                 "note": f"CPU s to import onnx + onnxruntime: {cost['ours']:.2f}; + the library: "
                         f"{cost['library']:.2f} (it imports transformers, sets "
                         "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python)"})
    table_rows = []
    for r in rows:
        ratio = f"{r['library_ms'] / r['ours_ms']:.2f}x" if r.get("ours_ms") else "-"
        loads = r["library_loads_without_extensions"]
        used = [d for d in r["library_domains"] if not d.startswith("declares ")]
        declared = [d for d in r["library_domains"] if d.startswith("declares ")]
        deploy = "-" if loads is None else ("standard ONNX" if loads and not used
                                            else f"needs {', '.join(used) or 'extensions'}")
        if declared and loads is not None:
            deploy += f" ({', '.join(declared)})"
        table_rows.append([r["block"], r["parity"], f"{r['ours_ms']:.3f}" if r.get("ours_ms") else "-",
                           f"{r['library_ms']:.3f}" if r.get("library_ms") else "-", ratio, deploy, r["note"],
                           KEPT.get(r["block"], "-")])
    table = markdown_table(["merge block", "parity library vs ours", "ours p50 ms", "library p50 ms",
                            "library/ours", "library graph runs on", "how they differ", "merge uses"], table_rows)
    print("### Library vs our own: merge blocks vs onnxruntime-extensions pre_post_processing\n")
    print(table)
    print(f"\nwritten {write_results('merge_library', {'rows': rows, 'table': table})}")
    return {"rows": rows}


if __name__ == "__main__":
    run()
