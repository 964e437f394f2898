"""Property-based fuzzing of recipes: a run never writes outside its run folder (issue 17).

Recipes are generated with hostile run and stage names (``..``, ``/``, absolute paths, unicode, NUL,
names too long for a file), ``inputs:`` that name no earlier stage, output-like keys, data and model
paths that leave the project, point into the run folder or go through symlinks, into a sandbox laid
out as::

    project/   classifier.onnx calib.npz eval.npz recipe.yaml, link_model.onnx -> ../outside/victim.onnx,
               link_data.npz -> ../outside/calib.npz,
               runs/r/{01_simplify.onnx, manifest.json, report.html} -> ../../../outside/victim.*
    outside/   victim.onnx victim.json victim.html calib.npz
    tmp/       $TMPDIR of the run

Each recipe runs through the CLI in-process (``onnxforge run recipe.yaml``, from ``project/``, so the
run folder is ``runs/<name>``). The properties: the exit code is 0, 2, 3 or 4 (never 1, a bug), with
no traceback; no file or link outside ``project/runs/`` is created, changed or removed (bytes and
mtime), so a symlink in the run folder is replaced, never written through; ``tmp/`` is empty again.
The stage cache lives outside the sandbox (conftest), where it belongs.

CI runs a fixed set of examples (``derandomize``); ``ONNXFORGE_FUZZ_EXAMPLES=500`` runs more, at random.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import make_classifier, random_images, run_model

_LONG_RUN = int(os.environ.get("ONNXFORGE_FUZZ_EXAMPLES", "0"))
_SETTINGS = (
    settings(max_examples=_LONG_RUN, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    if _LONG_RUN else
    settings(max_examples=60, deadline=None, derandomize=True, database=None,
             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
)

OUTSIDE = "{outside}"  # replaced by the sandbox's absolute outside/ folder

HOSTILE = ["..", ".", "", "/", "../escape", "../../outside", f"{OUTSIDE}/abs", "a/b", "a\\b", "~", "$HOME",
           "ünïcödé", "名前", "x" * 300, "a\0b", " ", "-rf", "source", "runs", "r", "ok"]
names = st.one_of(st.sampled_from(HOSTILE), st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True), st.text(max_size=20))
data_paths = st.sampled_from([
    "calib.npz", "eval.npz", "../outside/calib.npz", f"{OUTSIDE}/calib.npz", "link_data.npz", "missing.npz",
    "runs/r/01_simplify.onnx", "runs/r/manifest.json", "/dev/null", ".", "", "runs/r", "../outside/victim.onnx",
])
model_paths = st.sampled_from([
    "link_model.onnx", "../outside/victim.onnx", f"{OUTSIDE}/victim.onnx", "runs/r/01_simplify.onnx",
    "missing.onnx", "/dev/null", "calib.npz", "classifier.onnx:build", "runs/r/manifest.json",
])
QUICK = {
    "simplify": {},
    "quantize": {"schemes": ["qdq-u8s8-per-tensor"], "mixed_precision": False, "error_report": False,
                 "latency_rounds": 2, "tolerance": 100, "transformer_fusion": False},
    "prune": {"sparsity": 0.3, "tolerance": 100},
    "fp16": {},
}
OUTPUT_LIKE = ["output", "path", "run_dir", "eval_data", "sample_data", "calibration_data"]
MUTATIONS = ["run name", "stage name", "inputs", "output-like key", "model", "calibration", "eval", "max_samples",
             "stage kind"]


@st.composite
def recipes(draw):
    """A recipe that runs (into runs/ok, or runs/r, which holds symlinks to outside/), made hostile by
    0 to 3 mutations: so that a share of the examples gets as far as writing files."""
    kinds = draw(st.lists(st.sampled_from(list(QUICK)), min_size=1, max_size=3))
    stages = [{kind: dict(QUICK[kind])} for kind in kinds]
    recipe = {"name": draw(st.sampled_from(["ok", "r"])), "model": "classifier.onnx", "calibration": "calib.npz",
              "stages": stages}
    if draw(st.booleans()):
        recipe["eval"] = "eval.npz"
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        index = draw(st.integers(0, len(stages) - 1))
        options = next(iter(stages[index].values()))
        if mutation == "run name":
            recipe["name"] = draw(names)
        elif mutation == "stage name":
            options["name"] = draw(names)
        elif mutation == "inputs":
            earlier = [
                "source",
                *kinds,
                *(o["name"] for e in stages for o in e.values() if isinstance(o.get("name"), str)),
            ]
            options["inputs"] = draw(st.lists(st.one_of(st.sampled_from(earlier), names), max_size=2))
        elif mutation == "output-like key":
            options[draw(st.sampled_from(OUTPUT_LIKE))] = draw(data_paths)
        elif mutation == "model":
            recipe["model"] = draw(model_paths)
        elif mutation in ("calibration", "eval"):
            recipe[mutation] = draw(data_paths)
        elif mutation == "max_samples":
            recipe["max_samples"] = draw(st.sampled_from([4, 0, -1, 10**9, "x"]))
        else:
            stages[index] = {draw(st.sampled_from(["../x", "/abs", "nonexistent"])): options}
    return recipe


def _substitute(value, outside: str):
    if isinstance(value, str):
        return value.replace(OUTSIDE, outside)
    if isinstance(value, list):
        return [_substitute(v, outside) for v in value]
    if isinstance(value, dict):
        return {_substitute(k, outside): _substitute(v, outside) for k, v in value.items()}
    return value


_MODEL = make_classifier().SerializeToString()
_IMAGES = random_images(24, seed=1)
_LABELS = run_model(make_classifier(), {"x": _IMAGES})[0].argmax(1).astype(np.int64)


def _sandbox(root: Path) -> tuple[Path, Path, Path]:
    project, outside, tmp = root / "project", root / "outside", root / "tmp"
    for folder in (project / "runs" / "r", outside, tmp):
        folder.mkdir(parents=True)
    (project / "classifier.onnx").write_bytes(_MODEL)
    np.savez(project / "calib.npz", x=_IMAGES)
    np.savez(project / "eval.npz", x=_IMAGES, label=_LABELS)
    (outside / "victim.onnx").write_bytes(_MODEL)
    np.savez(outside / "calib.npz", x=_IMAGES)
    (outside / "victim.json").write_text("{}")
    (outside / "victim.html").write_text("<p>not yours</p>")
    (project / "link_model.onnx").symlink_to("../outside/victim.onnx")
    (project / "link_data.npz").symlink_to("../outside/calib.npz")
    for name, target in (("01_simplify.onnx", "victim.onnx"), ("manifest.json", "victim.json"),
                         ("report.html", "victim.html")):
        (project / "runs" / "r" / name).symlink_to(f"../../../outside/{target}")
    return project, outside, tmp


def _snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    """Every file, link and folder under ``root`` but ``skip``: (kind, link target or sha256, mtime)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        if Path(folder) == skip or skip in Path(folder).parents:
            continue
        for name in dirs + files:
            path = Path(folder) / name
            if path == skip:
                continue
            info = path.lstat()
            if path.is_symlink():
                found[str(path)] = ("link", os.readlink(path))
            elif path.is_dir():
                found[str(path)] = ("dir",)
            else:
                found[str(path)] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), info.st_mtime_ns)
    return found


