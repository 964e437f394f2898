"""The measurement service: a reference model on evaluation data on a target, against which every
candidate is scored, timed and gated — by the runner's table, the search's trials, the prune stages'
checks and quantize's candidates alike.

- **Quality.** The reference's outputs on the samples are computed once (lazily; once per process
  for the same model and data: ``evaluations``), its own score from them; a candidate's score is the
  metric of its outputs against those outputs (and labels) through ``evaluate.score``, and the gate
  (``evaluate.QualityGate``) states its tolerance in the metric's unit (``describe_tolerance``).
  ``verdict`` judges a candidate by every rule of the gate (``gate_rules.judge``: the worst sample,
  churn, the accuracy drop's interval, per-position agreement), from the same outputs as its score;
  ``passes(value, candidate)`` is that verdict. A user metric (``file.py:function``) is scored in a
  child process (``user_metric``) on every output by name.
- **Where time goes.** ``op_time`` profiles one model per op type (a few runs, cached), for the run
  report's before/after chart.
- **Latency.** ``time_against`` times every candidate interleaved with the reference in one
  ``compare_latency`` call, every session built with ``interleaved=True`` (no spinning thread pools),
  and reports each against the reference's own timing in that same call: one baseline, one ratio.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnxforge.model_io import TensorSpec
from onnxforge.pipeline import codec
from onnxforge.pipeline.calibration import SampleSet, StreamedSamples, model_batch_size
from onnxforge.pipeline.data_spec import DataSpec, as_data_spec, load_data
from onnxforge.pipeline.evaluate import Metric, QualityGate, run_outputs, score
from onnxforge.pipeline.evaluations import (
    cached_outputs,
    cached_score,
    file_fingerprint,
    model_fingerprint,
    samples_fingerprint,
)
from onnxforge.pipeline.gate_rules import GateVerdict, are_ids, is_class_sequence, judge
from onnxforge.pipeline.output_heads import is_linear_head
from onnxforge.pipeline.progress import Progress, ignore, step
from onnxforge.pipeline.user_metric import UserMetric
from onnxforge.targets import get_target
from onnxforge.targets.base import Target
from onnxforge.targets.session_settings import SessionSettings

if TYPE_CHECKING:
    from onnxforge.pipeline.cache import StageCache
    from onnxforge.pipeline.op_time import OpTime
from onnxforge.targets.latency import LatencyStats, compare_latency

__all__ = ["ModelRef", "Reference", "Timing"]

ModelRef = str | os.PathLike | bytes | onnx.ModelProto
Feeds = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Timing(codec.JsonResult):
    """A candidate's latency and the reference's, from the same interleaved run; its JSON is the two p50s
    and their ratio."""

    stats: LatencyStats = field(metadata={"json": False})
    reference: LatencyStats = field(metadata={"json": False})

    @property
    def ratio(self) -> float:
        """The candidate's p50 over the reference's: < 1 is faster."""
        return self.stats.p50_ms / self.reference.p50_ms

    @property
    def speedup(self) -> float:
        """The reference's p50 over the candidate's: > 1 is faster."""
        return self.reference.p50_ms / self.stats.p50_ms

    def json_extra(self) -> dict[str, Any]:
        return {"reference_ms": self.reference.p50_ms, "model_ms": self.stats.p50_ms, "ratio": self.ratio}


class Reference:
    """``model`` (a path, bytes or a ModelProto) measured on ``data`` on ``target``.

    ``data``: a path or DataSpec of evaluation data (its first ``limit`` samples), samples already
    in memory (a SampleSet: held-out calibration samples), or None (nothing to score on: ``measured``
    is False and only timing works, on generated feeds of ``input_shapes``). ``metric`` and
    ``tolerance`` resolve the gate on the reference's outputs (``Metric.AUTO``: accuracy with
    labels, agreement for class scores, else cosine; a UserMetric: the user's file.py:function);
    ``max_churn``, ``worst_cosine`` and ``sequence_churn`` set the gate's other rules (``gate_rules``).
    Scoring sessions use ``threads`` and
    ``low_memory``, and batches of ``eval_batch`` (the model's fixed batch wins). ``specs``: the
    model's inputs when the caller has them (the model is then not loaded to read them).
    """

    def __init__(
        self,
        model: ModelRef,
        data: SampleSet | StreamedSamples | str | os.PathLike | object | None,
        target: Target | str = "cpu",
        *,
        metric: Metric | UserMetric = Metric.AUTO,
        tolerance: float | None = None,
        max_churn: float | None = None,
        worst_cosine: float | None = None,
        sequence_churn: float | None = None,
        limit: int | None = None,
        eval_batch: int = 32,
        threads: int | None = None,
        low_memory: bool = False,
        input_shapes: Mapping[str, tuple[int, ...]] | None = None,
        specs: Sequence[TensorSpec] | None = None,
    ) -> None:
        self.model = model
        self.target = get_target(target)
        self.metric = metric
        self.tolerance = tolerance
        self.max_churn = max_churn
        self.worst_cosine = worst_cosine
        self.sequence_churn = sequence_churn
        self.limit = limit
        self.threads = threads
        self.low_memory = low_memory
        self.input_shapes = dict(input_shapes or {})
        self._specs = list(specs) if specs is not None else None
        self._data = data.materialize() if isinstance(data, StreamedSamples) else data
        self._eval_batch = eval_batch
        self._proto: onnx.ModelProto | None = model if isinstance(model, onnx.ModelProto) else None
        self._fingerprint: str | None = None
        self._samples: SampleSet | None = self._data if isinstance(self._data, SampleSet) else None
        self._outputs: list[np.ndarray] | None = None
        self._gate: QualityGate | None = None
        self._value: float | None = None

    # ------------------------------------------------------------------------------------------
    # What is measured on

    @property
    def measured(self) -> bool:
        """Whether there is data to score on."""
        return self._data is not None

    @property
    def specs(self) -> list[TensorSpec]:
        """The model's run-time inputs (given, or read from the model once)."""
        if self._specs is None:
            from onnxforge.model_io import input_specs

            self._specs = input_specs(self.proto)
        return self._specs

    @property
    def proto(self) -> onnx.ModelProto:
        if self._proto is None:
            from onnxforge.model_io import load_model

            self._proto = (onnx.load_from_string(self.model) if isinstance(self.model, bytes)
                           else load_model(self.model))
        return self._proto

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    @property
    def samples(self) -> SampleSet:
        """The evaluation samples (loaded on first use)."""
        if self._samples is None:
            if self._data is None:
                raise ValueError("this reference has no data to score on")
            # the one data path (open_data): image folders with their preprocessing, and folders whose files
            # differ in a dynamic dim (sentences of different lengths) as a ragged set, as quantize reads them
            spec = self._data if isinstance(self._data, DataSpec) else as_data_spec(_data_path(self._data))
            self._samples = load_data(spec, self.specs, limit=self.limit, allow_ragged=True)
        return self._samples

    def head(self, count: int) -> Reference:
        """This reference on its first ``count`` samples (a coarse score): the samples and the outputs it
        has are sliced, never read or run again."""
        samples = self.samples.take(slice(0, count))
        part = Reference(self.model, samples, self.target, metric=self.metric, tolerance=self.tolerance,
                         max_churn=self.max_churn, worst_cosine=self.worst_cosine,
                         sequence_churn=self.sequence_churn, eval_batch=self._eval_batch,
                         threads=self.threads, low_memory=self.low_memory,
                         input_shapes=self.input_shapes, specs=self.specs)
        part._fingerprint = self.fingerprint
        part._outputs = [output[:count] for output in self.outputs]
        return part

    @property
    def eval_batch(self) -> int:
        return model_batch_size(self.specs, preferred=self._eval_batch)

    def data_fingerprint(self) -> str:
        """What the samples are, for the evaluation cache: the file's hash (once per process) and the
        data options, or the hash of samples in memory."""
        if isinstance(self._data, SampleSet):
            return "samples:" + samples_fingerprint(self._data)
        path = _data_path(self._data)
        options = "" if isinstance(self._data, (str, os.PathLike)) else repr(self._data)
        return f"file:{file_fingerprint(path)}:{options}"

    def _key(self) -> tuple:
        return (self.data_fingerprint(), self.limit, self.target.name)

    # ------------------------------------------------------------------------------------------
    # Quality

    @property
    def outputs(self) -> list[np.ndarray]:
        """The reference model's outputs on the samples; the same model on the same data runs once per process."""
        if self._outputs is None:
            self._outputs = self._outputs_of(self.model, self.fingerprint)
        return self._outputs

    def _outputs_of(self, model: ModelRef, fingerprint: str) -> list[np.ndarray]:
        def run() -> list[np.ndarray]:
            session = self.target.session(_runnable(model), threads=self.threads, low_memory=self.low_memory)
            return run_outputs(session, self.samples, self.eval_batch)

        return cached_outputs((fingerprint, *self._key()), run)

    @property
    def gate(self) -> QualityGate:
        """The metric (resolved on the reference's outputs), its tolerance and the gate's other rules."""
        if self._gate is None:
            first = self.outputs[0]  # ragged (an object array of per-sample outputs) for variable-length inputs
            shape = (len(first), *first[0].shape) if first.dtype == object else tuple(first.shape)
            self._gate = QualityGate.resolve(self.metric, self.tolerance, self.samples.class_ids is not None, shape,
                                             max_churn=self.max_churn, worst_cosine=self.worst_cosine,
                                             sequence_churn=self.sequence_churn, ids=are_ids(first),
                                             sequence=is_class_sequence(first, linear_head=self._linear_head()))
        return self._gate

    def _linear_head(self) -> bool:
        """Whether the first output is a linear layer's scores (raw CTC scores are judged as classes)."""
        return bool(self.proto.graph.output) and is_linear_head(self.proto, self.proto.graph.output[0].name)

    @property
    def output_names(self) -> list[str]:
        """The reference model's output names, in order (a user metric gets its outputs by name)."""
        return [o.name for o in self.proto.graph.output]

    def _metric_of(self, outputs: list[np.ndarray]) -> float:
        gate = self.gate
        if gate.user is not None:
            names = self.output_names
            return gate.user.score(dict(zip(names, outputs, strict=False)), self.samples.labels,
                                   dict(zip(names, self.outputs, strict=False)))
        return score(gate.metric, outputs, self.outputs, self.samples.class_ids)

    @property
    def value(self) -> float:
        """The reference's own score (1.0 for agreement and cosine, its accuracy with labels, the user
        metric of its own outputs)."""
        if self._value is None:
            self._value = self._metric_of(self.outputs)
        return self._value

    def score(self, candidate: ModelRef) -> float:
        """The gate's metric of ``candidate``'s outputs against the reference's (and the labels);
        the same candidate on the same data is scored once per process."""
        return self.verdict(candidate).value

    def verdict(self, candidate: ModelRef) -> GateVerdict:
        """``candidate`` judged by every rule of the gate (gate_rules.judge), with its score; the same
        candidate on the same data is judged once per process."""
        fingerprint = model_fingerprint(candidate)
        if fingerprint == self.fingerprint:
            return GateVerdict(self.value, True, ("the input model itself",))
        gate = self.gate

        def compute() -> GateVerdict:
            # a candidate's outputs are not kept: a search scores hundreds of them
            session = self.target.session(_runnable(candidate), threads=self.threads, low_memory=self.low_memory)
            outputs = run_outputs(session, self.samples, self.eval_batch)
            if gate.metric is Metric.ACCURACY:  # the churn beside it, from these same outputs (agreement)
                cached_score(self._agreement_key(fingerprint),
                             lambda: score(Metric.AGREEMENT, outputs, self.outputs, None))
            value = self._metric_of(outputs)
            return judge(gate, outputs, self.outputs, self.samples.class_ids, value, self.value)

        return cached_score((fingerprint, self.fingerprint, *self._key(), gate, self._user_key()), compute)

    def _user_key(self) -> str | None:
        user = self.gate.user
        return file_fingerprint(user.path) if user is not None and user.path.is_file() else None

    def _agreement_key(self, fingerprint: str) -> tuple:
        return (fingerprint, self.fingerprint, *self._key(), Metric.AGREEMENT.value)

    def agreement(self, candidate: ModelRef) -> float:
        """Top-1 agreement of ``candidate``'s predictions with the reference's (1 - churn). A candidate
        scored under accuracy already has it (score() computes it from the same outputs)."""
        fingerprint = model_fingerprint(candidate)
        if fingerprint == self.fingerprint:
            return 1.0

        def compute() -> float:
            session = self.target.session(_runnable(candidate), threads=self.threads, low_memory=self.low_memory)
            return score(Metric.AGREEMENT, run_outputs(session, self.samples, self.eval_batch), self.outputs, None)

        return cached_score(self._agreement_key(fingerprint), compute)

    def passes(self, value: float | None, candidate: ModelRef | None = None) -> bool:
        """Whether ``candidate`` passes every rule of the gate (its verdict); without a candidate, whether
        ``value`` is within the gate's tolerance of the reference (the main rule alone). Always, without
        data; never for a missing value when there is data."""
        if not self.measured:
            return True
        if value is None:
            return False
        if candidate is not None:
            return self.verdict(candidate).passed
        return self.gate.passes(value, self.value)

    # ------------------------------------------------------------------------------------------
    # Latency

    def feeds(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Timing feeds: the first samples at the model's batch (its fixed one, else ``batch``), or
        generated inputs of ``input_shapes`` without data."""
        size = model_batch_size(self.specs, preferred=batch)
        if self._data is not None:
            return self.samples.first_batch(size)
        from onnxforge.targets.feeds import generate_feeds

        # given the model, generated ids stay inside the embedding tables they index
        return generate_feeds(self.specs, batch=size, overrides=self.input_shapes, model=self.proto)

    def time_against(
        self,
        candidates: Mapping[str, ModelRef],
        *,
        rounds: int = 30,
        batch: int = 1,
        threads: int | None = None,
        warmup: int = 5,
        seconds: float | None = None,
        feeds: Feeds | None = None,
        own_feeds: Mapping[str, Feeds] | None = None,
        reference_name: str | None = None,
        drop_slower_than: float | None = None,
        rivals: Sequence[str] = (),
        progress: Progress = ignore,
        phase: str = "timing",
        settings: Mapping[str, SessionSettings] | None = None,
    ) -> dict[str, Timing]:
        """Time ``candidates`` (name -> model) interleaved with the reference in one ``compare_latency``
        call, each against the reference's p50 in that same call.

        ``feeds``: what every model is fed (default: ``self.feeds(batch)``); ``own_feeds``: per
        candidate, for a graph that takes other inputs. With ``seconds``, the number of rounds is
        what fits about that long (at least 3, at most ``rounds``). With ``reference_name`` the
        reference's own timing is in the answer too, under that name (ratio 1). ``drop_slower_than``:
        a candidate clearly slower than the fastest of the reference and ``rivals`` stops being timed
        (compare_latency); its timing is from the rounds it ran.
        ``progress`` hears ``phase`` round i/N. ``settings``: session options per candidate (or for the
        reference, under ``reference_name``): how session tuning times one model under several settings
        (``session_tuning``).
        """
        feeds = dict(feeds) if feeds is not None else self.feeds(batch)
        own_feeds = dict(own_feeds or {})
        name = reference_name if reference_name is not None else _reference_name(candidates)
        if name in candidates:
            raise ValueError(f"{name!r} names both the reference and a candidate")
        settings = dict(settings or {})
        sessions = {name: self.target.session(_runnable(self.model), threads=threads, interleaved=True,
                                              settings=settings.get(name))}
        for label, model in candidates.items():
            sessions[label] = self.target.session(_runnable(model), threads=threads, interleaved=True,
                                                  settings=settings.get(label))
        per_session = {label: own_feeds.get(label, feeds) for label in sessions}
        if seconds is not None:
            start = time.perf_counter()
            for label, session in sessions.items():
                session.run(None, dict(per_session[label]))
            one_round = max(time.perf_counter() - start, 1e-6) * 3  # compare_latency's runs_per_round
            rounds = int(min(rounds, max(3, seconds / one_round)))
        stats = compare_latency(sessions, per_session, warmup=warmup, rounds=rounds,
                                drop_slower_than=drop_slower_than, rivals=[name, *rivals],
                                on_round=lambda done, total: step(progress, phase, done, total))
        timings = {label: Timing(stats[label], stats[name]) for label in candidates}
        if reference_name is not None:
            timings[reference_name] = Timing(stats[name], stats[name])
        return timings


    def op_time(self, model: str | os.PathLike, *, feeds: Feeds | None = None, cache: StageCache | None = None
                ) -> OpTime:
        """Where ``model``'s time goes per op type on the reference's target (onnxruntime's profiler,
        batch 1, 1 thread) fed ``feeds`` (default: the timing feeds ``self.feeds(1)``); ``cache`` keeps
        and serves the profile (``pipeline/op_time.py``)."""
        from onnxforge.pipeline.op_time import op_time

        return op_time(Path(model), dict(feeds) if feeds is not None else self.feeds(1), self.target, cache)


def _reference_name(candidates: Mapping[str, object]) -> str:
    name = "__reference__"
    while name in candidates:
        name += "_"
    return name


def _runnable(model: ModelRef) -> str | bytes | onnx.ModelProto:
    return model if isinstance(model, (bytes, onnx.ModelProto)) else str(model)


def _data_path(data: object) -> Path:
    path = getattr(data, "path", data)  # a DataSpec: its file or folder
    return Path(path)  # type: ignore[arg-type]
