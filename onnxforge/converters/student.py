"""The pruned ONNX graph carried back onto its PyTorch module: the student a distillation trains.

Rule. The dynamo exporter names initializers after the module's parameters (``layers.0.c1.weight``),
and channel pruning only appends ``__prunedN`` to the names it slices. So the student is a copy of
the teacher in which every parameter (and buffer) that has an initializer in the pruned graph is
*replaced* by that initializer: its shape (the channels the plan kept) and its values (the
least-squares repair changed the layers after each cut; those are copied in as they are).

- BatchNorm: the exporter folds it into the Conv before it (``c1.weight`` scaled, a new bias
  ``c1.weight_bias``). Where the graph folded it, the student fuses the same pair in PyTorch
  (``fuse_conv_bn_eval``, the BatchNorm becomes Identity), so the two compute the same function;
  a BatchNorm the graph kept maps its statistics by name like any buffer.
- Unnamed initializers (``val_4``: a Linear on 3-D inputs is a MatMul with a transposed weight that
  the exporter folds into a new constant) are identified on a fresh export of the teacher, by value:
  that export's ``val_4`` equals one parameter, or its transpose.
- Depthwise/grouped Convs take the graph's ``group`` attribute.

Nothing else is assumed about the module. Whether the result *is* the pruned network is measured,
not trusted: ``parity`` runs both on the same samples; a student that does not reproduce the graph is
refused with one line.

Which teacher channel each student channel came from (for feature losses) is found by matching
values: per cut layer, the correlation of the student's and the teacher's output channels on
calibration samples, assigned one to one (the repair fits each kept channel to its original, so the
match is exact for unrepaired layers and clear for repaired ones).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import onnx
import torch
from torch import nn

from onnxforge.errors import UsageError

if TYPE_CHECKING:
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.conv import _ConvNd

__all__ = ["Student", "base_name", "build_student", "fuse_batchnorms", "kept_channels"]

_PRUNED_SUFFIX = re.compile(r"(__pruned\d+)+$")
_FOLDED_BIAS = ".weight_bias"  # the exporter's name for the bias of a Conv that absorbed a BatchNorm
_CHANNEL_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def base_name(initializer: str) -> str:
    """The name an initializer had before pruning sliced it (``c1.weight__pruned3__pruned1`` -> ``c1.weight``)."""
    return _PRUNED_SUFFIX.sub("", initializer)


@dataclass
class Student:
    """The student module and how it was built from the graph."""

    module: nn.Module
    teacher: nn.Module  # the teacher with the same BatchNorm pairs fused: same module names as the student
    mapping: dict[str, str]  # student state key -> initializer name
    transposed: list[str] = field(default_factory=list)
    fused: list[str] = field(default_factory=list)  # "conv+bn" pairs fused like the graph folded them
    changed_modules: list[str] = field(default_factory=list)  # modules whose parameter shapes the plan cut
    unmapped: list[str] = field(default_factory=list)  # parameters with no initializer (left as they were)

    def describe(self) -> dict[str, Any]:
        return {"initializers_mapped": len(self.mapping), "transposed": self.transposed, "fused_batchnorm": self.fused,
                "changed_modules": self.changed_modules, "unmapped_parameters": self.unmapped}


def _float_initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {}
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE) and init.dims:
            out[init.name] = onnx.numpy_helper.to_array(init)
    return out


def _batchnorm_pairs(module: nn.Module, examples: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(conv, batchnorm) module names where the BatchNorm reads only that Conv's output, from torch.export."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return []
    try:
        program = torch.export.export(module, args=(), kwargs=dict(examples), strict=False)
    except Exception as e:
        raise UsageError(
            f"distill: torch.export cannot trace the teacher to find its BatchNorm layers "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})"
        ) from e
    signature = program.graph_signature
    owner = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    pairs = []
    for node in program.graph.nodes:
        if node.op != "call_function" or "batch_norm" not in str(node.target):
            continue
        source, weight = node.args[0], node.args[1]
        if not hasattr(source, "target") or "conv" not in str(source.target) or len(source.users) != 1:
            continue
        conv_weight = owner.get(getattr(source.args[1], "name", ""))
        bn_weight = owner.get(getattr(weight, "name", ""))
        if conv_weight and bn_weight:
            pairs.append((conv_weight.rsplit(".", 1)[0], bn_weight.rsplit(".", 1)[0]))
    return pairs


def fuse_batchnorms(module: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """Fuse each (conv, batchnorm) pair in place (eval-mode statistics); the BatchNorm becomes Identity."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for conv_name, bn_name in pairs:
        # the pairs come from the graph's Conv -> BatchNormalization nodes, so these are a conv and a batchnorm
        conv = cast("_ConvNd", module.get_submodule(conv_name))
        bn = cast("_BatchNorm", module.get_submodule(bn_name))
        fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
        _set_submodule(module, conv_name, fused)
        _set_submodule(module, bn_name, nn.Identity())
    return module


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _state_key(name: str, state: Mapping[str, torch.Tensor]) -> str | None:
    base = base_name(name)
    if base in state:
        return base
    if base.endswith(_FOLDED_BIAS) and base[: -len(_FOLDED_BIAS)] + ".bias" in state:
        return base[: -len(_FOLDED_BIAS)] + ".bias"
    return None


