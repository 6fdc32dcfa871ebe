"""Metrics between a reference tensor and a tensor that should hold the same values.

Pure numpy. Every metric accumulates in float64 and is defined for all-zero tensors; NaN and
Inf are counted, not propagated into a crash.

>>> m = compare(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.5]))
>>> round(m.cosine, 4), round(m.sqnr_db, 1), m.max_abs
(0.9974, 17.5, 0.5)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


CHUNK = 1 << 16  # elements summed at a time


@dataclass(frozen=True)
class Metrics:
    """How close ``actual`` is to ``reference``.

    ``cosine`` is 1.0 when both are all zeros and 0.0 when only one is; ``sqnr_db`` is the
    signal-to-quantization-noise ratio in dB (inf when equal); ``nonfinite`` counts elements
    where NaN/Inf appear in one tensor and not identically in the other; when it is non-zero,
    ``cosine`` and ``sqnr_db`` are NaN, which never passes a threshold.
    """

    cosine: float
    sqnr_db: float
    mse: float
    max_abs: float
    nonfinite: int = 0


def compare(reference: np.ndarray, actual: np.ndarray) -> Metrics:
    """Compare two arrays of the same shape."""
    ref = np.asarray(reference).ravel()
    act = np.asarray(actual).ravel()
    if ref.shape != act.shape:
        raise ValueError(f"cannot compare arrays of {ref.size} and {act.size} elements")
    with np.errstate(invalid="ignore", over="ignore"):  # Inf - Inf: looked at below
        signal, actual_square, product, noise, max_abs = _sums(ref, act)
    if not math.isfinite(signal + actual_square + noise):  # NaN or Inf somewhere: a second look
        ref, act, nonfinite = _finite_part(ref, act)
        if nonfinite:
            error = act - ref
            return Metrics(math.nan, math.nan, _mean_square(error), _max_abs(error), nonfinite)
        signal, actual_square, product, noise, max_abs = _sums(ref, act)
    return Metrics(
        cosine=_cosine(signal, actual_square, product),
        sqnr_db=_sqnr_db(signal, noise),
        mse=noise / ref.size if ref.size else 0.0,
        max_abs=max_abs,
    )


def _sums(ref: np.ndarray, act: np.ndarray) -> tuple[float, float, float, float, float]:
    """Sums of squares and products in float64, a chunk at a time: no float64 copy of whole
    tensors, and chunks that stay in cache. The product comes from the three sums of squares
    (``r.a = (r.r + a.a - e.e) / 2``): in float64, float32 data loses nothing that matters."""
    ref_square = act_square = noise = max_abs = 0.0
    for start in range(0, ref.size, CHUNK):
        r = ref[start:start + CHUNK].astype(np.float64)
        a = act[start:start + CHUNK].astype(np.float64)
        e = a - r
        ref_square += _dot(r, r)
        act_square += _dot(a, a)
        noise += _dot(e, e)
        max_abs = max(max_abs, float(np.abs(e).max()))
    return ref_square, act_square, (ref_square + act_square - noise) / 2, noise, max_abs


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    """``x @ y`` without BLAS: OpenBLAS spreads even a 64 Ki-element dot over its threads,
    which on a busy machine made compare 4 to 12 times slower than numpy's own loop."""
    return float(np.einsum("i,i->", x, y))


def _finite_part(ref: np.ndarray, act: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The elements finite in both, and how many NaN/Inf differ between the two."""
    ref, act = ref.astype(np.float64), act.astype(np.float64)
    finite_ref, finite_act = np.isfinite(ref), np.isfinite(act)
    both = finite_ref & finite_act
    same_special = ~both & (finite_ref == finite_act) & ((ref == act) | (np.isnan(ref) & np.isnan(act)))
    return ref[both], act[both], int(np.count_nonzero(~both & ~same_special))


def _cosine(ref_square: float, act_square: float, product: float) -> float:
    if ref_square == 0.0 and act_square == 0.0:
        return 1.0
    if ref_square == 0.0 or act_square == 0.0:
        return 0.0
    return max(-1.0, min(1.0, product / math.sqrt(ref_square * act_square)))


def _sqnr_db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _mean_square(error: np.ndarray) -> float:
    return float(np.dot(error, error)) / error.size if error.size else 0.0


def _max_abs(error: np.ndarray) -> float:
    return float(np.max(np.abs(error))) if error.size else 0.0


class Aggregate:
    """Running summary of one layer's metrics over samples, holding no tensors (only each
    sample's cosine, a float, for the percentile).

    >>> agg = Aggregate()
    >>> agg.add(Metrics(0.99, 30.0, 0.1, 0.5)); agg.add(Metrics(0.95, 20.0, 0.3, 0.9))
    >>> round(agg.cosine, 3), agg.cosine_worst, agg.worst_sample, agg.max_abs
    (0.97, 0.95, 1, 0.9)
    >>> round(agg.cosine_p10, 3)
    0.954
    """

    def __init__(self) -> None:
        self.samples = 0
        self._cosine = self._sqnr = self._mse = 0.0
        self.cosine_worst = math.inf
        self.worst_sample = 0
        self.max_abs = 0.0
        self.nonfinite = 0
        self._cosines: list[float] = []

    def add(self, metrics: Metrics) -> None:
        """Fold in the metrics of the next sample."""
        if not metrics.cosine >= self.cosine_worst:  # NaN counts as worst
            if not (math.isnan(self.cosine_worst) and math.isnan(metrics.cosine)):
                self.cosine_worst, self.worst_sample = metrics.cosine, self.samples
        self.samples += 1
        self._cosines.append(metrics.cosine)
        self._cosine += metrics.cosine
        self._sqnr += metrics.sqnr_db
        self._mse += metrics.mse
        self.max_abs = max(self.max_abs, metrics.max_abs)
        self.nonfinite += metrics.nonfinite

    @property
    def cosine(self) -> float:
        """Mean cosine over samples."""
        return self._cosine / self.samples if self.samples else math.nan

    @property
    def cosine_p10(self) -> float:
        """10th percentile of the cosine over samples (linear interpolation, as numpy's
        percentile, whose overhead was a tenth of a scan's compare time; NaN if any is)."""
        if not self._cosines or any(math.isnan(c) for c in self._cosines):
            return math.nan
        ranked = sorted(self._cosines)
        position = 0.1 * (len(ranked) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ranked) - 1)
        return ranked[low] + (ranked[high] - ranked[low]) * (position - low)

    @property
    def sqnr_db(self) -> float:
        """Mean SQNR in dB over samples."""
        return self._sqnr / self.samples if self.samples else math.nan

    @property
    def mse(self) -> float:
        """Mean MSE over samples."""
        return self._mse / self.samples if self.samples else math.nan
