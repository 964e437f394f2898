"""What quantize() is asked (QuantizeConfig, CalibrationMethod) and what it returns (QuantizeResult,
one CandidateResult per scheme measured)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxruntime import quantization as ortq

from onnxforge.errors import UsageError
from onnxforge.pipeline.codec import JsonResult, option
from onnxforge.pipeline.data_spec import set_data_fields
from onnxforge.pipeline.evaluate import QualityGate, set_metric_field
from onnxforge.pipeline.gate_fields import GateFields
from onnxforge.pipeline.objective import Objective
from onnxforge.pipeline.quantize import schemes  # noqa: F401  (registers QuantScheme's codec hook)
from onnxforge.pipeline.quantize.mixed_precision import MixedPrecisionSearch, rank_nodes
from onnxforge.pipeline.quantize.op_classes import OpClassReport
from onnxforge.pipeline.quantize.quant_error import NodeError
from onnxforge.targets import QuantScheme
from onnxforge.targets.latency import LatencyStats

__all__ = [
    "INPUT_KEPT", "CalibrationMethod", "CandidateResult", "Objective", "QuantizeConfig", "QuantizeResult", "Ranges",
]


class CalibrationMethod(enum.Enum):
    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"
    DISTRIBUTION = "distribution"

    def to_ort(self) -> ortq.CalibrationMethod:
        return {
            CalibrationMethod.MINMAX: ortq.CalibrationMethod.MinMax,
            CalibrationMethod.ENTROPY: ortq.CalibrationMethod.Entropy,
            CalibrationMethod.PERCENTILE: ortq.CalibrationMethod.Percentile,
            CalibrationMethod.DISTRIBUTION: ortq.CalibrationMethod.Distribution,
        }[self]


INPUT_KEPT = "fp32 (input kept)"  # QuantizeResult.chosen when no candidate improves on the input


@dataclass(frozen=True)
class Ranges:
    """Activation ranges computed once by calibration: onnxruntime's JSON cache and the method it holds."""

    path: Path
    method: CalibrationMethod