def _fits(small: tuple[int, ...], big: tuple[int, ...]) -> bool:
    return len(small) == len(big) and all(s <= b for s, b in zip(small, big, strict=True))


def _by_value(
    unnamed: list[str], teacher: nn.Module, teacher_graph: onnx.ModelProto | None
) -> dict[str, tuple[str, bool]]:
    """{pruned initializer: (parameter name, transposed)} for initializers not named after a parameter,
    found on the teacher's own export: its initializer of the same base name equals a parameter (or its
    transpose)."""
    if teacher_graph is None:
        return {}
    exported = _float_initializers(teacher_graph)
    params = {k: v.detach().cpu().numpy() for k, v in teacher.state_dict().items() if v.is_floating_point()}
    found = {}
    for name in unnamed:
        value = exported.get(base_name(name))
        if value is None:
            continue
        for key, array in params.items():
            if array.shape == value.shape and np.array_equal(array, value):
                found[name] = (key, False)
                break
            if array.ndim == 2 and array.T.shape == value.shape and np.array_equal(array.T, value):
                found[name] = (key, True)
                break
    return found


def _replace(module: nn.Module, key: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = key.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    param = owner._parameters.get(leaf)  # never a None parameter: keys come from state_dict(), which skips them
    if param is not None:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=param.requires_grad)
    else:
        owner._buffers[leaf] = value


def _conv_groups(graph: onnx.ModelProto) -> dict[str, int]:
    """{weight initializer: group} for the graph's Convs."""
    groups = {}
    for node in graph.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1:
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            groups[node.input[1]] = int(group)
    return groups


