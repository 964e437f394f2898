"""The stage cache on a shared disk (issue 22): it never follows a link, never trusts another user's or a
group-writable folder, serves only entries signed with the user's key, deletes only what it can prove is
an entry, stays under its size cap, and a cache it cannot write never fails a run."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import textwrap
from pathlib import Path

import pytest

from onnxforge.pipeline.cache import StageCache
from onnxforge.pipeline.recipe import load_recipe
from onnxforge.pipeline.runner import run_recipe

RECIPE = """
name: trust
model: classifier.onnx
calibration: calib.npz
stages:
  - simplify
  - prune_channels: {name: half, ratio: 0.5, metric: agreement, tolerance: 100}
"""


@pytest.fixture
def project(tmp_path, classifier_path, calibration_npz) -> Path:
    (tmp_path / "recipe.yaml").write_text(textwrap.dedent(RECIPE))
    return tmp_path


def _run(project: Path, cache: StageCache, run_dir: str = "run", **kwargs):
    return run_recipe(load_recipe(project / "recipe.yaml"), project / run_dir, measure=False, cache=cache, **kwargs)


def _entry(cache_root: Path, key: str) -> Path:
    return cache_root / key[:2] / key


def _key(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def _model(tmp_path: Path, n: int, size: int = 1000) -> Path:
    path = tmp_path / f"m{n}.onnx"
    path.write_bytes(bytes([n % 256]) * size)
    return path


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# --clear deletes only entries


def test_clear_on_a_folder_that_is_not_a_cache_deletes_nothing(tmp_path, cli):
    project = tmp_path / "PROJECT"
    for name in ("go/src/main.go", "db/data/table.bin", "ab/cd/notes.txt", "README.md"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(name)
    before = _tree(project)
    code, out, _ = cli("cache", "--clear", "--cache-dir", project)
    assert code == 0 and "removed 0" in out and "left 4 items" in out
    assert _tree(project) == before


def test_a_symlinked_shard_or_entry_is_never_followed_or_deleted_through(tmp_path, cli):
    cache_root, photos = tmp_path / "cache", tmp_path / "photos"
    cache = StageCache(cache_root)
    cache.publish(_key(1), _model(tmp_path, 1), {"result": {}})
    (photos / _key(2)).mkdir(parents=True)
    (photos / _key(2) / "holiday.jpg").write_bytes(b"jpeg")
    (photos / "cat.jpg").write_bytes(b"jpeg")
    (cache_root / "zz").symlink_to(photos)  # a planted shard
    (cache_root / _key(2)[:2]).symlink_to(photos)  # a shard whose entry name matches
    before = _tree(photos)
    assert cache.usage()[0] == 1
    assert not cache.lookup(_key(2)).hit
    code, out, _ = cli("cache", "--clear", "--cache-dir", cache_root)
    assert code == 0 and "removed 1" in out
    assert _tree(photos) == before and (cache_root / "zz").is_symlink()


# ----------------------------------------------------------------------------------------------
# entries are signed with a key outside the cache


def test_a_rehashed_entry_is_detected_discarded_and_recomputed(project, tmp_path):
    cache = StageCache(tmp_path / "cache")
    first = _run(project, cache)
    key = first.stages[1].key
    folder = _entry(tmp_path / "cache", key)
    planted = (project / "run" / "01_simplify.onnx").read_bytes()  # another valid model
    (folder / "model.onnx").write_bytes(planted)
    entry = json.loads((folder / "entry.json").read_text())
    entry["files"]["model.onnx"] = hashlib.sha256(planted).hexdigest()  # the sha256 updated beside it
    (folder / "entry.json").write_text(json.dumps(entry))
    messages = []
    result = _run(project, StageCache(tmp_path / "cache"), "run2",
                  progress=lambda event: messages.append(event.describe()))
    assert result.stages[1].status == "done"
    assert "not signed" in result.stages[1].cache
    assert result.stages[1].output["sha256"] == first.stages[1].output["sha256"]
    assert _run(project, StageCache(tmp_path / "cache"), "run3").stages[1].status == "cached"


def test_an_entry_whose_model_is_a_symlink_never_copies_its_target(project, tmp_path):
    cache = StageCache(tmp_path / "cache")
    first = _run(project, cache)
    key = first.stages[1].key
    folder = _entry(tmp_path / "cache", key)
    secret = tmp_path / "id_rsa"
    secret.write_bytes(b"PRIVATE KEY")
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").symlink_to(secret)
    entry = json.loads((folder / "entry.json").read_text())
    entry["files"]["model.onnx"] = hashlib.sha256(b"PRIVATE KEY").hexdigest()
    (folder / "entry.json").write_text(json.dumps(entry))
    result = _run(project, StageCache(tmp_path / "cache"), "run2")
    assert result.stages[1].status == "done"
    assert b"PRIVATE KEY" not in (project / "run2" / result.stages[1].output["path"]).read_bytes()
    assert secret.read_bytes() == b"PRIVATE KEY"


def test_a_planted_entry_without_the_key_is_not_served(tmp_path, monkeypatch):
    cache = StageCache(tmp_path / "cache")
    cache.publish(_key(1), _model(tmp_path, 1), {"result": {"x": 1}})
    assert cache.lookup(_key(1)).hit
    other_key = tmp_path / "other.key"
    monkeypatch.setenv("ONNXFORGE_CACHE_KEY_FILE", str(other_key))  # another user's key, or none
    lookup = StageCache(tmp_path / "cache").lookup(_key(1))
    assert not lookup.hit and "not signed" in lookup.reason


def test_the_key_file_is_created_private_outside_the_cache(tmp_path):
    StageCache(tmp_path / "cache").publish(_key(1), _model(tmp_path, 1), {"result": {}})
    key_file = Path(os.environ["ONNXFORGE_CACHE_KEY_FILE"])
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and key_file.stat().st_size == 32
    assert not any(p.name.endswith(".key") for p in (tmp_path / "cache").rglob("*"))


def test_a_rehashed_record_is_ignored(tmp_path):
    cache = StageCache(tmp_path / "cache")
    cache.save_record("quantize-timings", "k1", {"fp32": {"p50_ms": 1.5}})
    path = next((tmp_path / "cache").rglob("k1.json"))
    stored = json.loads(path.read_text())
    stored["data"] = {"fp32": {"p50_ms": 0.1}}
    stored["sha256"] = hashlib.sha256(json.dumps(stored["data"], sort_keys=True, separators=(",", ":"))
                                      .encode()).hexdigest()
    path.write_text(json.dumps(stored))
    assert cache.record("quantize-timings", "k1") is None


def test_a_planted_records_link_is_never_written_through(tmp_path):
    cache_root, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    cache_root.mkdir()
    elsewhere.mkdir()
    (cache_root / "records").symlink_to(elsewhere)
    cache = StageCache(cache_root)
    cache.save_record("quantize-timings", "k1", {"x": 1})
    assert list(elsewhere.iterdir()) == [] and cache.record("quantize-timings", "k1") is None


# ----------------------------------------------------------------------------------------------
# ownership and permissions


def test_entries_of_another_user_are_ignored_and_never_deleted(tmp_path, monkeypatch):
    cache_root = tmp_path / "cache"
    StageCache(cache_root).publish(_key(1), _model(tmp_path, 1), {"result": {}})
    before = _tree(cache_root)
    uid = os.getuid()
    shard = _entry(cache_root, _key(1)).parent
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)  # now the cache looks like someone else's
    os.chown(cache_root, uid + 1, -1)  # the root is "ours" again: only the shard and entry are foreign
    cache = StageCache(cache_root)
    assert not cache.lookup(_key(1)).hit
    assert cache.clear() == (0, 1) and _tree(cache_root) == before and shard.is_dir()


def test_a_group_writable_root_is_untrusted_and_the_run_goes_on_without_it(project, tmp_path, caplog):
    cache_root = tmp_path / "cache"
    cache_root.mkdir()
    cache_root.chmod(0o777)
    cache = StageCache(cache_root)
    with caplog.at_level(logging.WARNING):
        result = _run(project, cache)
    assert {s.status for s in result.stages} == {"done"}
    warnings = [r.getMessage() for r in caplog.records if "group or others" in r.getMessage()]
    assert len(warnings) == 1
    assert list(cache_root.iterdir()) == []  # nothing published into it
    cache_root.chmod(0o1777)  # with the sticky bit nobody else can rename or delete what is ours
    assert {s.status for s in _run(project, StageCache(cache_root)).stages} == {"done"}
    assert {s.status for s in _run(project, StageCache(cache_root), "run2").stages} == {"cached"}


# ----------------------------------------------------------------------------------------------
# a size cap, least recently used out first


def test_the_cache_stays_under_its_cap_across_20_publishes(tmp_path):
    cache = StageCache(tmp_path / "cache")
    cache.set_max_size(5000)  # about four 1000-byte entries with their entry.json
    for n in range(20):
        cache.publish(_key(n), _model(tmp_path, n), {"result": {"n": n}})
        assert cache.lookup(_key(0)).hit  # used on every run: never the least recently used
        assert cache.usage()[1] <= 5000
    assert cache.usage()[0] >= 3
    assert cache.lookup(_key(0)).hit and cache.lookup(_key(19)).hit and not cache.lookup(_key(5)).hit


def test_the_cap_is_kept_in_the_cache_and_a_tampered_setting_is_ignored(tmp_path, cli):
    cache_root = tmp_path / "cache"
    code, out, _ = cli("cache", "--max-size", "10K", "--cache-dir", cache_root)
    assert code == 0 and "10.0 KB" in out
    assert StageCache(cache_root).max_size() == 10 << 10
    code, out, _ = cli("cache", "--cache-dir", cache_root)
    assert code == 0 and "0 stage outputs" in out and "cap 10.0 KB" in out and str(cache_root) in out
    settings = cache_root / "settings.json"
    settings.write_text(settings.read_text().replace(str(10 << 10), str(1 << 40)))
    assert StageCache(cache_root).max_size() == 2 << 30  # the default, not the planted terabyte


def test_a_run_stays_under_the_cap_across_20_runs(project, tmp_path, monkeypatch):
    cache_root = tmp_path / "cache"
    cache = StageCache(cache_root)
    _run(project, cache)
    one_run = cache.usage()[1]
    cache.set_max_size(one_run + one_run // 2)  # room for one run's stages, not two
    for n in range(20):
        (project / "recipe.yaml").write_text(textwrap.dedent(RECIPE).replace("ratio: 0.5", f"ratio: 0.{n + 10}"))
        _run(project, StageCache(cache_root), f"run{n}")
        assert StageCache(cache_root).usage()[1] <= one_run + one_run // 2


# ----------------------------------------------------------------------------------------------
# a read-only or full cache


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_a_cache_that_cannot_be_written_degrades_to_running_without_it(project, tmp_path, monkeypatch, caplog, code):
    import onnxforge.pipeline.cache as cache_module

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "cache"))

    monkeypatch.setattr(cache_module, "mkdtemp", refuse)
    with caplog.at_level(logging.WARNING):
        result = _run(project, StageCache(tmp_path / "cache"))
    assert {s.status for s in result.stages} == {"done"}
    warnings = [r.getMessage() for r in caplog.records if "running without it" in r.getMessage()]
    assert len(warnings) == 1 and os.strerror(code) in warnings[0] and "01_simplify" not in warnings[0]


def test_a_cache_root_that_cannot_be_created_degrades_to_running_without_it(project, tmp_path, monkeypatch, caplog):
    real_mkdir = os.mkdir

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    with caplog.at_level(logging.WARNING):
        result = _run(project, StageCache(tmp_path / "ro" / "cache"))
    assert {s.status for s in result.stages} == {"done"}
    assert len([r for r in caplog.records if "running without it" in r.getMessage()]) == 1
