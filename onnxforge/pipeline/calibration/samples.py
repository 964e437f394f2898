"""Samples in memory (SampleSet) or read file by file (StreamedSamples), and batching by shape.

Variable-length samples are kept as *ragged* sets (object arrays of per-sample arrays) and fed in
batches of equal shape: never padded, so padding values cannot distort calibration ranges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxforge.errors import CalibrationDataError
from onnxforge.pipeline.calibration.feeding import Feeding

__all__ = [
    "LABEL_KEY", "Sample", "SampleSet", "StreamedSamples", "as_labels", "group_batches", "object_array", "split_bounds",
]

LABEL_KEY = "label"


Sample = dict[str, np.ndarray]  # one sample: input name -> array without the sample axis


def split_bounds(n: int, holdout_fraction: float, max_fit: int | None, max_held: int | None) -> tuple[int, int]:
    """(fit, held): how many of ``n`` samples fit and how many are held out to check quality.

    The last ``holdout_fraction`` is held out. ``max_fit`` / ``max_held`` cap each part; then both
    come from the start of the set, the held-out samples right after the fit ones, so that a
    130,000-sample file used for 64 samples is read 80 samples deep, not held out 26,000 deep.
    """
    held = max(1, round(n * holdout_fraction))
    if max_held is not None:
        held = min(held, max(1, max_held))
    fit = n - held if max_fit is None else min(n - held, max_fit)
    return max(0, fit), min(held, n)


def _signature(sample: Mapping[str, np.ndarray]) -> tuple:
    return tuple((k, v.shape) for k, v in sample.items())


def _stack(samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(np.stack([s[k] for s in samples])) for k in samples[0]}


def group_batches(
    samples: Iterable[Mapping[str, np.ndarray]], batch_size: int, *, max_pending: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Samples of equal shapes stacked in batches of at most ``batch_size``; never padded.

    Samples wait in one bucket per shape until the bucket is full; when ``max_pending`` samples
    (default 8 batches) wait in all, the fullest bucket goes out early. Memory is thus bounded,
    and variable-length sequences still make mostly full batches. Order is not kept (calibration
    does not need it); it is deterministic.
    """
    limit = max_pending if max_pending is not None else 8 * batch_size
    buckets: dict[tuple, list[Mapping[str, np.ndarray]]] = {}
    pending = 0
    for sample in samples:
        bucket = buckets.setdefault(_signature(sample), [])
        bucket.append(sample)
        pending += 1
        if len(bucket) == batch_size:
            yield _stack(buckets.pop(_signature(sample)))
            pending -= batch_size
        elif pending > limit:
            key = max(buckets, key=lambda k: len(buckets[k]))
            pending -= len(buckets[key])
            yield _stack(buckets.pop(key))
    for bucket in buckets.values():
        yield _stack(bucket)