DEFAULT_CALIBRATION_SAMPLES = 256


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig(GateFields):
    """How to quantize.

    schemes: the candidates to measure; None lets the target propose them.
    metric / tolerance: the quality gate (see onnxforge.pipeline.evaluate); tolerance None = metric default.
    max_samples: bounds every use of the data (the CLI's --max-samples): at most this many samples
      calibrate (and smooth), at most this many eval samples are scored, and without eval data at most
      max_samples * holdout_fraction / (1 - holdout_fraction) more calibration samples are held out;
      nothing of a data file past them is read. None: DEFAULT_CALIBRATION_SAMPLES calibrate and the
      whole eval file is scored.
    eval_data: held-out samples (with ``label`` for accuracy); None holds out the last
      ``holdout_fraction`` of the calibration samples instead.
    threads: intra-op threads for the latency measurement (1 is the most stable on a shared host).
    activation_symmetric / weight_symmetric: symmetric ranges (zero point at the type's middle).
    mixed_precision: when the fastest candidate misses the tolerance, return its most sensitive
      nodes to float until it holds, trying at most ``mixed_precision_steps`` quantizations and
      at most ``max_float_fraction`` of the quantized nodes.
    float_share: every static or dynamic int8 candidate keeps this share of its quantized nodes in
      float, the most sensitive first (mixed_precision.share_in_float): a fixed trade, no gate.
    error_report: measure each quantized node's SQNR vs fp32 on ``analysis_samples`` calibration
      samples (also the samples mixed precision ranks nodes on).
    transformer_fusion: onnxscript/onnxruntime transformer fusions (Attention -> QAttention for dynamic
      candidates), kept only when something fused and the outputs match (transformer_fusion).
    fuse_attention: with transformer_fusion, fuse attention into Attention (QAttention once quantized);
      False fuses only GELU and keeps the Q/K/V projections as whole-batch MatMuls (faster at large
      batches on the CPU measured; the search's knob decides at its batch).
    residual_sums: on transformers, write residual Adds as Sum where the target runs SkipLayerNormalization
      measurably slower than Add + LayerNormalization (skip_layer_norm).
    remove_padding: on transformers with a 2-D mask input, run the token-wise layers (projections,
      FFN, normalizations) on the real tokens only, kept when every output matches (token_packing).
    quantize_embeddings: every int8/int4 candidate also stores its embedding tables in int8 with per-row
      scales (embeddings; a scheme can ask for it alone with ``-int8-embeddings``).
    smooth_alpha: SmoothQuant migration strength for ``-smooth`` schemes (smooth_quant).
    int4_block_size / int4_accuracy_level: MatMulNBits blocks along K (a power of two >= 16) and its
      compute type (0: the kernel's default, 1 fp32, 2 fp16, 3 bf16, 4 int8).
    """

    target: str = option("cpu", help="where candidates are measured (the recipe's target fills it)")
    objective: Objective = option(
        Objective.LATENCY,
        help="what the kept model must improve on the input: latency (the fastest within tolerance, kept only "
        "when measured faster than the input) or size (the smallest within tolerance, kept only when smaller); "
        "when none does, the input is kept and the gate fails (exit 4)",
    )
    schemes: tuple[QuantScheme, ...] | None = option(
        None,
        help="the candidates measured, e.g. qdq-u8s8-per-channel, qdq-u8s8-per-channel-matmul-smooth, "
        "dynamic-s8-per-channel-smooth, int4, fp16; options -matmul, -profiled (only the op types measured "
        "faster in int8 here), -smooth, -percentile, -int8-embeddings (default: the target's)",
    )
    calibration_method: CalibrationMethod = option(
        CalibrationMethod.MINMAX,
        help="how activation ranges are calibrated",
    )
    max_samples: int | None = option(
        None,
        help="samples read from each data file at most: calibration, held-out and eval (nothing past them is "
        "read)", renamed_from="max_calibration_samples",
    )
    holdout_fraction: float = option(
        0.2,
        help="share of the calibration samples held out to score candidates without eval data",
    )
    exclude_nodes: tuple[str, ...] = option((), help="node names kept in float")
    exclude_op_types: tuple[str, ...] = option((), help="op types kept in float")
    threads: int = option(1, help="intra-op threads when timing candidates")
    latency_rounds: int = option(20, help="interleaved timing rounds per candidate")
    activation_symmetric: bool = option(False, help="symmetric activation ranges (zero point in the middle)")
    weight_symmetric: bool = option(True, help="symmetric weight ranges")
    mixed_precision: bool = option(
        True,
        help="when the fastest candidate misses the tolerance, return its most sensitive nodes to float",
    )
    max_float_fraction: float = option(0.5, help="mixed precision keeps at most this share of quantized nodes in float")
    mixed_precision_steps: int = option(10, help="mixed precision: float-node sets tried at most")
    float_share: float = option(
        0.0,
        help="share of each int8 candidate's quantized nodes kept in float from the start, the most sensitive "
        "first (local SQNR on calibration samples, each with the nodes it needs in float), no gate; 0: none",
    )
    error_report: bool = option(True, help="measure each node's quantization error (SQNR) for the report")
    analysis_samples: int = option(32, help="samples the per-node error analysis runs")
    # bytes; the peak the stage stays under (memory_plan sizes its batches to it; None: 80% of the memory
    # available at the start), refused before any work when batch 1 cannot fit. Not in the cache key: it
    # decides whether the stage runs and its batch sizes, not the MinMax ranges (histogram methods on a
    # smaller batch can shift theirs slightly: see memory_plan).
    max_memory: int | None = option(
        None,
        help="peak memory in bytes to stay under: calibration, scoring and the error analysis are sized to it "
        "from the data's real shapes; refused before any work when a batch of 1 cannot fit (default: 80% "
        "of the memory available)",
        key=False,
    )
    transformer_fusion: bool = option(True, help="fuse Attention/SkipLayerNorm/BiasGelu before quantizing transformers")
    fuse_attention: bool = option(
        True,
        help="with transformer fusion: fuse attention into Attention/QAttention (no: only GELU is fused and the "
        "Q/K/V projections stay whole-batch MatMuls, faster at large batches)",
    )
    residual_sums: bool = option(True, help="keep residual Add chains in a quantization-friendly form")
    remove_padding: bool = option(
        True,
        help="transformers with a mask input: run the per-token layers on real tokens only (padding removed "
        "inside the graph), kept when the outputs match",
    )
    quantize_embeddings: bool = option(
        True,
        help="store embedding tables in int8 with per-row scales in every candidate",
    )
    smooth_alpha: float = option(0.5, help="SmoothQuant migration strength for -smooth schemes")
    int4_block_size: int = option(32, help="int4: weights per scale along K (a power of two >= 16)")
    int4_accuracy_level: int = option(
        4,
        help="int4: MatMulNBits compute type (0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8)",
    )

    @property
    def calibration_samples(self) -> int:
        """How many samples calibrate at most: ``max_samples``, else DEFAULT_CALIBRATION_SAMPLES."""
        return self.max_samples or DEFAULT_CALIBRATION_SAMPLES

    def __post_init__(self) -> None:
        set_data_fields(self, "eval_data")  # a str or Path from the Python API becomes a DataSpec
        set_metric_field(self)  # and a metric's name or file.py:function a Metric / UserMetric
        if not 0.0 < self.holdout_fraction < 1.0:
            raise UsageError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if not 0.0 < self.max_float_fraction <= 1.0:
            raise UsageError(f"max_float_fraction must be in (0, 1], got {self.max_float_fraction}")
        if not 0.0 <= self.float_share < 1.0:
            raise UsageError(f"float_share must be in [0, 1), the share of quantized nodes kept in float, got "
                             f"{self.float_share}")
        if (self.max_samples is not None and self.max_samples < 1) or self.analysis_samples < 1:
            raise UsageError("max_samples and analysis_samples must be at least 1")
        if not 0.0 < self.smooth_alpha < 1.0:
            raise UsageError(f"smooth_alpha must be in (0, 1), got {self.smooth_alpha}")
        block = self.int4_block_size
        if block < 16 or block & (block - 1):
            raise UsageError(f"int4_block_size must be a power of two >= 16, got {block}")
        if self.int4_accuracy_level not in range(5):
            raise UsageError(f"int4_accuracy_level must be 0-4, got {self.int4_accuracy_level}")


