"""Recovery by distillation: the pruned student trained against its teacher, in PyTorch.

``distill(source, student_onnx, output, config)``:

1. The teacher is SOURCE (an ``nn.Module``: ``file.py:callable`` or ``builtin:NAME``, or a Hugging Face
   folder: the transformers model; TorchScript, ``.pt2`` and Keras sources are refused for now); the
   student is the pruned (repaired) ONNX graph carried back onto a copy of it
   (onnxforge.converters.student) or, for a Hugging Face folder, whose export cannot be tied to its
   parameters by name, the graph itself run in torch (onnxforge.converters.graph_student); either is
   checked to reproduce that graph (parity before training).
2. Loss on the first output: KL(softmax(t/T) || softmax(s/T)) * T^2 for class scores, MSE or
   1 - cosine for embeddings (per token, real tokens only, for [N, S, D] outputs of inputs with an
   attention mask: padding is never trained on); plus alpha * cross-entropy when the data has labels, plus
   feature_weight * sum over cut layers of MSE(student, teacher's kept channels) / Var(teacher).
   BatchNorm layers the graph kept stay in eval mode (their statistics are the graph's).
3. Adam with a cosine schedule; the samples are shuffled with the seed, ``held_out`` of them never
   trained on. After every epoch the held-out distillation loss (continuous: a held-out accuracy on
   a hundred samples saturates after one epoch) decides the best weights, and the held-out metric
   (accuracy with labels, agreement with the teacher for class scores, cosine for embeddings) is
   reported; ``patience`` epochs without progress or the time budget stop training. The untrained
   student is epoch 0: training never returns something with a worse held-out loss.
4. The best student is exported (dynamo, as ``export`` does; a graph student writes its trained
   values into the pruned graph's initializers), checked against the trained PyTorch student (parity after),
   gated against the teacher on the eval data, and saved atomically:
   an interrupted run leaves no file.

A ``file.py`` teacher is the user's code, which may end or hang its process: all four steps then run
in a child process, as an export of such a source does (onnxforge.converters._isolation).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from onnxforge._atomic import check_output_path, paths_in
from onnxforge.converters._isolation import run_in_child
from onnxforge.converters.config import ExportConfig
from onnxforge.converters.distill_config import DistillConfig, DistillLoss, DistillResult
from onnxforge.converters.graph_student import GraphStudent
from onnxforge.converters.source import SourceKind, is_python_source, resolve_source, source_files
from onnxforge.converters.student import Student, build_student, kept_channels
from onnxforge.errors import QualityGateError, UsageError
from onnxforge.model_io import input_specs, load_model, output_specs, save_model
from onnxforge.parity import Tolerance, compare_outputs
from onnxforge.pipeline.calibration import SampleSet
from onnxforge.pipeline.data_spec import load_data
from onnxforge.pipeline.evaluate import Metric, QualityGate, score
from onnxforge.pipeline.progress import Progress, ignore, step
from onnxforge.pipeline.prune.activations import token_mask
from onnxforge.targets import CpuTarget

__all__ = ["NO_ONNX_BRIDGE", "DistillConfig", "DistillLoss", "DistillResult", "distill"]


NO_ONNX_BRIDGE = ("distill: the model is an .onnx file, and there is no maintained ONNX->PyTorch bridge to train it "
                  "(onnx2torch cannot load opset-18 exports and imports torchvision); the least-squares repair is kept")
_PARITY = Tolerance(atol=1e-4, rtol=1e-3)


def _teacher(source: str) -> tuple[torch.nn.Module, bool]:
    """(the teacher module, whether the student is the graph itself: a Hugging Face folder's export shares
    and renumbers initializers, so they cannot be tied to the module's parameters by name)."""
    text = str(source)
    if text.lower().endswith(".onnx"):
        raise UsageError(NO_ONNX_BRIDGE, hint="pass the framework source instead: file.py:callable or builtin:NAME")
    src = resolve_source(text)
    if src.kind is SourceKind.TRANSFORMERS:  # a Hugging Face folder: the transformers model, as export built it
        return src.model.eval(), True
    if src.kind is not SourceKind.TORCH:
        raise UsageError(f"distill: {text} is a {src.kind.value} model; distillation trains a PyTorch nn.Module",
                         hint="pass file.py:callable that builds the nn.Module")
    return src.model.eval(), False


def _first(value: Any) -> torch.Tensor:
    from onnxforge.converters.torch_export import _flatten_outputs

    outputs = _flatten_outputs(value)
    if not outputs:
        raise UsageError("distill: the model returns no tensor")
    return outputs[0]


def _tensors(batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def _run(module: torch.nn.Module, samples: SampleSet, batch: int) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([_first(module(**_tensors(b))).float().numpy() for b in samples.batches(batch)])


def _onnx_first_output(model: onnx.ModelProto | str, samples: SampleSet, batch: int) -> np.ndarray:
    from onnxforge.pipeline.evaluate import run_outputs

    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return run_outputs(CpuTarget().session(data), samples, batch)[0]


def _choose_loss(config: DistillConfig, teacher_out: np.ndarray, has_labels: bool) -> DistillLoss:
    if config.loss is not DistillLoss.AUTO:
        return config.loss
    if has_labels:
        return DistillLoss.KL
    if teacher_out.ndim == 2:
        norms = np.linalg.norm(teacher_out, axis=1)
        if np.allclose(norms, 1.0, atol=1e-3):
            return DistillLoss.COSINE  # unit-norm rows: an embedding
        if teacher_out.shape[1] > 1:
            return DistillLoss.KL
    return DistillLoss.MSE


def _held_out_metric(loss: DistillLoss, has_labels: bool) -> Metric:
    if loss is DistillLoss.KL:
        return Metric.ACCURACY if has_labels else Metric.AGREEMENT
    return Metric.COSINE


def _batch_mask(feeds: Mapping[str, np.ndarray | torch.Tensor]) -> torch.Tensor | None:
    """[N, S] bool, True at real tokens (the feeds' attention mask; see ``token_mask``), or None."""
    found = token_mask({k: np.asarray(v) for k, v in feeds.items()})
    return None if found is None else torch.from_numpy(found)


def _output_loss(kind: DistillLoss, s: torch.Tensor, t: torch.Tensor, temperature: float,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss per sample, averaged; per real token (rows of ``mask``) for [N, S, ...] outputs."""
    if mask is not None and s.dim() >= 3 and tuple(s.shape[:2]) == tuple(mask.shape):
        s, t = s[mask], t[mask]
    s, t = s.reshape(len(s), -1), t.reshape(len(t), -1)
    if kind is DistillLoss.KL:
        return F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1), log_target=True,
                        reduction="batchmean") * temperature**2
    if kind is DistillLoss.COSINE:
        return (1.0 - F.cosine_similarity(s, t, dim=1)).mean()
    return F.mse_loss(s, t)


class _Features:
    """Forward hooks on the cut layers of the student and the teacher; the feature loss of one batch."""

    def __init__(self, student: Student, kept: dict[str, dict[str, Any]]) -> None:
        self.kept = kept
        self.student: dict[str, torch.Tensor] = {}
        self.teacher: dict[str, torch.Tensor] = {}
        self.hooks = []
        for name in kept:
            for module, store in ((student.module, self.student), (student.teacher, self.teacher)):
                hook = module.get_submodule(name).register_forward_hook(
                    lambda _m, _i, out, n=name, d=store: d.__setitem__(n, out))
                self.hooks.append(hook)

    def loss(self) -> torch.Tensor:
        total = torch.zeros(())
        for name, info in self.kept.items():
            s, t = self.student.get(name), self.teacher.get(name)
            if s is None or t is None:
                continue
            if info["kept"] is not None:
                t = t.index_select(info["axis"], torch.as_tensor(info["kept"]))
            total = total + F.mse_loss(s, t) / (t.var() + 1e-8)
        return total / max(len(self.kept), 1)

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _mixed(feeds: dict[str, torch.Tensor], strength: float, rng: np.random.Generator):
    """Float inputs mixed with a shuffled copy of the batch: (feeds, (per-sample weight, partner index)).
    Integer inputs (token ids) cannot be mixed: the batch is returned as it is."""
    if not all(v.is_floating_point() for v in feeds.values()):
        return feeds, None
    n = len(next(iter(feeds.values())))
    lam = torch.from_numpy(rng.beta(strength, strength, n).astype(np.float32))
    partner = torch.from_numpy(rng.permutation(n))
    mixed = {k: lam.view(-1, *[1] * (v.ndim - 1)) * v + (1 - lam.view(-1, *[1] * (v.ndim - 1))) * v[partner]
             for k, v in feeds.items()}
    return mixed, (lam, partner)


def _freeze_batchnorm(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _evaluate(student: torch.nn.Module, samples: SampleSet, teacher_out: np.ndarray, metric: Metric,
              kind: DistillLoss, temperature: float, batch: int) -> tuple[float, float]:
    student.eval()
    out = _run(student, samples, batch)
    value = score(metric, [out], [teacher_out], samples.class_labels)
    with torch.no_grad():
        loss = float(_output_loss(kind, torch.from_numpy(out), torch.from_numpy(teacher_out), temperature,
                                  _batch_mask(samples.inputs)))
    return value, loss


def _export_student(
    student: torch.nn.Module, pruned: onnx.ModelProto, examples: dict[str, torch.Tensor]
) -> onnx.ModelProto:
    """The trained student exported like the pruned graph: the same dynamic dims, input and output names."""
    from onnxforge.converters.torch_export import export_torch

    specs = input_specs(pruned)
    dynamic_batch = all(s.shape and not isinstance(s.shape[0], int) for s in specs)
    axes = {s.name: {i: str(d) for i, d in enumerate(s.shape) if i > 0 and not isinstance(d, int)} for s in specs}
    config = ExportConfig(dynamic_batch=dynamic_batch, dynamic_axes={k: v for k, v in axes.items() if v})
    proto, _, _, _, _ = export_torch(student, config, examples)
    wanted = [o.name for o in output_specs(pruned)]
    got = [o.name for o in proto.graph.output]
    if len(wanted) == len(got):  # keep the pruned graph's output names for the stages after this one
        renames = {g: w for g, w in zip(got, wanted, strict=True) if g != w}
        for node in proto.graph.node:
            node.output[:] = [renames.get(n, n) for n in node.output]
            node.input[:] = [renames.get(n, n) for n in node.input]
        for output in proto.graph.output:
            output.name = renames.get(output.name, output.name)
    return proto


def distill(
    source: str | os.PathLike,
    student_onnx: str | os.PathLike,
    output: str | os.PathLike,
    config: DistillConfig,
    *,
    progress: Progress | None = None,
    in_process: bool = False,
) -> DistillResult:
    """Train the pruned ``student_onnx`` against ``source`` and save the trained student at ``output``.

    See the module docstring for what is measured. Raises UsageError (exit 2) for a source that is
    not a PyTorch module (an .onnx file: no bridge back to PyTorch) or a graph that cannot be mapped
    onto it; QualityGateError (exit 4) when the eval gate fails, with the trained model saved.

    A ``file.py:callable`` teacher is the user's code: the whole distillation then runs in a child
    process (see ``_isolation``) given ``config.timeout_s`` seconds, its progress passed on; the
    code exiting, hanging or being killed is a ModelSourceError (exit 2). ``in_process=True`` runs
    it here instead.
    """
    out = check_output_path(output, student_onnx, *source_files(str(source)), *paths_in(config))
    if is_python_source(source) and not in_process:
        return run_in_child("onnxforge.converters.distill:distill", (str(source), str(student_onnx)),
                            {"config": config, "in_process": True}, out=out, source=source, task="distillation",
                            timeout=config.timeout_s, timeout_option="--timeout (a recipe's distill stage: timeout_s)",
                            progress=progress)
    say = progress or ignore
    teacher_module, graph_student = _teacher(str(source))
    data = config.require_data()
    pruned = load_model(student_onnx)
    specs = input_specs(pruned)
    samples = load_data(data, specs, min_samples=4)
    if samples.is_ragged:
        raise UsageError(f"distill: {data} holds inputs of different shapes; distillation needs equal-shape samples")
    torch.manual_seed(config.seed)
    order = np.random.default_rng(config.seed).permutation(len(samples))
    train, held = samples.take(order).split(config.held_out)
    first_batch = _tensors(train.take(slice(0, 2)).inputs)

    step(say, "mapping the pruned graph onto the source model")
    if graph_student:
        student = Student(GraphStudent(pruned), teacher_module, {})
    else:
        student = build_student(
            teacher_module, pruned, first_batch, export_teacher=lambda: _teacher_export(teacher_module, first_batch)
        )
    batch = max(1, min(config.batch_size, 256))
    probe = held.take(slice(0, min(len(held), 64)))
    try:
        before = _run(student.module, probe, batch)
    except Exception as e:  # a shape the mapping got wrong: the student cannot even run
        raise UsageError(
            f"distill: the student built from {source} cannot run the pruned graph's inputs "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})"
        ) from e
    parity = compare_outputs(["output"], [_onnx_first_output(pruned, probe, batch)], [before], _PARITY, len(probe))
    if not parity.ok:
        raise UsageError(
            f"distill: the student built from {source} does not reproduce {Path(student_onnx).name} "
            f"({parity.summary()}): the graph's plan cannot be carried back onto this module",
            hint="prune a dynamo export of this same source, without stages that rewrite weights before it",
        )
    parity_before = {"max_abs_error": parity.max_abs, "ok": True, "samples": len(probe)}

    teacher = student.teacher
    teacher_train, teacher_held = _run(teacher, train, batch), _run(teacher, held, batch)
    has_labels = samples.class_labels is not None
    kind = _choose_loss(config, teacher_train, has_labels)
    metric = _held_out_metric(kind, has_labels)
    use_labels = has_labels and kind is DistillLoss.KL and config.alpha > 0
    kept = kept_channels(student, _tensors(train.take(slice(0, min(len(train), 64))).inputs)) \
        if config.feature_weight > 0 and not graph_student else {}  # a graph student has no named layers
    features = _Features(student, kept) if kept else None

    module = student.module
    best_state = copy.deepcopy(module.state_dict())
    held_before, held_loss = _evaluate(module, held, teacher_held, metric, kind, config.temperature, batch)
    best_loss, best_value = held_loss, held_before
    history = [{"epoch": 0, "loss": None, "held_out": held_before, "held_out_loss": held_loss, "seconds": 0.0}]
    step(say, "epoch", 0, config.epochs, f"held-out {metric.value} {held_before:.4f}")
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=config.learning_rate)
    steps = max(1, config.epochs * math.ceil(len(train) / batch))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    generator = np.random.default_rng(config.seed + 1)
    labels = None if train.class_labels is None else torch.from_numpy(train.class_labels.astype(np.int64))
    started = time.perf_counter()
    best_epoch, stale, stopped, epoch = 0, 0, "epochs", 0
    try:
        for epoch in range(1, config.epochs + 1):
            module.train()
            _freeze_batchnorm(module)
            total, count = 0.0, 0
            perm = generator.permutation(len(train))
            for start in range(0, len(train), batch):
                index = perm[start : start + batch]
                if len(index) < 2 and len(train) > 1:
                    continue  # a batch of one gives no useful step (and breaks batch statistics)
                feeds = _tensors({k: v[index] for k, v in train.inputs.items()})
                mix = None
                if config.mixup > 0:
                    feeds, mix = _mixed(feeds, config.mixup, generator)
                if features is not None or mix is not None:
                    with torch.no_grad():
                        t = _first(teacher(**feeds)).float()
                else:
                    t = torch.from_numpy(teacher_train[index])
                s = _first(module(**feeds))
                loss = _output_loss(kind, s, t, config.temperature, _batch_mask(feeds))
                if use_labels:
                    assert labels is not None  # use_labels: the samples carry labels
                    logits = s.reshape(len(s), -1)
                    ce = F.cross_entropy(logits, labels[index], reduction="none")
                    if mix is not None:
                        lam, partner = mix
                        ce = lam * ce + (1 - lam) * F.cross_entropy(logits, labels[index][partner], reduction="none")
                    loss = (1 - config.alpha) * loss + config.alpha * ce.mean()
                if features is not None:
                    loss = loss + config.feature_weight * features.loss()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total, count = total + float(loss.detach()) * len(index), count + len(index)
                if config.time_budget_s is not None and time.perf_counter() - started > config.time_budget_s:
                    stopped = "time budget"
                    break
            value, held_loss = _evaluate(module, held, teacher_held, metric, kind, config.temperature, batch)
            history.append(  # seconds: training time so far, at this epoch's end (the report's curve axis)
                {"epoch": epoch, "loss": total / max(count, 1), "held_out": value, "held_out_loss": held_loss,
                 "seconds": round(time.perf_counter() - started, 3)}
            )
            step(say, "epoch", epoch, config.epochs, f"loss {total / max(count, 1):.4f}, held-out {metric.value} "
                 f"{value:.4f}, held-out loss {held_loss:.4f} (best {best_loss:.4f})")
            if held_loss < best_loss:
                best_loss, best_value, best_epoch, stale = held_loss, value, epoch, 0
                best_state = copy.deepcopy(module.state_dict())
            else:
                stale += 1
            if stopped == "time budget":
                break
            if stale >= config.patience:
                stopped = "patience"
                break
    finally:
        if features is not None:
            features.close()
    train_seconds = time.perf_counter() - started
    module.load_state_dict(best_state)
    module.eval()

    step(say, "exporting the trained student")
    if isinstance(module, GraphStudent):
        proto = module.trained_graph()
    else:
        proto = _export_student(module, pruned, _tensors(train.take(slice(0, 2)).inputs))
    exported = _onnx_first_output(proto, probe, batch)
    after = compare_outputs(["output"], [_run(module, probe, batch)], [exported], _PARITY, len(probe))
    result = DistillResult(
        path=out, loss=kind.value, held_out_metric=metric.value, epochs_run=epoch if config.epochs else 0,
        best_epoch=best_epoch, stopped=stopped, train_seconds=train_seconds, train_samples=len(train),
        held_out_samples=len(held), history=history, held_out_before=held_before, held_out_after=best_value,
        parity_before=parity_before,
        parity_after={"max_abs_error": after.max_abs, "ok": after.ok, "samples": len(probe)},
        mapping={**student.describe(), "feature_layers": {k: v["match"] for k, v in kept.items()}},
    )
    if not after.ok:
        result.notes.append(f"the exported student differs from the trained PyTorch one: {after.summary()}")
    gate_error = _gate(config, result, teacher, pruned, proto, specs)
    save_model(proto, out)
    if gate_error is not None:
        raise gate_error
    return result


def _teacher_export(teacher: torch.nn.Module, examples: dict[str, torch.Tensor]) -> onnx.ModelProto:
    """The teacher's own dynamo export, to identify initializers not named after parameters."""
    from onnxforge.converters.torch_export import export_torch

    proto, _, _, _, _ = export_torch(teacher, ExportConfig(dynamic_batch=True), examples)
    return proto


def _gate(config: DistillConfig, result: DistillResult, teacher: torch.nn.Module, pruned: onnx.ModelProto,
          proto: onnx.ModelProto, specs) -> QualityGateError | None:
    """Teacher, repair-only and distilled scores on the eval data; the error to raise when the gate fails."""
    if config.eval_data is None:
        return None
    samples = load_data(config.eval_data, specs)
    reference = _run(teacher, samples, 64)
    gate = QualityGate.resolve(config.metric, config.tolerance, samples.class_labels is not None, reference.shape)
    scores = {
        "teacher": score(gate.metric, [reference], [reference], samples.class_labels),
        "repair_only": score(gate.metric, [_onnx_first_output(pruned, samples, 64)], [reference], samples.class_labels),
        "distilled": score(gate.metric, [_onnx_first_output(proto, samples, 64)], [reference], samples.class_labels),
    }
    result.scores, result.gate = scores, gate.describe()
    if gate.passes(scores["distilled"], scores["teacher"]):
        return None
    return QualityGateError(
        f"distill: the distilled student scores {gate.format(scores['distilled'])} against the teacher's "
        f"{gate.format(scores['teacher'])} ({gate.describe()}); it is saved at {result.path}",
        hint="more calibration samples, more epochs, or a lower pruning ratio", best_path=str(result.path))
