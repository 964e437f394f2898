"""Static INT8 quantization that measures what is fast on the target and keeps accuracy.

Procedure: (1) pre-process the fp32 model (``quant_pre_process``: optimization + shape
inference, which ``quantize_static`` needs to quantize activations at all); (2) calibrate once
on the user's samples and cache the ranges; (3) quantize once per candidate scheme the target
proposes (format, activation type, per-channel or not); (4) score each candidate on held-out
samples against fp32 (and labels); (5) time fp32 and all candidates interleaved on the target;
(6) keep the fastest candidate that meets the tolerance (``objective`` size: the smallest) when it
improves on the input, which is always a candidate. Every candidate's numbers are returned.

Calibration runs once, one batch at a time (calibration_ranges): bounded memory, and
Entropy/Percentile/Distribution accept variable-length samples. When the fastest candidate
misses the tolerance, mixed precision (mixed_precision) returns its most sensitive nodes to
float until it holds, and everything is timed again. The kept model's per-node error (local and
end-to-end SQNR vs fp32, quant_error) is measured on calibration samples and returned as
``layer_errors``.

Candidates need not be static: a target may propose dynamic int8 (``quantize_dynamic``: int8
MatMul weights, activation ranges computed per run), static int8 on the weight MatMuls only,
SmoothQuant-smoothed variants and int4 weight-only (``MatMulNBits``) for MatMul-dominated models
such as transformers, or fp16 (GPU targets); they are scored and timed like the others. Every
int8/int4 candidate stores embedding tables in int8 with per-row scales (embeddings) unless
``quantize_embeddings`` is off. Transformers first get their graphs prepared (graphs): onnxscript
fusions (transformer_fusion), kept only when something fused and the outputs match, which dynamic
candidates quantize (QAttention); residual sums kept out of a slow SkipLayerNormalization kernel
(skip_layer_norm); attention-mask nodes out of static ranges (attention_mask).

No candidate within tolerance: the most accurate one is saved and QualityGateError (exit 4) is
raised. No candidate within tolerance faster than the input (beyond the timing tie band, fp32 timed in
the same interleaved run; or smaller, for objective size): the input is written unchanged and
QualityGateError (exit 4) is raised with every candidate's numbers (issue 23: never slower than the
input).

Modules by job: ``schemes`` (scheme ids, ``parse_scheme``, the codec hook), ``config``
(QuantizeConfig, CalibrationMethod, the results), ``calibrate`` (samples, pre-processing, ranges),
``graphs`` (the fp32 graphs candidates start from), ``backends`` (the onnxruntime call for one
candidate), ``select`` (scoring, timing, mixed precision, the choice) and ``stage`` (``quantize``,
composing them); ``calibration_ranges``, ``calibration_memory``, ``mixed_precision``,
``quant_error``, ``transformer_fusion``, ``skip_layer_norm``, ``smooth_quant``, ``embeddings`` and
``attention_mask`` do one thing each for them.
"""

from onnxforge.pipeline.quantize.config import (
    CalibrationMethod,
    CandidateResult,
    Objective,
    QuantizeConfig,
    QuantizeResult,
)
from onnxforge.pipeline.quantize.schemes import parse_scheme, scheme_id  # first: registers the codec hook
from onnxforge.pipeline.quantize.stage import quantize

__all__ = [
    "CalibrationMethod",
    "CandidateResult",
    "Objective",
    "QuantizeConfig",
    "QuantizeResult",
    "parse_scheme",
    "quantize",
    "scheme_id",
]