@dataclass
class CandidateResult(JsonResult):
    """One scheme measured. ``speedup`` is saved as ``speedup_vs_fp32``; the latency as its summary
    (``LatencyStats.to_json``: percentiles, throughput, histogram), not every timed run."""

    scheme: str
    score: float | None = None
    meets_tolerance: bool = False
    latency: LatencyStats | None = field(default=None, metadata={"json": False})
    speedup: float | None = field(default=None, metadata={"json": False})
    bytes: int | None = None
    error: str | None = None
    float_nodes: list[str] = field(default_factory=list)  # nodes kept in float by mixed precision
    # with labels: top-1 agreement with the input's own predictions (1 - churn), beside the accuracy drop
    agreement_with_input: float | None = None
    gate_checks: str | None = None  # every gate rule's line (gate_rules.GateVerdict.message)
    # the score is on only this many held-out samples (coarse_scoring: it could not be kept); None: all
    scored_samples: int | None = None

    def json_extra(self) -> dict[str, Any]:
        return {"latency": self.latency.to_json() if self.latency else None, "speedup_vs_fp32": self.speedup}


@dataclass
class QuantizeResult(JsonResult):
    """What quantize() did. The gate is saved as its metric, tolerance and description; the fp32
    latency as its summary; ``top_offenders`` names the kept model's worst nodes (``json_extra``)."""

    path: Path
    chosen: str
    gate: QualityGate = field(metadata={"json": False})
    fp32_score: float
    fp32_latency: LatencyStats = field(metadata={"json": False})
    candidates: list[CandidateResult]
    calibration_samples: int
    eval_samples: int
    notes: list[str] = field(default_factory=list)
    mixed_precision: MixedPrecisionSearch | None = None
    # the kept model's nodes in graph order, then its graph outputs (``graph_output``: end to end only)
    layer_errors: list[NodeError] = field(default_factory=list)
    calibration_batches: int = 0
    objective: str = "latency"  # the config's Objective, by value
    kept_input: bool = False  # no candidate improved on the input: ``path`` holds the input (``chosen`` INPUT_KEPT)
    # a profiled scheme's measurement: each op type int8 vs float, and the time shares before/after (op_classes)
    op_classes: OpClassReport | None = None

    def json_extra(self) -> dict[str, Any]:
        return {
            "metric": self.gate.metric.value,
            "tolerance": self.gate.tolerance,
            "gate": self.gate.describe(),
            "fp32_latency": self.fp32_latency.to_json(),
            "top_offenders": [e.node for e in self.top_offenders()],
        }

    def top_offenders(self, count: int = 5) -> list[NodeError]:
        """The kept model's nodes with the lowest local SQNR (the error their own quantization adds)."""
        return rank_nodes([e for e in self.layer_errors if not e.graph_output])[:count]

    @property
    def chosen_candidate(self) -> CandidateResult:
        """The kept candidate (a LookupError when the input was kept)."""
        found = next((c for c in self.candidates if c.scheme == self.chosen), None)
        if found is None:
            raise LookupError(f"no candidate was kept: {self.chosen}")
        return found
