"""Checking a merged graph against the steps it was built from, and measuring it on evaluation data.

Parity: on the same raw inputs, the merged graph (one onnxruntime session) against the separate
steps — the pre-processing in numpy (the tokenizer alone in onnxruntime), each network in its own
onnxruntime session, the ensemble's combination and the post-processing in numpy — output by output
with the numpy allclose rule of ``onnxforge.parity``.

Accuracy (with labels): the evaluation data is stored as the network's input (floats for images);
the merged graph receives it turned back into raw integers (``raw_from``), the network and each
member receive it as stored. Top-1 labels come from what each graph outputs (``label``, ``labels``,
or the argmax of class scores).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from onnxforge._ort_logs import session_options
from onnxforge.model_io import TensorSpec, input_specs
from onnxforge.parity import ParityReport, compare_outputs
from onnxforge.pipeline.calibration import SampleSet, model_batch_size
from onnxforge.pipeline.data_spec import DataSpec, load_data
from onnxforge.pipeline.evaluate import run_outputs
from onnxforge.pipeline.merge.build import Composition
from onnxforge.pipeline.merge.config import MergeConfig
from onnxforge.pipeline.merge.ensemble import EnsembleMode, combine_reference
from onnxforge.pipeline.merge.postprocess import PostKind, PostPlan
from onnxforge.pipeline.merge.tokenizer import extensions_library
from onnxforge.targets.feeds import generate_feeds

__all__ = ["check_parity", "measure_accuracy", "session"]

_EVAL_PARITY_SAMPLES = 32
_BATCH = 64


def session(model: Any, *, extensions: bool = False) -> ort.InferenceSession:
    """A CPU session for a ModelProto, bytes or path; with the onnxruntime-extensions ops when asked."""
    from onnxforge.targets.cpu import CpuTarget

    if not extensions:
        return CpuTarget().session(model.SerializeToString() if hasattr(model, "SerializeToString") else model)
    options = session_options()
    options.register_custom_ops_library(extensions_library())
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class _Steps:
    """The merged graph's steps run one by one: pre (numpy), networks (onnxruntime), combine and post (numpy)."""

    def __init__(self, composition: Composition) -> None:
        self.c = composition
        self.members = [session(m) for _, m in composition.members]

    def network_feeds(self, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        pre = self.c.pre
        feeds = {k: v for k, v in raw.items() if pre is None or k not in {s.name for s in pre.inputs}}
        if pre is not None:
            feeds.update(pre.reference(raw))
        return feeds

    def network(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        outs = [s.run(None, dict(feeds)) for s in self.members]
        return outs[0] if self.c.ensemble is None else combine_reference(self.c.ensemble, outs)

    def run(self, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by the merged graph's output names."""
        feeds = self.network_feeds(raw)
        by_name = dict(zip(self.c.network_outputs, self.network(feeds), strict=False))
        post = self.c.post
        if post is None:
            return by_name
        x = by_name.pop(post.network_output.name)
        mask = feeds[post.mask.name] if post.mask is not None else None
        for name, value in zip(post.outputs, post.reference(x, mask), strict=False):
            by_name[self.c.renamed.get(name, name)] = value
        return by_name


def _generated(specs: Sequence[TensorSpec], batch: int, seed: int) -> dict[str, np.ndarray]:
    """Random feeds; a dynamic dim is ``batch`` on axis 0 and 8 elsewhere (e.g. 8 tokens). Integer
    inputs get 0/1 (masks: 1), which every id table has: token ids, token type ids, class indices."""
    shapes = {s.name: tuple(d if isinstance(d, int) else (batch if i == 0 else 8) for i, d in enumerate(s.shape))
              for s in specs}
    feeds = generate_feeds(specs, batch=batch, overrides=shapes, seed=seed)
    rng = np.random.default_rng(seed)
    for spec in specs:
        if spec.dtype.kind in "iu" and "mask" not in spec.name.lower():
            feeds[spec.name] = rng.integers(0, 2, size=shapes[spec.name]).astype(spec.dtype)
    return feeds


def _raw_examples(c: Composition, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """Random raw inputs: the pre block's examples, plus generated feeds for network inputs it does not feed."""
    specs = input_specs(c.model)
    if c.pre is None:
        return [_generated(specs, 2, 0)]
    own = {s.name for s in c.pre.inputs}
    examples = []
    for feeds in c.pre.examples(rng):
        rest = [s for s in specs if s.name not in own]
        if rest:
            first = next(iter(feeds.values()))
            batch = 1 if _single_input(c) or first.ndim < 2 else first.shape[0]
            feeds = {**feeds, **_generated(rest, batch, 1)}
        examples.append(feeds)
    return examples


def _eval_raw(
    c: Composition, eval_data: DataSpec, limit: int | None
) -> tuple[SampleSet, dict[str, np.ndarray] | None, str]:
    """The evaluation samples (as the network takes them) and the merged graph's raw inputs for them
    (None with the reason when they cannot be made)."""
    samples = load_data(eval_data, input_specs(c.members[0][1]))
    if limit is not None:
        samples = samples.take(slice(0, min(limit, len(samples))))
    if samples.is_ragged:
        return samples, None, "variable-length samples"
    if c.pre is None:
        return samples, dict(samples.inputs), ""
    raw = c.pre.raw_from(samples.inputs)
    if raw is None:
        why = "a resize sits between its input and the model" if hasattr(c.pre, "resize_to") else "its input is text"
        return samples, None, why
    own = {s.name for s in c.pre.inputs}
    raw.update({k: v for k, v in samples.inputs.items() if k not in set(c.pre.fed) and k not in own})
    return samples, raw, ""


def _single_input(c: Composition) -> bool:
    return getattr(getattr(c.pre, "pre", None), "batched", True) is False


def _run_merged(c: Composition, merged: ort.InferenceSession, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The merged graph over raw samples (first axis = samples): in batches, or one by one for a
    single-image input."""
    names = [o.name for o in merged.get_outputs()]
    n = len(next(iter(raw.values())))
    if _single_input(c) or c.uses_extensions:  # each run gives a batch of one
        rows = [merged.run(None, {k: v[i] for k, v in raw.items()}) for i in range(n)]
        return {name: np.concatenate([r[j] for r in rows]) for j, name in enumerate(names)}
    specs = {s.name: s for s in input_specs(c.model)}
    batch = model_batch_size(list(specs.values()), preferred=_BATCH)
    samples = SampleSet({k: np.asarray(v) for k, v in raw.items()}, None, "eval")
    return dict(zip(names, run_outputs(merged, samples, batch), strict=False))


def check_parity(c: Composition, config: MergeConfig) -> tuple[ParityReport, list[str]]:
    """Merged graph vs the separate steps on random raw inputs (and evaluation samples, when given)."""
    rng = np.random.default_rng(0)
    steps = _Steps(c)
    merged = session(c.model, extensions=c.uses_extensions)
    names = [o.name for o in merged.get_outputs()]
    report: ParityReport | None = None
    described = []
    cases = [("random", feeds) for feeds in _raw_examples(c, rng)]
    if config.eval_data is not None:
        _, raw, _ = _eval_raw(c, config.eval_data, _EVAL_PARITY_SAMPLES)
        if raw is not None and not _single_input(c):
            cases.append(("eval", raw))
    for kind, raw in cases:
        expected = steps.run(raw)
        got = dict(zip(names, merged.run(None, dict(raw)), strict=False))
        part = compare_outputs(names, [expected[n] for n in names], [got[n] for n in names], config.tolerance,
                               batch_size=int(next(iter(raw.values())).shape[0]) if not _single_input(c) else 1)
        report = part if report is None else report.merged(part)
        shapes = ", ".join(f"{k} {v.dtype}[{'x'.join(map(str, v.shape))}]" for k, v in raw.items())
        described.append(f"{kind}: {shapes}")
    return report or ParityReport([], config.tolerance), described


def _labels_from(c: Composition, outputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
    if c.post is not None:
        by_original = {name: outputs[c.renamed.get(name, name)] for name in c.post.outputs}
        return PostPlan.labels(c.post.kind, {**outputs, **by_original}, next(iter(outputs)))
    if c.ensemble is EnsembleMode.VOTE:
        return np.asarray(outputs["label"])
    return PostPlan.labels(PostKind.NONE, outputs, next(iter(outputs)))


def _accuracy_of_scores(outputs: Sequence[np.ndarray], labels: np.ndarray) -> float | None:
    scores = outputs[0]
    if scores.dtype == object or scores.ndim != 2 or scores.shape[1] < 2:
        return None
    return float((scores.argmax(1) == labels).mean())


def measure_accuracy(c: Composition, config: MergeConfig, notes: list[str]) -> dict[str, Any] | None:
    """Top-1 accuracy on ``config.eval_data`` of the merged graph, the network / each ensemble member."""
    if config.eval_data is None:  # build.merge measures only with eval data
        return None
    eval_data = config.eval_data
    samples, raw, why = _eval_raw(c, eval_data, None)
    if samples.class_labels is None:
        notes.append(f"{config.eval_data} has no 'label' array of class ids: accuracy not measured")
        return None
    labels = samples.class_labels
    members = {}
    specs = input_specs(c.members[0][1])
    for name, model in c.members:
        outputs = run_outputs(session(model), samples, model_batch_size(specs, preferred=_BATCH))
        members[name] = _accuracy_of_scores(outputs, labels)
    result: dict[str, Any] = {"samples": len(samples)}
    if c.ensemble is None:
        result["network"] = members[next(iter(members))]
    else:
        result["members"] = members
    merged_accuracy = None
    if raw is None:
        notes.append(f"the merged graph is not measured on {eval_data.path.name}: {why}")
    else:
        predicted = _labels_from(c, _run_merged(c, session(c.model, extensions=c.uses_extensions), raw))
        if predicted is None:
            notes.append("the merged graph gives no class label: accuracy not measured")
        else:
            merged_accuracy = float((np.asarray(predicted).reshape(len(labels)) == labels).mean())
    result["merged"] = merged_accuracy
    return result
