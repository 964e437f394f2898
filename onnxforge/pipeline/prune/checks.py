"""What every model-changing prune stage checks before it writes anything.

1. **It runs.** The candidate runs in onnxruntime on the target, on a batch of the data (generated
   inputs when there is no data): a rewrite that loads but fails at run time is an error, never a file.
2. **Its quality.** It is compared with the input model on held-out samples — the eval data, else
   a ``HOLDOUT`` share of the calibration samples (at most ``MAX_HELD_OUT``, right after the ones
   that fit: calibration.split_bounds), which are then not used to fit anything —
   through a ``Reference`` (onnxforge.pipeline.reference) with the stage's metric and tolerance, inside the
   back-off loop (onnxforge.pipeline.prune.backoff). Without either the result says "quality not
   measured", and so does the run table.
3. **Its speed.** Input and candidate are timed interleaved on the target (Reference.time_against), at
   the model's own batch size (its fixed batch, else 1), on the same feeds: a reported speedup is measured,
   never derived from MACs. MACs are estimates, counted with the shapes of the data (onnxforge.model_cost).
   With ``Objective.LATENCY`` (structure pruning's default) a candidate measured slower than its input
   (speedup under ``SLOWER_THAN_INPUT``, confirmed by a second timing) misses like a quality miss does:
   a smaller model that runs slower is not what a user asked for (issue 23: a Keras CNN pruned to 15
   and 29 channels ran at 0.36x the input's speed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxforge.errors import InvalidModelError, OnnxForgeError, QualityGateError
from onnxforge.model_io import input_specs
from onnxforge.pipeline.calibration import SampleSet, StreamedSamples, model_batch_size
from onnxforge.pipeline.codec import JsonResult, option
from onnxforge.pipeline.evaluate import QualityGate
from onnxforge.pipeline.gate_fields import GateFields
from onnxforge.pipeline.objective import Objective
from onnxforge.pipeline.progress import Progress, ignore, step
from onnxforge.pipeline.reference import Reference
from onnxforge.targets import get_target
from onnxforge.targets.base import Target
from onnxforge.targets.feeds import generate_feeds

__all__ = ["HOLDOUT", "SLOWER_THAN_INPUT", "BackOffFields", "CheckFields", "Objective", "QualityCheck", "gate_missed",
           "slower_message"]

HOLDOUT = 0.2  # share of the calibration samples held out to check quality when there is no eval data
MAX_HELD_OUT = 256
EVAL_BATCH = 8  # batch for scoring: a detector's activations at 32 x 3 x 480 x 640 are gigabytes
TIMING_SECONDS = 3.0  # about how long the interleaved timing of input and candidate takes
SLOWER_THAN_INPUT = 0.95  # a speedup under this is slower than the input, beyond the noise of one timing


@dataclass(frozen=True, kw_only=True)
class CheckFields(GateFields):
    """What every prune stage's checks read (QualityCheck.measure): the gate and where it runs."""

    target: str = option("cpu", help="where the quality gate runs")


@dataclass(frozen=True, kw_only=True)
class BackOffFields(CheckFields):
    """Structure pruning's back-off (channels, low-rank): whether it backs off and what a try must improve."""

    # False: no tolerance loop; the strength given is kept and its score reported (onnxforge optimize, which
    # varies it and scores every trial on the eval data itself)
    gate: bool = option(True, help="back off until the quality gate holds (no: keep the ratio given)")
    objective: Objective = option(
        Objective.LATENCY,
        help="latency: a try measured slower than the input misses like a quality miss (exit 4 when every "
        "try does); size: smaller is the goal, speed is only reported",
    )