def build_student(
    teacher: nn.Module,
    pruned: onnx.ModelProto,
    examples: Mapping[str, torch.Tensor],
    export_teacher: Any = None,
) -> Student:
    """The pruned graph's network as a trainable copy of ``teacher`` (see the module docstring).

    ``examples``: one batch of inputs by name (for torch.export's BatchNorm pairing);
    ``export_teacher()``: returns the teacher's own ONNX export, called only when some initializers
    are not named after parameters. Raises UsageError when the graph's initializers cannot be tied
    to the module's parameters. Parity is the caller's to measure.
    """
    teacher = copy.deepcopy(teacher).eval()
    initializers = _float_initializers(pruned)
    bases = {base_name(n) for n in initializers}
    pairs = [(conv, bn) for conv, bn in _batchnorm_pairs(teacher, examples)
             if not any(b.startswith(bn + ".") for b in bases)]  # the graph folded this BatchNorm
    fuse_batchnorms(teacher, pairs)
    student = copy.deepcopy(teacher)
    state = student.state_dict()
    mapping: dict[str, str] = {}
    transposed: list[str] = []
    unnamed = []
    for name in initializers:
        key = _state_key(name, state)
        if key is None:
            unnamed.append(name)
        else:
            mapping[key] = name
    if unnamed and any(p not in mapping for p, _ in student.named_parameters()):
        for name, (key, flip) in _by_value(unnamed, teacher, export_teacher() if export_teacher else None).items():
            if key in state and key not in mapping:
                mapping[key] = name
                if flip:
                    transposed.append(key)
    if not mapping:
        raise UsageError("distill: no initializer of the pruned graph is named after a parameter of the source model "
                         "(was it exported from another model, or by the TorchScript exporter?)",
                         hint="prune a dynamo export of the same source: onnxforge export SOURCE --exporter dynamo")
    changed: set[str] = set()
    for key, name in mapping.items():
        value = initializers[name]
        value = value.T if key in transposed else value
        if key not in transposed and not _fits(value.shape, tuple(state[key].shape)) and value.ndim == 2 \
                and _fits(value.T.shape, tuple(state[key].shape)):
            value = value.T
            transposed.append(key)
        if not _fits(value.shape, tuple(state[key].shape)):
            raise UsageError(f"distill: initializer {name} {list(value.shape)} cannot be parameter {key} "
                             f"{list(state[key].shape)} of the source model: the graph grew where pruning only cuts")
        if value.shape != tuple(state[key].shape):
            changed.add(key.rpartition(".")[0])
        _replace(student, key, torch.tensor(np.ascontiguousarray(value)).to(state[key].dtype))
    groups = _conv_groups(pruned)
    for module_name, module in student.named_modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and module.groups > 1:
            weight = mapping.get(f"{module_name}.weight" if module_name else "weight")
            if weight in groups:
                module.groups = groups[weight]
        if isinstance(module, _CHANNEL_LAYERS) and module_name in changed:  # keep repr() truthful
            w = module.weight
            if isinstance(module, nn.Linear):
                module.out_features, module.in_features = w.shape
            else:
                module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
    unmapped = [p for p, _ in student.named_parameters() if p not in mapping]
    return Student(student.eval(), teacher, mapping, transposed, [f"{c}+{b}" for c, b in pairs],
                   sorted(changed), unmapped)


def _leaf_outputs(module: nn.Module, names: list[str], feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        module.get_submodule(n).register_forward_hook(
            lambda _m, _i, out, n=n: captured.__setitem__(n, out) if isinstance(out, torch.Tensor) else None
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            module(**feeds)
    finally:
        for h in hooks:
            h.remove()
    return captured


def kept_channels(student: Student, feeds: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """{changed module: {"axis": a, "kept": teacher channel per student channel, "match": mean correlation}}
    for every changed module whose output lost channels; modules whose output kept its shape get
    ``kept: None`` (the whole output is compared)."""
    from scipy.optimize import linear_sum_assignment

    names = student.changed_modules
    s_out = _leaf_outputs(student.module, names, feeds)
    t_out = _leaf_outputs(student.teacher, names, feeds)
    found = {}
    for name in names:
        if name not in s_out or name not in t_out or s_out[name].ndim != t_out[name].ndim:
            continue
        s, t = s_out[name], t_out[name]
        differing = [a for a in range(s.ndim) if s.shape[a] != t.shape[a]]
        if not differing:
            found[name] = {"axis": None, "kept": None, "match": 1.0}
            continue
        if len(differing) != 1:
            continue
        axis = differing[0]
        s2 = s.movedim(axis, 0).reshape(s.shape[axis], -1).double()
        t2 = t.movedim(axis, 0).reshape(t.shape[axis], -1).double()
        s2 = (s2 - s2.mean(1, keepdim=True)) / (s2.std(1, keepdim=True) + 1e-12)
        t2 = (t2 - t2.mean(1, keepdim=True)) / (t2.std(1, keepdim=True) + 1e-12)
        corr = (s2 @ t2.T / s2.shape[1]).numpy()
        rows, cols = linear_sum_assignment(-corr)
        kept = cols[np.argsort(rows)]
        found[name] = {"axis": axis, "kept": kept.tolist(), "match": float(corr[rows, cols].mean())}
    return found
