"""``onnxforge optimize``: a search whose answer is known by construction, resume, failing trials,
the Ray path against the local path, and the errors a user meets."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import pytest
from conftest import make_classifier, random_images, run_model, save, write_npz

from onnxforge.errors import InvalidModelError
from onnxforge.pipeline.data_spec import DataSpec
from onnxforge.pipeline.evaluate import Metric
from onnxforge.pipeline.search import Objective, OptimizeConfig, Strategy, optimize
from onnxforge.pipeline.search.space import SearchSpace

CHANNELS = 32
ZERO = 16  # channels whose weights and bias are zero: removing them changes nothing


def make_redundant_classifier(seed: int = 0) -> onnx.ModelProto:
    """32 Conv channels of which 16 are dead: pruning half the channels (the dead ones, lowest L2) is
    free; pruning three quarters removes real channels and changes answers."""
    return make_classifier(seed, channels=CHANNELS, dead_channels=ZERO)


@pytest.fixture
def project(tmp_path) -> Path:
    model = make_redundant_classifier()
    save(model, tmp_path / "model.onnx")
    write_npz(tmp_path / "calib.npz", x=random_images(48, seed=1))
    images = random_images(96, seed=2)
    write_npz(tmp_path / "eval.npz", x=images, label=run_model(model, {"x": images})[0].argmax(1).astype(np.int64))
    return tmp_path


def _config(project: Path, **overrides) -> OptimizeConfig:
    values = dict(
        calibration=DataSpec(path=project / "calib.npz"), eval_data=DataSpec(path=project / "eval.npz"),
        metric=Metric.ACCURACY, tolerance=0.0, objective=Objective.SIZE, strategy=Strategy.GRID,
        passes=("prune_channels",), space={"prune_channels.ratio": (0.5, 0.75), "prune_channels.importance": ("l2",)},
        trials=10, latency_rounds=3,
    )
    return OptimizeConfig(**{**values, **overrides})


def _numbers(records):
    return [(r["number"], r["describe"], r["status"]) for r in records]


def test_the_known_answer_is_found(project):
    result = optimize(project / "model.onnx", project / "run", _config(project))
    by_ratio = {r["plan"].get("prune_channels.ratio"): r for r in result.trials}
    assert set(by_ratio) == {None, 0.5, 0.75}  # the grid: the input alone, and each ratio
    assert by_ratio[0.5]["quality"] == 1.0 and by_ratio[0.5]["within_budget"]
    assert not by_ratio[0.75]["within_budget"]  # real channels removed: answers changed
    assert result.best["plan"]["prune_channels.ratio"] == 0.5
    assert result.best["bytes"] < by_ratio[None]["bytes"] / 1.8  # half the conv, half the Gemm
    # the published files
    run = project / "run"
    best = onnx.load(str(run / "best.onnx"))
    assert next(i for i in best.graph.initializer if "conv" in i.name).dims[0] == CHANNELS - ZERO
    pareto = json.loads((run / "pareto.json").read_text())
    assert pareto["best"]["number"] == result.best["number"]
    assert {r["number"] for r in pareto["front"]} == {r["number"] for r in result.front}
    for r in result.front:  # every front model is in RUN_DIR with a recipe that rebuilds it
        assert (run / r["front_path"]).exists() and (run / r["recipe"]).exists()
    assert "<svg" in (run / "report.html").read_text()


def test_a_front_recipe_rebuilds_its_model(project):
    from conftest import sha256

    from onnxforge.pipeline.recipe import load_recipe
    from onnxforge.pipeline.runner import run_recipe

    result = optimize(project / "model.onnx", project / "run", _config(project))
    rebuilt = run_recipe(load_recipe(project / "run" / "best.recipe.yaml"), project / "rebuilt", measure=False)
    assert rebuilt.stages[-1].output["sha256"] == sha256(project / "run" / "best.onnx") == result.best["sha256"]


def test_latency_objective_measures_speed_against_the_input(project):
    result = optimize(project / "model.onnx", project / "run", _config(project, objective=Objective.LATENCY))
    for r in result.trials:
        assert r["reference_ms"] > 0 and r["model_ms"] > 0 and r["speedup"] == pytest.approx(1 / r["ratio"])
    assert all("trial_ratio" in r for r in result.front)  # the front was re-timed together


def test_resume_reuses_completed_trials_and_reruns_interrupted_ones(project, monkeypatch):
    import sys

    search_module = sys.modules["onnxforge.pipeline.search.optimize"]  # the attribute is the function

    finished = []
    evaluate = search_module.evaluate_plan

    def recorded(*args, **kwargs):
        finished.append(evaluate(*args, **kwargs))  # the record the search keeps (its path made relative)
        return finished[-1]

    counts = []

    def interrupt_third_trial(event):
        if event.phase == "trials":
            counts.append((event.done, event.total))
        if event.message.startswith("trial 2:"):
            raise KeyboardInterrupt  # Ctrl-C while trial 2 is being built

    monkeypatch.setattr(search_module, "evaluate_plan", recorded)
    with pytest.raises(KeyboardInterrupt):
        optimize(project / "model.onnx", project / "run", _config(project), progress=interrupt_third_trial)
    monkeypatch.undo()
    assert [r["number"] for r in finished] == [0, 1]
    assert counts == [(0, 10), (1, 10), (1, 10), (2, 10), (2, 10)]  # trial i/N before and after each trial
    result = optimize(project / "model.onnx", project / "run", _config(project))
    assert result.trials[:2] == [{**r, **{k: v for k, v in result.trials[i].items() if k not in r}}
                                 for i, r in enumerate(finished)]  # the same records: not recomputed
    assert [r["number"] for r in result.trials] == [0, 1, 3]  # 2 was interrupted; its plan ran again as 3
    assert any("1 interrupted trials run again" in n for n in result.notes)
    assert {r["plan"].get("prune_channels.ratio") for r in result.trials} == {None, 0.5, 0.75}


def test_other_settings_on_the_same_folder_are_refused(project):
    from onnxforge.errors import UsageError

    optimize(project / "model.onnx", project / "run", _config(project))
    with pytest.raises(UsageError, match="other settings"):
        optimize(project / "model.onnx", project / "run", _config(project, tolerance=1.0))


def test_a_failing_trial_is_recorded_and_the_search_goes_on(project, monkeypatch):
    from onnxforge.pipeline.passes.prune_channels import ChannelPrunePass

    original = ChannelPrunePass.run

    def flaky(self, config, inputs, output, context):
        if config.ratio == 0.75:
            raise InvalidModelError("this graph cannot lose three quarters of its channels")
        return original(self, config, inputs, output, context)

    monkeypatch.setattr(ChannelPrunePass, "run", flaky)
    result = optimize(project / "model.onnx", project / "run", _config(project))
    failed = [r for r in result.trials if r["status"] == "failed"]
    assert len(failed) == 1 and "three quarters" in failed[0]["error"]
    assert result.best["plan"]["prune_channels.ratio"] == 0.5
    assert "three quarters" in (project / "run" / "report.html").read_text()


def test_eval_data_without_labels_for_an_accuracy_budget(project, cli):
    write_npz(project / "unlabelled.npz", x=random_images(16, seed=4))
    code, _, err = cli("optimize", project / "model.onnx", "-o", project / "run",
                       "--calibration", project / "calib.npz", "--eval", project / "unlabelled.npz",
                       "--max-drop", "0.5")
    assert code == 2 and "label" in err and "Traceback" not in err


@pytest.mark.parametrize(("args", "fragment"), [
    (["--trials", "0"], "--trials"),
    (["--time-budget", "soon"], "duration"),
    (["--time-budget", "-5m"], "positive"),
    (["--max-drop", "1", "--metric", "cosine"], "--max-drop"),
    (["--space", "prune_channels.ratio"], "KNOB=V1"),
    (["--space", "prune_channels.colour=1"], "unknown knob"),
    (["--pass", "shrink"], "not a registered pass"),
])
def test_bad_budgets_and_spaces_are_clear_errors(project, cli, args, fragment):
    code, _, err = cli("optimize", project / "model.onnx", "-o", project / "run", "--calibration",
                       project / "calib.npz", "--eval", project / "eval.npz", *args)
    assert code == 2, err
    assert fragment in err and "Traceback" not in err
    assert not (project / "run" / "best.onnx").exists()


def test_an_unreachable_ray_address_is_exit_3(project, cli):
    pytest.importorskip("ray")
    code, _, err = cli("optimize", project / "model.onnx", "-o", project / "run", "--calibration",
                       project / "calib.npz", "--eval", project / "eval.npz", "--ray-address", "127.0.0.1:9",
                       "--pass", "prune_channels", "--trials", "1")
    assert code == 3, err
    assert err.count("error:") == 1 and "Ray" in err and "Traceback" not in err


def test_the_ray_path_gives_the_same_front_as_the_local_path(project):
    pytest.importorskip("ray")
    local = optimize(project / "model.onnx", project / "local", _config(project))
    distributed = optimize(project / "model.onnx", project / "ray", _config(project, ray_address="local"))
    assert "Ray" in distributed.executor
    key = lambda r: (r["describe"], r["sha256"], r["quality"], r["bytes"])  # noqa: E731
    assert sorted(map(key, distributed.front)) == sorted(map(key, local.front))
    assert distributed.best["sha256"] == local.best["sha256"]
    assert all(r.get("timed_on") for r in distributed.trials if r["status"] == "ok")


def test_the_space_comes_from_the_registry():
    space = SearchSpace("cpu")
    assert set(space.knobs) >= {"prune_channels", "low_rank", "quantize"}
    phases = [p.name for p in sorted(space.phases)]
    assert phases.index("STRUCTURE") < phases.index("PRECISION")
    seeds = space.seeds()
    schemes = {json.dumps(s["quantize.schemes"]) for s in seeds if s.get("precision") == "quantize"}
    assert len(schemes) == len(space.knobs["quantize"][0].choices)  # every scheme alone is a seed
    assert {"structure": "none", "precision": "none", **{}}.items() <= seeds[0].items()


def test_report_scatter_renders_in_chromium(project, tmp_path):
    from browser import _find_or_install_chromium
    from browser import run_chromium as _chromium

    binary = _find_or_install_chromium()
    if binary is None:
        pytest.skip("headless Chromium is not available here")
    optimize(project / "model.onnx", project / "run", _config(project))
    page = project / "run" / "report.html"
    dom = _chromium(binary, "--virtual-time-budget=2000", "--dump-dom", page.as_uri()).stdout
    assert dom.count('class="point') >= 2  # every ok trial is a point
    assert ('class="point best"' in dom and "front-line" in dom) or 'class="point best"' in dom
    shot = tmp_path / "report.png"
    _chromium(binary, "--window-size=1200,1400", f"--screenshot={shot}", page.as_uri())
    assert shot.exists() and shot.stat().st_size > 5000


def test_a_recipe_search_section_is_the_same_search(project, cli):
    (project / "search.yaml").write_text(textwrap.dedent("""
        model: model.onnx
        calibration: calib.npz
        eval: eval.npz
        search:
          max_drop: 0.0
          objective: size
          strategy: grid
          passes: [prune_channels]
          space: {prune_channels.ratio: [0.5, 0.75], prune_channels.importance: [l2]}
          latency_rounds: 3
    """))
    code, out, err = cli("optimize", project / "search.yaml", "-o", project / "from_recipe", "--json", "-")
    assert code == 0, err
    from_recipe = json.loads(out)
    direct = optimize(project / "model.onnx", project / "direct", _config(project))
    assert from_recipe["best"]["sha256"] == direct.best["sha256"]
    assert from_recipe["best"]["plan"]["prune_channels.ratio"] == 0.5


def test_a_framework_source_is_exported_once_and_searched(tmp_path, torch_model_file):
    from onnxforge.pipeline.cache import StageCache

    write_npz(tmp_path / "calib.npz", **{"input": random_images(32, seed=1)})
    write_npz(tmp_path / "eval.npz", **{"input": random_images(48, seed=2)})
    config = OptimizeConfig(
        calibration=DataSpec(path=tmp_path / "calib.npz"), eval_data=DataSpec(path=tmp_path / "eval.npz"),
        metric=Metric.AGREEMENT, tolerance=20.0, objective=Objective.SIZE, strategy=Strategy.GRID,
        # one trial: a share of float nodes makes this tiny model's int8 no smaller than fp32 (the input is kept,
        # a gate failure, which is not cached)
        passes=("quantize",), space={"quantize.schemes": (["qdq-u8s8-per-channel"],), "quantize.float_share": (0.0,)},
        input_shapes={"input": (1, 3, 8, 8)}, latency_rounds=3,
    )
    cache = StageCache(tmp_path / "cache")
    result = optimize(f"{torch_model_file}:build", tmp_path / "run", config, cache=cache)
    assert (tmp_path / "run" / "input_export.onnx").exists()  # the reference is the exported model
    assert result.best is not None and result.best["describe"].startswith("quantize")
    again = optimize(f"{torch_model_file}:build", tmp_path / "run2", config, cache=cache)
    assert again.best["sha256"] == result.best["sha256"]
    assert all(s["cache"] == "cached" or s["cache"].startswith(("unchanged", "restored"))
               for r in again.trials for s in r.get("stages", []))  # every stage came from the cache


def test_the_input_model_runs_once_on_the_eval_data_however_many_trials(project, monkeypatch):
    """The gate, every trial's score and every trial's timing measure against one Reference: the input
    model's outputs on the eval data are computed once in the process, and timing goes through it."""
    from onnxforge.pipeline import reference

    model = str((project / "model.onnx").resolve())
    runs: list[str] = []
    original = reference.run_outputs

    def counting(session, samples, batch_size):
        runs.append(str(Path(getattr(session, "_model_path", "") or "bytes").resolve()))
        return original(session, samples, batch_size)

    timed = []
    time_against = reference.Reference.time_against

    def spying(self, candidates, **kwargs):
        if isinstance(self.model, (str, Path)):  # not a prune stage's own check (a ModelProto)
            timed.append((str(Path(self.model).resolve()), list(candidates)))
        return time_against(self, candidates, **kwargs)

    monkeypatch.setattr(reference, "run_outputs", counting)
    monkeypatch.setattr(reference.Reference, "time_against", spying)
    result = optimize(project / "model.onnx", project / "run",
                      _config(project, objective=Objective.LATENCY, space={"prune_channels.ratio": (0.25, 0.5, 0.75),
                                                                           "prune_channels.importance": ("l2",)}))
    ok = [r for r in result.trials if r["status"] == "ok"]
    assert len(ok) >= 3 and all("ratio" in r for r in ok), [r.get("error") for r in result.trials]
    assert runs.count(model) == 1
    trials = [(path, names) for path, names in timed if names == ["trial"]]
    assert len(trials) >= 3 and all(path == model for path, _ in trials)  # every trial timed against the input
