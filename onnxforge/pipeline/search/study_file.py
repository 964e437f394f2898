"""A run folder's ``study.log`` (Optuna's journal) and the trial records in it, checked before trusted.

The journal is a file in a folder a user can edit, copy or damage; resuming reads it. So:

* every line must be a JSON object Optuna wrote (``{"op_code": …}``); a last line cut mid-write (no
  newline: the power went out) is dropped, with a warning, before Optuna appends after it; anything
  else (binary data, a line that is not a journal record) is refused (exit 2) and left as it is;
* every trial record decodes into ``TrialRecord`` through the config codec: a record that does not
  fit is refused, naming the trial and the field;
* a record's model file is stored relative to the run folder (``trials/0003.onnx``), so a run
  resumes from any working folder, and it must resolve inside ``RUN_DIR/trials``: a record naming
  any other file is not trusted — that file is never read, copied or deleted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from onnxforge._atomic import atomic_write_bytes
from onnxforge.errors import RecipeError, UsageError
from onnxforge.pipeline import codec

__all__ = ["TRIALS_DIR", "TrialRecord", "check_journal", "stored_path", "trial_file", "trial_records"]

TRIALS_DIR = "trials"
_LEGACY_NAME = re.compile(r"^\d{4}\.onnx$")  # trial files are trials/NNNN.onnx
_HINT = "use another -o folder to start a new search (this one is left as it is)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrialRecord:
    """The fields of a trial record the search relies on (the record carries more, for the report)."""

    number: int
    status: str
    describe: str
    path: str | None = None
    sha256: str | None = None
    loss: float | None = None
    bytes: int | None = None
    ratio: float | None = None
    within_budget: bool | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.number < 0:
            raise ValueError(f"number {self.number} is negative")
        if self.status not in ("ok", "failed"):
            raise ValueError(f"status {self.status!r} is not ok/failed")
        if self.status == "ok":
            missing = [k for k in ("sha256", "loss", "bytes", "ratio", "within_budget") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"a completed trial without {', '.join(missing)}")


def check_journal(path: Path) -> str | None:
    """Refuse a ``study.log`` that is not Optuna's journal; drop a last line cut mid-write.

    Returns the warning to show when a line was dropped, else None. Raises UsageError (exit 2).
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{path}: cannot read the study: {e.strerror or e}") from e
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    for number, line in enumerate(lines, start=1):
        if not _journal_line(line):
            raise UsageError(f"{path}: line {number} is not a study record written by onnxforge; the file is damaged",
                             hint=_HINT)
    if not tail:
        return None
    if not lines or not tail.startswith(b'{"op_code"'):  # garbage, not a record cut short
        raise UsageError(f"{path}: line {len(lines) + 1} is not a study record written by onnxforge; "
                         "the file is damaged", hint=_HINT)
    atomic_write_bytes(path, data[: len(data) - len(tail)])
    return f"{path.name}: its last line was cut mid-write (an interrupted run) and was dropped"


def _journal_line(line: bytes) -> bool:
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(value, dict) and isinstance(value.get("op_code"), int)


def stored_path(run_dir: Path, model: Path) -> str:
    """How a trial's model file is written in its record: relative to the run folder."""
    return Path(os.path.relpath(model, run_dir)).as_posix()


def trial_file(run_dir: Path, stored: str) -> Path | None:
    """The trial model a record names, when it lies inside ``RUN_DIR/trials``; None for anything else.

    Records of older runs hold the path as given then (absolute, or relative to that run's working
    folder): their ``NNNN.onnx`` is looked up in this run's trials folder.
    """
    trials = Path(os.path.realpath(run_dir / TRIALS_DIR))
    given = Path(stored)
    candidates = [given if given.is_absolute() else run_dir / given]
    if _LEGACY_NAME.match(given.name):
        candidates.append(run_dir / TRIALS_DIR / given.name)
    for candidate in candidates:
        if candidate.is_symlink() or not candidate.is_file():
            continue
        if Path(os.path.realpath(candidate)).parent == trials:
            return run_dir / TRIALS_DIR / candidate.name
    return None


def trial_records(raw: list[dict[str, Any]], run_dir: Path, study_path: Path,
                  notes: list[str] | None = None) -> list[dict[str, Any]]:
    """The records of a study, each checked against ``TrialRecord``; ``path`` is made relative to the run
    folder, or None (with a note) when it names a file outside ``RUN_DIR/trials`` or one that is gone."""
    records = []
    for record in raw:
        if not isinstance(record, dict):
            raise UsageError(f"{study_path}: a trial record is not a mapping; the file is damaged", hint=_HINT)
        fields = {f.name for f in dataclasses.fields(TrialRecord)}
        where = f"trial {record.get('number', '?')}"
        try:
            checked = codec.decode_dataclass(TrialRecord, {k: v for k, v in record.items() if k in fields}, where, None)
        except RecipeError as e:
            raise UsageError(f"{study_path}: {e.message}; the file is damaged", hint=_HINT) from e
        if not isinstance(record.get("plan"), dict):
            raise UsageError(f"{study_path}: {where}.plan: expected a mapping; the file is damaged", hint=_HINT)
        record = dict(record)
        if checked.path is not None:
            found = trial_file(run_dir, checked.path)
            foreign = not _LEGACY_NAME.match(Path(checked.path).name)  # not a trial file gone since
            if found is None and foreign and notes is not None:
                notes.append(f"trial {checked.number}: its file {checked.path} is not in {run_dir / TRIALS_DIR}; "
                             "ignored (never read or deleted)")
            record["path"] = stored_path(run_dir, found) if found is not None else None
        records.append(record)
    return records
