"""Trial records: written by the codec with only the keys a trial reached, and read back checked."""

from __future__ import annotations

import json

import pytest

from onnxforge.errors import RecipeError
from onnxforge.pipeline.search.records import TrialRecord, TrialStage


def test_a_trial_cut_short_writes_only_what_it_reached():
    record = TrialRecord(number=3, plan={"structure": "prune_channels"}, describe="prune_channels")
    record.stages = (TrialStage(kind="prune_channels", status="done", cache="not cached", seconds=1.23456,
                                config={"ratio": 0.5}, summary="50% of channels removed"),)
    record.distilled, record.training_seconds = False, 0
    record.status, record.error, record.seconds = "failed", "RuntimeError: boom", 2.5
    data = record.to_json()
    assert list(data) == ["number", "plan", "describe", "status", "stages", "distilled", "training_seconds", "error",
                          "seconds"]
    assert data["stages"] == [{"kind": "prune_channels", "status": "done", "cache": "not cached", "seconds": 1.235,
                               "config": {"ratio": 0.5}, "summary": "50% of channels removed"}]


def test_a_measured_record_reads_back_with_the_search_keys_apart():
    record = TrialRecord(number=1, plan={}, describe="input model (simplified)", quality=0.9, loss=0.0,
                         within_budget=True, bytes=1000, sha256="ab", params=None, macs_estimate=None,
                         reference_ms=2.0, model_ms=1.0, ratio=0.5, speedup=2.0, path="t.onnx", seconds=0.1)
    data = json.loads(json.dumps({**record.to_json(), "on_front": True}))
    back, added = TrialRecord.from_json(data)
    assert back == record and added == {"on_front": True}
    assert back.to_json()["params"] is None  # counted as "could not be counted", not left out


@pytest.mark.parametrize(("data", "message"), [
    ({"plan": {}, "describe": "x", "status": "ok"}, "no 'number'"),
    ({"number": 1, "plan": {}, "describe": "x", "status": "ok", "ratio": "fast"}, "trial record.ratio"),
    ({"number": 1, "plan": {}, "describe": "x", "status": "ok", "stages": [{"kind": "simplify"}]}, "stages[0]"),
])
def test_a_damaged_record_is_refused_naming_the_key(data, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TrialRecord.from_json(data)