@_SETTINGS
@given(recipe=recipes())
def test_a_recipe_never_writes_outside_its_run_folder(recipe):
    from onnxforge.cli import main

    with tempfile.TemporaryDirectory(prefix="recipe-fuzz-") as tmp_root:
        root = Path(tmp_root)
        project, outside, tmp = _sandbox(root)
        data = _substitute(recipe, str(outside))
        try:
            text = yaml.safe_dump(data, allow_unicode=True)
        except yaml.YAMLError:
            return  # not representable as YAML: nothing to run
        (project / "recipe.yaml").write_text(text, encoding="utf-8")
        runs = project / "runs"
        before = _snapshot(root, skip=runs)
        stderr = io.StringIO()
        saved_tempdir = tempfile.tempdir
        try:
            tempfile.tempdir = str(tmp)
            with contextlib.chdir(project), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(stderr):
                code = main(["run", "recipe.yaml"])
        finally:
            tempfile.tempdir = saved_tempdir
        err = stderr.getvalue()
        event(f"exit {code}" + (f": {err.splitlines()[0][7:90]}" if code and err.strip() else ""))
        assert code in (0, 2, 3, 4), f"exit {code}\n{text}\n{err}"
        assert "Traceback" not in err, err
        after = _snapshot(root, skip=runs)
        changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p)
                         and not p.startswith(str(tmp)))
        assert not changed, f"written outside the run folder: {changed}\n{text}"
        assert not any(tmp.iterdir()), f"temp files left: {sorted(tmp.iterdir())}"
        for path in runs.rglob("*"):  # whatever the run wrote is inside one run folder under runs/
            assert path.resolve(strict=False).is_relative_to(runs.resolve()) or path.is_symlink(), path
