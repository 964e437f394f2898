"""prune_channels reports its phases with counts: the quality check, the repair's two passes over the
calibration batches and its least-squares refit layer by layer (a CI log is not silent through them)."""

from __future__ import annotations

from conftest import make_classifier, random_images, save, write_npz

from onnxforge.pipeline.data_spec import DataSpec
from onnxforge.pipeline.progress import ProgressEvent
from onnxforge.pipeline.prune.channels import ChannelPruneConfig, prune_channels


def test_the_repair_reports_its_batches_and_layers(tmp_path):
    model = save(make_classifier(channels=8), tmp_path / "m.onnx")
    calibration = write_npz(tmp_path / "calib.npz", x=random_images(40, seed=1))
    events: list[ProgressEvent] = []
    config = ChannelPruneConfig(ratio=0.5, round_to=1, calibration_data=DataSpec(path=calibration), gate=False)
    prune_channels(model, tmp_path / "pruned.onnx", config, progress=events.append)
    phases = [e.phase for e in events]
    assert phases.index("scoring the input model") < phases.index("try 1: pruning")
    for phase in ("repair: layer outputs (pass 1/2)", "repair: layer inputs (pass 2/2)", "repair: least-squares refit"):
        counts = [(e.done, e.total) for e in events if e.phase == phase]
        assert counts and counts[0][0] == 0 and counts[-1][0] == counts[-1][1] > 0, (phase, counts)
        assert [done for done, _ in counts] == list(range(len(counts)))  # one event per batch or layer
    assert "quality check" in phases
