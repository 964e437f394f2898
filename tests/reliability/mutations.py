"""Hypothesis strategies that damage valid inputs: ONNX files (bytes and protobuf fields) and
calibration arrays. Each strategy draws a *recipe* for the damage, so a failing example prints
as a readable description and shrinks to the smallest damage that still fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for conftest's model builders

from conftest import IMAGE_SHAPE, make_classifier, make_foldable_model

BASE_MODELS = {
    "classifier": make_classifier,  # x[N,3,8,8] -> logits[N,5]; Conv, Relu, Flatten, Gemm
    "foldable": make_foldable_model,  # x[N,16] -> y[N,8]; Add/Identity/MatMul/Mul chains
}

# ----------------------------------------------------------------------------------------------
# Byte-level damage


@st.composite
def byte_mutations(draw) -> tuple:
    """("flip", [(position fraction, xor mask)...]) | ("truncate", fraction) | ("insert", fraction, bytes)
    | ("delete", fraction, length). Positions are fractions of the file length, so one recipe
    applies to any base model."""
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
    fraction = st.floats(0.0, 1.0, allow_nan=False)
    if kind == "flip":
        flips = draw(st.lists(st.tuples(fraction, st.integers(1, 255)), min_size=1, max_size=8))
        return ("flip", flips)
    if kind == "truncate":
        return ("truncate", draw(fraction))
    if kind == "insert":
        return ("insert", draw(fraction), draw(st.binary(min_size=1, max_size=64)))
    return ("delete", draw(fraction), draw(st.integers(1, 64)))


def apply_bytes(data: bytes, recipe: tuple) -> bytes:
    buf = bytearray(data)
    n = len(buf)
    kind = recipe[0]
    if kind == "flip":
        for where, mask in recipe[1]:
            i = min(int(where * n), n - 1)
            buf[i] ^= mask
    elif kind == "truncate":
        del buf[int(recipe[1] * n):]
    elif kind == "insert":
        i = int(recipe[1] * n)
        buf[i:i] = recipe[2]
    elif kind == "delete":
        i = int(recipe[1] * n)
        del buf[i : i + recipe[2]]
    return bytes(buf)


# ----------------------------------------------------------------------------------------------
# Protobuf-level damage: each is (name, argument) applied by apply_proto


_DIMS = st.sampled_from([0, -1, -7, 2**31 - 1, 2**40, 2**62])
_ELEM_TYPES = st.sampled_from(
    [0, 2, 3, 5, 6, 7, 8, 9, 10, 11, 14, 16, 17, 21, 22, 99]
)  # incl. UNDEFINED, STRING, bogus
_OPSETS = st.sampled_from([0, 1, 6, 7, 30, 99, 2**31 - 1, -1])
_OP_TYPES = st.sampled_from(["FrobnicateOp", "", "conv", "Relu ", "Gemm\x00", "If", "Loop", "Scan", "QLinearConv",
                             "Softmax", "Reshape", "Where", "Split", "Resize"])


PROTO_MUTATIONS = st.one_of(
    st.tuples(st.just("input_dim"), st.integers(0, 3), _DIMS),
    st.tuples(st.just("output_dim"), st.integers(0, 3), _DIMS),
    st.tuples(st.just("initializer_dim"), st.integers(0, 9), _DIMS),
    st.tuples(st.just("input_rank"), st.integers(0, 6)),
    st.tuples(st.just("op_type"), st.integers(0, 9), _OP_TYPES),
    st.tuples(st.just("op_domain"), st.integers(0, 9), st.sampled_from(["com.nowhere", "com.microsoft", "ai.onnx.ml"])),
    st.tuples(st.just("drop_initializer"), st.integers(0, 9)),
    st.tuples(st.just("drop_node"), st.integers(0, 9)),
    st.tuples(st.just("drop_input"), st.integers(0, 3)),
    st.tuples(st.just("drop_outputs"), st.just(None)),
    st.tuples(st.just("rename_input"), st.sampled_from(["renamed", "", "conv_w", "logits"])),
    st.tuples(st.just("input_elem_type"), _ELEM_TYPES),
    st.tuples(st.just("output_elem_type"), _ELEM_TYPES),
    st.tuples(st.just("initializer_elem_type"), st.integers(0, 9), _ELEM_TYPES),
    st.tuples(st.just("opset"), _OPSETS),
    st.tuples(st.just("extra_opset"), st.sampled_from(["", "com.microsoft", "ai.onnx.ml", "x.y"]), _OPSETS),
    st.tuples(st.just("ir_version"), st.sampled_from([0, 1, 3, 11, 99, 2**40])),
    st.tuples(st.just("duplicate_output"), st.integers(0, 9), st.integers(0, 9)),
    st.tuples(st.just("attribute"), st.integers(0, 9), st.sampled_from([-5, 0, 1, 1000])),
    st.tuples(st.just("drop_attributes"), st.integers(0, 9)),
    st.tuples(st.just("swap_nodes"), st.integers(0, 9), st.integers(0, 9)),
    st.tuples(st.just("external_data"), st.sampled_from(["missing.bin", "../../etc/passwd", ""])),
)


def apply_proto(model: onnx.ModelProto, mutation: tuple) -> onnx.ModelProto:
    """A damaged copy of ``model``. Indexes wrap around; a mutation that finds nothing to damage
    leaves the model as it is (a valid input is also a fine test case)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    kind, *args = mutation

    def pick(seq, i):
        return seq[i % len(seq)] if len(seq) else None

    if kind in ("input_dim", "output_dim"):
        vi = pick(g.input if kind == "input_dim" else g.output, 0)
        if vi is not None and vi.type.tensor_type.shape.dim:
            dims = vi.type.tensor_type.shape.dim
            dims[args[0] % len(dims)].dim_value = args[1]
    elif kind == "initializer_dim":
        init = pick(g.initializer, args[0])
        if init is not None and init.dims:
            init.dims[0] = args[1]
    elif kind == "input_rank":
        vi = pick(g.input, 0)
        if vi is not None:
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for _ in range(args[0]):
                shape.dim.add().dim_value = 1
    elif kind == "op_type":
        node = pick(g.node, args[0])
        if node is not None:
            node.op_type = args[1]
    elif kind == "op_domain":
        node = pick(g.node, args[0])
        if node is not None:
            node.domain = args[1]
    elif kind == "drop_initializer":
        if len(g.initializer):
            del g.initializer[args[0] % len(g.initializer)]
    elif kind == "drop_node":
        if len(g.node):
            del g.node[args[0] % len(g.node)]
    elif kind == "drop_input":
        if len(g.input):
            del g.input[args[0] % len(g.input)]
    elif kind == "drop_outputs":
        del g.output[:]
    elif kind == "rename_input":
        if len(g.input):
            g.input[0].name = args[0]
    elif kind == "input_elem_type":
        if len(g.input):
            g.input[0].type.tensor_type.elem_type = args[0]
    elif kind == "output_elem_type":
        if len(g.output):
            g.output[0].type.tensor_type.elem_type = args[0]
    elif kind == "initializer_elem_type":
        init = pick(g.initializer, args[0])
        if init is not None:
            init.data_type = args[1]
    elif kind == "opset":
        m.opset_import[0].version = args[0]
    elif kind == "extra_opset":
        entry = m.opset_import.add()
        entry.domain, entry.version = args[0], args[1]
    elif kind == "ir_version":
        m.ir_version = args[0]
    elif kind == "duplicate_output":
        a, b = pick(g.node, args[0]), pick(g.node, args[1])
        if a is not None and b is not None and a.output and b.output:
            a.output[0] = b.output[0]
    elif kind == "attribute":
        node = pick(g.node, args[0])
        if node is not None and node.attribute:
            attr = node.attribute[0]
            if attr.ints:
                attr.ints[0] = args[1]
            else:
                attr.i = args[1]
    elif kind == "drop_attributes":
        node = pick(g.node, args[0])
        if node is not None:
            del node.attribute[:]
    elif kind == "swap_nodes":
        if len(g.node) > 1:
            i, j = args[0] % len(g.node), args[1] % len(g.node)
            a, b = onnx.NodeProto(), onnx.NodeProto()
            a.CopyFrom(g.node[i])
            b.CopyFrom(g.node[j])
            g.node[i].CopyFrom(b)
            g.node[j].CopyFrom(a)
    elif kind == "external_data":
        init = pick(g.initializer, 0)
        if init is not None:
            init.ClearField("raw_data")
            init.ClearField("float_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", args[0]), ("offset", "0"), ("length", "64")):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
    else:
        raise AssertionError(kind)
    return m


