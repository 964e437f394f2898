"""Shared fixtures: tiny models built inline, data files, and the one numerical-equality helper.

Every model here is small enough that onnxruntime runs it in microseconds; the weights come from a
fixed seed so a failure reproduces.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnxruntime as ort
import pytest

if TYPE_CHECKING:
    from onnxforge.targets.latency import LatencyStats

# Tests run the CLI in-process; keep torch/onnxruntime from fighting over the two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")



@pytest.fixture(scope="session", autouse=True)
def _session_cache_key(tmp_path_factory) -> Iterator[str]:
    """One cache key for the whole session, as a user has one: session fixtures (the demo run, set up
    before any test's own fixtures) publish entries that later tests must verify. It lives outside every
    cache, never in the real home."""
    path = str(tmp_path_factory.mktemp("cache-key") / "cache.key")
    before = os.environ.get("ONNXFORGE_CACHE_KEY_FILE")
    os.environ["ONNXFORGE_CACHE_KEY_FILE"] = path
    yield path
    if before is None:
        os.environ.pop("ONNXFORGE_CACHE_KEY_FILE", None)
    else:
        os.environ["ONNXFORGE_CACHE_KEY_FILE"] = before


@pytest.fixture(autouse=True)
def _private_stage_cache(tmp_path_factory, monkeypatch, _session_cache_key):
    """Each test gets its own stage cache: nothing leaks between tests or into the user's ~/.cache."""
    monkeypatch.setenv("ONNXFORGE_CACHE_DIR", str(tmp_path_factory.mktemp("stage-cache")))
    monkeypatch.setenv("ONNXFORGE_CACHE_KEY_FILE", _session_cache_key)


@pytest.fixture(autouse=True)
def _fresh_evaluations():
    """Each test starts with nothing measured: the process-wide evaluation cache (pipeline.evaluations)
    would otherwise answer a test from what an earlier one ran."""
    from onnxforge.pipeline.evaluations import clear_evaluations

    clear_evaluations()
    yield
    clear_evaluations()


IMAGE_SHAPE = (3, 8, 8)  # C, H, W of the tiny classifier's input
NUM_CLASSES = 5


# ----------------------------------------------------------------------------------------------
# The shared numerical check


def _session(model: onnx.ModelProto | str | os.PathLike | bytes) -> ort.InferenceSession:
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = str(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_model(model, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run an ONNX model (ModelProto, path or bytes) in onnxruntime on the CPU."""
    return _session(model).run(None, dict(feeds))


def assert_numerically_equal(
    model_a,
    model_b,
    feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> None:
    """Run both models (ModelProto, path or bytes) in onnxruntime on the same feeds; outputs must match.

    ``feeds`` is one feed dict or a list of them (e.g. the same inputs at two batch sizes).
    """
    feed_list = [feeds] if isinstance(feeds, Mapping) else list(feeds)
    session_a, session_b = _session(model_a), _session(model_b)
    names_a = [o.name for o in session_a.get_outputs()]
    names_b = [o.name for o in session_b.get_outputs()]
    assert len(names_a) == len(names_b), f"output count differs: {names_a} vs {names_b}"
    for feed in feed_list:
        outs_a = session_a.run(None, dict(feed))
        outs_b = session_b.run(None, dict(feed))
        for name, a, b in zip(names_a, outs_a, outs_b, strict=True):
            assert a.shape == b.shape, f"output {name!r}: shape {a.shape} vs {b.shape}"
            np.testing.assert_allclose(b, a, atol=atol, rtol=rtol, err_msg=f"output {name!r}")


_PROGRESS_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] ")  # a piped progress line (onnxforge.cli.progress_view)


def without_progress(err: str) -> str:
    """stderr without the progress lines a command that ran past the start delay printed before its
    error (a gate failure after calibrating, a signal mid-way): what is left is what went wrong."""
    lines = err.splitlines(keepends=True)
    while lines and _PROGRESS_LINE.match(lines[0]):
        lines.pop(0)
    return "".join(lines)


def sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Tiny ONNX models


def make_classifier(
    seed: int = 0, *, batch: int | str = "N", opset: int = 17, channels: int = 4, dead_channels: int = 0
) -> onnx.ModelProto:
    """Conv(3->4, 3x3, pad 1) + Relu + Flatten + Gemm(256->5): x[N,3,8,8] -> logits[N,5].

    ``channels`` sets the Conv's width; the last ``dead_channels`` of them have zero weights and bias
    and nothing reads them (zero Gemm columns): removing them changes no output."""
    c, h, w = IMAGE_SHAPE
    dim = batch  # an int, or a symbol such as N for a dynamic batch
    text = textwrap.dedent(
        f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        classifier (float[{dim},{c},{h},{w}] x) => (float[{dim},{NUM_CLASSES}] logits) {{
            conv = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, conv_w, conv_b)
            act = Relu (conv)
            flat = Flatten <axis = 1> (act)
            logits = Gemm <transB = 1> (flat, fc_w, fc_b)
        }}
        """
    )
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    weights = {
        "conv_w": rng.standard_normal((channels, c, 3, 3)).astype(np.float32) * 0.3,
        "conv_b": rng.standard_normal(channels).astype(np.float32) * 0.1,
        "fc_w": rng.standard_normal((NUM_CLASSES, channels * h * w)).astype(np.float32) * 0.1,
        "fc_b": rng.standard_normal(NUM_CLASSES).astype(np.float32) * 0.1,
    }
    if dead_channels:
        live = channels - dead_channels
        weights["conv_w"][live:] = 0.0
        weights["conv_b"][live:] = 0.0
        weights["fc_w"].reshape(NUM_CLASSES, channels, h * w)[:, live:] = 0.0
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in weights.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def make_foldable_model(seed: int = 0) -> onnx.ModelProto:
    """x[N,16] -> y[N,8] with a weight computed at run time from constants (Add of two initializers,
    Identity chains): a simplifier should fold it away without changing the numbers."""
    text = textwrap.dedent(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        foldable (float[N,16] x) => (float[N,8] y) {
            w = Add (w_a, w_b)
            w2 = Identity (w)
            w3 = Identity (w2)
            h = MatMul (x, w3)
            h2 = Identity (h)
            b = Mul (bias, two)
            y = Add (h2, b)
        }
        """
    )
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    model.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w_a"),
            onnx.numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w_b"),
            onnx.numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "bias"),
            onnx.numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
        ]
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *IMAGE_SHAPE)).astype(np.float32)


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def classifier() -> onnx.ModelProto:
    return make_classifier()


@pytest.fixture
def classifier_path(tmp_path, classifier) -> Path:
    return save(classifier, tmp_path / "classifier.onnx")


@pytest.fixture
def foldable_path(tmp_path) -> Path:
    return save(make_foldable_model(), tmp_path / "foldable.onnx")


@pytest.fixture
def feeds() -> dict[str, np.ndarray]:
    return {"x": random_images(3, seed=42)}


# ----------------------------------------------------------------------------------------------
# Data files


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture
def calibration_npz(tmp_path) -> Path:
    """64 random images for the tiny classifier, keyed by its input name."""
    return write_npz(tmp_path / "calib.npz", x=random_images(64, seed=1))


@pytest.fixture
def eval_npz(tmp_path, classifier) -> Path:
    """Held-out images labelled with the fp32 model's own top-1 class: fp32 accuracy is 100%."""
    images = random_images(64, seed=2)
    labels = run_model(classifier, {"x": images})[0].argmax(1).astype(np.int64)
    return write_npz(tmp_path / "eval.npz", x=images, label=labels)


# ----------------------------------------------------------------------------------------------
# A tiny PyTorch source file

TORCH_MODEL_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 8 * 8, 5),
        ).eval()
    """
)


@pytest.fixture
def torch_model_file(tmp_path) -> Path:
    """``model.py`` with ``build()`` returning a tiny nn.Sequential; input is 1x3x8x8."""
    path = tmp_path / "model.py"
    path.write_text(TORCH_MODEL_SOURCE)
    return path


# ----------------------------------------------------------------------------------------------
# The CLI


def latency_stats(p50_ms: float) -> LatencyStats:
    """A timing whose every percentile is ``p50_ms`` (for timings a test decides)."""
    from onnxforge.targets.latency import LatencyStats

    return LatencyStats(p50_ms=p50_ms, p90_ms=p50_ms, p99_ms=p50_ms, mean_ms=p50_ms, std_ms=0.0, runs=5, batch=1,
                        samples_ms=(p50_ms,) * 5)


@pytest.fixture
def int8_faster(monkeypatch):
    """Every interleaved timing (Reference.time_against) answered as on a model whose time is in ops int8
    speeds up: the reference at 1 ms, every other model at 0.5 ms. The tiny test models are overhead-bound
    (int8 measures ~0.73x fp32 on make_classifier), so a quantize test about anything but the speed
    verdict would otherwise keep the input and exit 4 (issue 23)."""
    from onnxforge.pipeline import reference

    def timed(sessions, feeds, rounds=20, **_):
        first = next(iter(sessions))  # time_against puts the reference first
        return {label: latency_stats(1.0 if label == first else 0.5) for label in sessions}

    monkeypatch.setattr(reference, "compare_latency", timed)


@pytest.fixture
def cli(capsys):
    """Run ``onnxforge ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from onnxforge.cli import main

    def invoke(*args: str | os.PathLike) -> tuple[int, str, str]:
        capsys.readouterr()  # drop anything printed before
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


# ----------------------------------------------------------------------------------------------
# The demo pipeline, run once per session (about 15 s): several tests read its run folder.


@dataclass
class DemoRun:
    code: int
    run_dir: Path
    json_path: Path
    out: str
    err: str
    cache_dir: Path


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    """``onnxforge demo -o RUN --json RUN.json``; the exit code and output are checked by the tests."""
    from onnxforge.cli import main

    base = tmp_path_factory.mktemp("demo")
    run_dir, json_path = base / "run", base / "demo.json"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["demo", "-o", str(run_dir), "--json", str(json_path), "--cache-dir", str(base / "cache")])
    return DemoRun(code, run_dir, json_path, out.getvalue(), err.getvalue(), base / "cache")