@dataclass
class QualityCheck:
    """A prune stage's checks: the input model as a ``Reference`` on held-out samples (its outputs and
    score; ``measured`` is False when there is no data to measure quality on), one batch of feeds at the
    model's own batch size (for running and timing candidates) and the data's input shapes (for MAC
    estimates)."""

    target: Target
    batch: int  # the model's own batch size: its fixed batch, else 1
    reference: Reference
    source: str | None = None  # what quality is measured on
    feeds: dict[str, np.ndarray] | None = None
    shapes: dict[str, tuple[int, ...]] | None = None  # input shapes at batch 1, from the data
    progress: Progress = ignore  # hears the quality and speed checks (onnxforge.pipeline.progress)

    @classmethod
    def measure(
        cls,
        model: onnx.ModelProto,
        config: CheckFields,
        calibration: SampleSet | StreamedSamples | None = None,
        max_fit: int | None = None,
        progress: Progress = ignore,
    ) -> tuple[QualityCheck, SampleSet | None]:
        """The checks for ``model`` and the samples left to fit on (at most ``max_fit``, in memory).

        With ``config.eval_data`` quality is measured on it and ``calibration`` fits; without it
        ``HOLDOUT`` of ``calibration`` (at most MAX_HELD_OUT samples) is held out for the quality
        check. A streamed ``calibration`` is read only as deep as the two parts go.
        """
        target = get_target(config.target)
        specs = input_specs(model)
        batch = model_batch_size(specs, preferred=1)
        limit = getattr(config, "max_samples", None)  # --max-samples: bounds the fit and the scoring alike
        if limit is not None:
            max_fit = limit if max_fit is None else min(max_fit, limit)
        fit: SampleSet | StreamedSamples | None = calibration
        held: SampleSet | StreamedSamples | None = None
        source: str | None = None

        def reference_on(data: object, limit: int | None = None) -> Reference:  # the input model on data
            return Reference(model, data, target, metric=config.metric, tolerance=config.tolerance, limit=limit,
                             max_churn=config.max_churn, worst_cosine=config.worst_cosine, eval_batch=EVAL_BATCH)

        if config.eval_data is not None:
            reference = reference_on(config.eval_data, limit)
            source = f"{len(reference.samples)} samples of the eval data"
            if limit is not None:
                source += f" (the first {limit}: --max-samples)"
            if calibration is not None and max_fit is not None:
                fit = calibration.take(slice(0, max_fit))
        elif calibration is not None and len(calibration) >= 2:
            max_held = MAX_HELD_OUT if limit is None else min(MAX_HELD_OUT, max(1, limit // 4))
            fit, held = calibration.split(HOLDOUT, max_fit=max_fit, max_held=max_held)
            reference = reference_on(held.materialize())
            source = f"{len(reference.samples)} held-out calibration samples (not used to fit)"
        else:
            reference = reference_on(None)  # times candidates; no quality to measure
        if fit is not None:
            fit = fit.materialize()
        data = reference.samples if reference.measured else calibration
        feeds = shapes = None
        if data is not None:
            feeds = data.first_batch(batch)
            shapes = _shapes(data.first_batch(1))
        else:
            try:
                feeds = generate_feeds(specs, batch=batch)
                shapes = _shapes(generate_feeds(specs, batch=1))
            except OnnxForgeError:
                pass  # a dynamic dim nobody gave: the candidate is only loaded, and not timed
        if reference.measured:
            step(progress, "scoring the input model")
            reference.value  # noqa: B018 - the input's outputs and score, before any candidate is built
        return cls(target, batch, reference, source, feeds, shapes, progress), fit

    @property
    def measured(self) -> bool:
        return self.reference.measured

    @property
    def samples(self) -> SampleSet | None:
        return self.reference.samples if self.measured else None

    @property
    def gate(self) -> QualityGate | None:
        return self.reference.gate if self.measured else None

    @property
    def reference_score(self) -> float | None:
        return self.reference.value if self.measured else None

    def failure(self, tried: list[dict]) -> tuple[QualityGate, float, dict]:
        """(the gate, the input's score, the best try) for the message when no try met the tolerance;
        only a measured check fails one."""
        gate, reference_score = self.gate, self.reference_score
        best = gate.best(tried, lambda t: t["score"]) if gate is not None else None
        if gate is None or reference_score is None or best is None:
            raise ValueError("no try failed: quality was not measured")
        return gate, reference_score, best

    def describe(self) -> str | None:
        return self.reference.gate.describe() if self.measured else None

    def quality_note(self) -> str:
        """What the quality numbers rest on, or that there are none."""
        if self.measured:
            return f"quality measured on {self.source} ({self.describe()})"
        return "quality NOT measured: no --eval or --calibration data; the model was only checked to load" + (
            " and run" if self.feeds is not None else ""
        )

    def score(self, candidate: onnx.ModelProto | bytes) -> float | None:
        """``candidate``'s score on the held-out samples on the target; None without them."""
        if not self.measured:
            return None
        step(self.progress, "quality check")
        return self.reference.score(candidate)

    def passes(self, value: float | None, candidate: onnx.ModelProto | bytes | None = None) -> bool:
        """Whether ``candidate`` (scored ``value``) passes every rule of the gate (Reference.passes)."""
        return self.reference.passes(value, candidate)

    def verdict_note(self, candidate: onnx.ModelProto | bytes) -> str | None:
        """Every gate rule's line for ``candidate`` (its interval, churn, worst sample); None unmeasured."""
        return self.reference.verdict(candidate).message() if self.measured else None

    def runs(self, candidate: onnx.ModelProto | bytes, stage: str) -> None:
        """InvalidModelError naming ``stage`` when ``candidate`` does not run on one batch of the feeds."""
        data = candidate if isinstance(candidate, bytes) else candidate.SerializeToString()
        try:
            session = self.target.session(data)
            if self.feeds is not None:
                session.run(None, self.feeds)
        except InvalidModelError as e:
            raise InvalidModelError(f"{stage}: the rewritten model does not run: {e.message}") from e

    def speedup(self, model: onnx.ModelProto | bytes, candidate: onnx.ModelProto | bytes) -> dict | None:
        """Input and candidate timed interleaved at the model's own batch size (Reference.time_against,
        about ``TIMING_SECONDS``): p50s and their ratio (> 1: the candidate is faster); None without feeds."""
        if self.feeds is None:
            return None
        timer = self.reference if model is self.reference.model else Reference(model, None, self.target)
        timing = timer.time_against(
            {"candidate": candidate}, rounds=20, warmup=2, seconds=TIMING_SECONDS, feeds=self.feeds,
            progress=self.progress, phase="speed check (input and candidate interleaved)",
        )["candidate"]
        return {
            "batch": self.batch,
            "input_p50_ms": timing.reference.p50_ms,
            "candidate_p50_ms": timing.stats.p50_ms,
            "speedup": timing.speedup,
            "runs": timing.reference.runs,
        }


    def slower(self, model: onnx.ModelProto | bytes, candidate: onnx.ModelProto | bytes) -> tuple[dict | None, bool]:
        """(``speedup``'s timing, whether ``candidate`` is slower than its input). A first timing under
        ``SLOWER_THAN_INPUT`` is confirmed by a second one (a loaded machine moves one timing by more than
        the band); the faster of the two is reported. Never slower without feeds (nothing is timed)."""
        speed = self.speedup(model, candidate)
        if speed is None or speed["speedup"] >= SLOWER_THAN_INPUT:
            return speed, False
        again = self.speedup(model, candidate)
        if again is not None and again["speedup"] > speed["speedup"]:
            speed = again
        return speed, speed["speedup"] < SLOWER_THAN_INPUT


def slower_message(tried: list[dict]) -> str:
    """What the tries within tolerance measured, for an exit 4 where every one of them was slower."""
    speeds = [t["speedup"] for t in tried if t.get("slower")]
    return (f"every try within the tolerance ran slower than the input (measured {min(speeds):.2f}x-"
            f"{max(speeds):.2f}x its speed, under {SLOWER_THAN_INPUT})")


def gate_missed(
    check: QualityCheck, tried: list[dict], *, tries: str, kept: str, out: Path, result: JsonResult,
    remedies: str, slower_hint: str = "", label: str | None = None,
) -> QualityGateError:
    """The QualityGateError (exit 4) a prune stage raises when its back-off found no try that passes.

    ``tries`` names what was tried ("channel ratio down to 0.316"), ``kept`` the model saved at ``out``
    in its place ("unpruned", "input"), ``result`` the stage's result (every try, for the table and
    ``--json``). When every try within the tolerance ran slower than the input the message says so and
    ``slower_hint`` is the hint; otherwise it names the input's score and the best try's (by its
    ``label`` key, "ratio"), and the hint is to loosen the tolerance, then ``remedies``.
    """
    saved = f"the {kept} model is saved at {out}"
    if any(t.get("slower") for t in tried):
        return QualityGateError(
            f"no {tries} is both within the tolerance and not slower than the input: {slower_message(tried)}; "
            f"{saved}",
            hint=slower_hint, best_path=str(out), result=result.to_json(),
        )
    gate, reference_score, best = check.failure(tried)
    which = f" ({label} {best[label]:.3f})" if label is not None else ""
    return QualityGateError(
        f"no {tries} meets the tolerance ({check.describe()}, on {check.source}): the input scores "
        f"{gate.format(reference_score)}, the best try{which} {gate.format(best['score'])} ({best['gate']}); {saved}",
        hint=f"{gate.relax_hint()}, {remedies}",
        best_path=str(out), result=result.to_json(),
    )


def _shapes(feeds: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(d) for d in v.shape) for k, v in feeds.items()}