# ----------------------------------------------------------------------------------------------
# Model files: a base model, then protobuf damage, byte damage, or both


@st.composite
def damaged_models(draw) -> tuple[str, list[tuple], tuple | None]:
    """(base model name, protobuf mutations (0-3), byte mutation or None)."""
    base = draw(st.sampled_from(sorted(BASE_MODELS)))
    layer = draw(st.sampled_from(["proto", "bytes", "both"]))
    proto = draw(st.lists(PROTO_MUTATIONS, min_size=1, max_size=3)) if layer != "bytes" else []
    raw = draw(byte_mutations()) if layer != "proto" else None
    return base, proto, raw


def build_model_bytes(case: tuple[str, list[tuple], tuple | None]) -> bytes:
    base, proto, raw = case
    model = BASE_MODELS[base]()
    for mutation in proto:
        model = apply_proto(model, mutation)
    try:
        data = model.SerializeToString()
    except Exception:  # a field protobuf refuses to encode: damage the valid bytes instead
        data = BASE_MODELS[base]().SerializeToString()
    return apply_bytes(data, raw) if raw is not None else data


# ----------------------------------------------------------------------------------------------
# Calibration arrays for the classifier (input ``x``: float32 [N, 3, 8, 8])


_CALIBRATION_FIELDS = {
    "samples": [8, 0, 1, 2, 3, 17],
    "dtype": ["float32", "float64", "float16", "int32", "int64", "uint8", "bool", "complex64", "U5", "object"],
    "shape": ["ok", "rank-1", "rank+1", "scalar", "wrong-channels", "wrong-hw", "empty-dim"],
    "poison": [None, "nan", "inf", "-inf", "huge"],
    "key": ["x", "X", "image", "", "label"],
    "extra": [None, "label-ok", "label-short", "label-scalar", "label-bytes", "label-float", "junk"],
}