@dataclass(frozen=True)
class SampleSet:
    """Samples in memory, keyed by model input name, plus optional labels (class ids, or text for a user metric).

    Each input is either one array with samples on the first axis, or (a *ragged* set, for
    variable-length inputs) an object array holding one array per sample, without the sample axis.
    ``feeding`` turns a batch of them into the model's feeds (constants, batches on another axis);
    every batch this class yields is ready to feed.
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    feeding: Feeding = field(default_factory=Feeding)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    @property
    def class_labels(self) -> np.ndarray | None:
        """The labels when they are class ids (what accuracy compares predictions with); None without
        labels or when they are text, which only a user metric (file.py:function) reads."""
        return self.labels if self.labels is not None and self.labels.dtype.kind in "biu" else None

    @property
    def is_ragged(self) -> bool:
        return any(v.dtype == object for v in self.inputs.values())

    def take(self, index: slice | np.ndarray) -> SampleSet:
        labels = None if self.labels is None else self.labels[index]
        return SampleSet({k: v[index] for k, v in self.inputs.items()}, labels, self.source, self.feeding)

    def split(
        self, holdout_fraction: float, *, max_fit: int | None = None, max_held: int | None = None
    ) -> tuple[SampleSet, SampleSet]:
        """(fit part, held-out part); see ``split_bounds``. Deterministic, keeps order."""
        fit, held = split_bounds(len(self), holdout_fraction, max_fit, max_held)
        return self.take(slice(0, fit)), self.take(slice(fit, fit + held))

    def materialize(self) -> SampleSet:
        return self

    def sample(self, i: int) -> Sample:
        return {k: np.asarray(v[i]) for k, v in self.inputs.items()}

    def samples(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self.sample(i)

    def indexed_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """(sample indices, batch): in order for a regular set; a ragged set is grouped by shape
        (stable, so deterministic), each group cut into batches of at most ``batch_size``."""
        n = len(self)
        if not self.is_ragged:
            for start in range(0, n, batch_size):
                idx = np.arange(start, min(n, start + batch_size))
                stacked = {k: np.ascontiguousarray(v[start : start + batch_size]) for k, v in self.inputs.items()}
                yield idx, self.feeding.feeds(stacked)
            return
        groups: dict[tuple, list[int]] = {}
        for i in range(n):
            groups.setdefault(_signature(self.sample(i)), []).append(i)
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                idx = np.asarray(members[start : start + batch_size])
                yield idx, self.feeding.feeds(_stack([self.sample(int(i)) for i in idx]))

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for _, batch in self.indexed_batches(batch_size):
            yield batch

    def first_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """Feeds of ``batch_size`` samples from the start, repeated cyclically when there are fewer
        (a ragged set: from its first group of equal shapes)."""
        first = next(self.batches(batch_size))
        return self.feeding.resized(first, batch_size)


class StreamedSamples:
    """Samples read from a list of files, one file (at most) in memory at a time.

    ``reader(file, start, stop)`` returns samples ``[start, stop)`` of a file as arrays keyed by
    input name with samples on the first axis (and an optional ``label``), already checked, reading
    no more of the file than it must; ``counter(file)`` says how many samples a file holds without
    decoding it. ``take``/``split`` give lazy views; ``materialize`` loads a view.
    """

    def __init__(
        self,
        source: str,
        files: Sequence[Path],
        reader: Callable[[Path, int, int], dict[str, np.ndarray]],
        counter: Callable[[Path], int],
        *,
        start: int = 0,
        stop: int | None = None,
        _counts: list[int] | None = None,
        feeding: Feeding | None = None,
    ) -> None:
        self.source = source
        self.feeding = feeding or Feeding()
        self._files = list(files)
        self._reader = reader
        self._counter = counter
        self._counts = _counts
        self._start = start
        self._stop = stop

    labels = None  # labels of a stream are only read when it is materialized

    @property
    def counts(self) -> list[int]:
        if self._counts is None:
            self._counts = [self._counter(f) for f in self._files]
        return self._counts

    def __len__(self) -> int:
        total = sum(self.counts)
        stop = total if self._stop is None else min(self._stop, total)
        return max(0, stop - self._start)

    def take(self, index: slice) -> StreamedSamples:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("a streamed sample set takes contiguous slices only")
        start, stop, _ = index.indices(len(self))
        return StreamedSamples(
            self.source, self._files, self._reader, self._counter,
            start=self._start + start, stop=self._start + max(start, stop), _counts=self.counts,
            feeding=self.feeding,
        )

    def split(
        self, holdout_fraction: float, *, max_fit: int | None = None, max_held: int | None = None
    ) -> tuple[StreamedSamples, StreamedSamples]:
        """(fit part, held-out part) as lazy views; see ``split_bounds``."""
        fit, held = split_bounds(len(self), holdout_fraction, max_fit, max_held)
        return self.take(slice(0, fit)), self.take(slice(fit, fit + held))

    def _chunks(self) -> Iterator[dict[str, np.ndarray]]:
        """Each file's arrays, cut to this view's sample range; files outside it are not read."""
        position = 0
        stop = self._start + len(self)
        for path, count in zip(self._files, self.counts, strict=True):
            lo, hi = max(self._start, position), min(stop, position + count)
            if lo < hi:
                yield self._reader(path, lo - position, hi - position)
            position += count
            if position >= stop:
                return

    def samples(self) -> Iterator[Sample]:
        for chunk in self._chunks():
            inputs = {k: v for k, v in chunk.items() if k != LABEL_KEY}
            for i in range(len(next(iter(inputs.values())))):
                yield {k: v[i] for k, v in inputs.items()}

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        return map(self.feeding.feeds, group_batches(self.samples(), batch_size))

    def first_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        head = self.take(slice(0, batch_size))  # reads these rows only, not the rest of the first file
        return self.feeding.resized(next(head.batches(batch_size)), batch_size)

    def materialize(self) -> SampleSet:
        """Load this view into memory (ragged when the files' shapes differ)."""
        chunks = list(self._chunks())
        if not chunks:
            raise CalibrationDataError(f"{self.source}: no samples")
        names = [k for k in chunks[0] if k != LABEL_KEY]
        labels = None
        if all(LABEL_KEY in c for c in chunks):
            labels = np.concatenate([as_labels(c[LABEL_KEY]) for c in chunks])
        inputs = {}
        for name in names:
            parts = [c[name] for c in chunks]
            if len({p.shape[1:] for p in parts}) == 1:
                inputs[name] = np.concatenate(parts)
            else:
                inputs[name] = object_array([row for p in parts for row in p])
        return SampleSet(inputs, labels, self.source, self.feeding)


def object_array(items: Sequence[np.ndarray]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def as_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    return labels.reshape(len(labels), -1)[:, 0] if labels.ndim > 1 else labels