@st.composite
def calibration_arrays(draw) -> dict:
    """A recipe for an .npz: a valid one (first value of every field) with one to three fields
    changed, so most examples get past the first check and reach the deeper ones."""
    recipe = {name: values[0] for name, values in _CALIBRATION_FIELDS.items()}
    for name in draw(st.lists(st.sampled_from(sorted(_CALIBRATION_FIELDS)), min_size=1, max_size=3, unique=True)):
        recipe[name] = draw(st.sampled_from(_CALIBRATION_FIELDS[name]))
    return recipe


def build_calibration(recipe: dict) -> dict[str, np.ndarray]:
    n = recipe["samples"]
    rng = np.random.default_rng(n)
    c, h, w = IMAGE_SHAPE
    shape = {
        "ok": (n, c, h, w),
        "rank-1": (n, c, h),
        "rank+1": (n, c, h, w, 1),
        "scalar": (),
        "wrong-channels": (n, c + 1, h, w),
        "wrong-hw": (n, c, h + 3, w - 1),
        "empty-dim": (n, c, 0, w),
    }[recipe["shape"]]
    values = rng.standard_normal(shape)
    if recipe["poison"] and values.size:
        values.flat[values.size // 2] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "huge": 1e300}[recipe["poison"]]
    dtype = recipe["dtype"]
    if dtype == "object":
        array = np.empty(shape, dtype=object)
        array[...] = values
    elif dtype == "U5":
        array = values.astype("U5")
    else:
        with np.errstate(all="ignore"):
            array = values.astype(dtype)
    arrays = {recipe["key"]: array}
    extra = recipe["extra"]
    if extra == "label-ok":
        arrays["label"] = np.arange(n) % 5
    elif extra == "label-short":
        arrays["label"] = np.zeros(max(n - 1, 0), np.int64)
    elif extra == "label-scalar":
        arrays["label"] = np.int64(3)
    elif extra == "label-bytes":  # text labels (numpy unicode) are valid, for a user metric; bytes are not
        arrays["label"] = np.array([b"cat"] * n)
    elif extra == "label-float":
        arrays["label"] = np.linspace(0.0, 4.5, n)
    elif extra == "junk":
        arrays["junk"] = np.zeros(3)
    return arrays


def write_calibration(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """np.savez; an empty key cannot be a keyword argument, so the dict is passed positionally."""
    with open(path, "wb") as f:
        np.savez(f, **{k or "arr_0": v for k, v in arrays.items()})
    return path
