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
    ref = np.asarray(reference, dtype=np.float64).ravel()
    act = np.asarray(actual, dtype=np.float64).ravel()
    if ref.shape != act.shape:
        raise ValueError(f"cannot compare arrays of {ref.size} and {act.size} elements")
    finite_ref, finite_act = np.isfinite(ref), np.isfinite(act)
    both = finite_ref & finite_act
    if not both.all():
        same_special = ~both & (finite_ref == finite_act) & ((ref == act) | (np.isnan(ref) & np.isnan(act)))
        nonfinite = int(np.count_nonzero(~both & ~same_special))
        ref, act = ref[both], act[both]
        if nonfinite:
            error = act - ref
            return Metrics(math.nan, math.nan, _mean_square(error), _max_abs(error), nonfinite)
    error = act - ref
    signal = float(np.dot(ref, ref))
    noise = float(np.dot(error, error))
    return Metrics(
        cosine=_cosine(ref, act, signal),
        sqnr_db=_sqnr_db(signal, noise),
        mse=noise / ref.size if ref.size else 0.0,
        max_abs=_max_abs(error),
    )


def _cosine(ref: np.ndarray, act: np.ndarray, ref_square: float) -> float:
    act_square = float(np.dot(act, act))
    if ref_square == 0.0 and act_square == 0.0:
        return 1.0
    if ref_square == 0.0 or act_square == 0.0:
        return 0.0
    value = float(np.dot(ref, act)) / math.sqrt(ref_square * act_square)
    return max(-1.0, min(1.0, value))


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
    """Running summary of one layer's metrics over samples, holding no tensors.

    >>> agg = Aggregate()
    >>> agg.add(Metrics(0.99, 30.0, 0.1, 0.5)); agg.add(Metrics(0.95, 20.0, 0.3, 0.9))
    >>> round(agg.cosine, 3), agg.cosine_worst, agg.worst_sample, agg.max_abs
    (0.97, 0.95, 1, 0.9)
    """

    def __init__(self) -> None:
        self.samples = 0
        self._cosine = self._sqnr = self._mse = 0.0
        self.cosine_worst = math.inf
        self.worst_sample = 0
        self.max_abs = 0.0
        self.nonfinite = 0

    def add(self, metrics: Metrics) -> None:
        """Fold in the metrics of the next sample."""
        if not metrics.cosine >= self.cosine_worst:  # NaN counts as worst
            if not (math.isnan(self.cosine_worst) and math.isnan(metrics.cosine)):
                self.cosine_worst, self.worst_sample = metrics.cosine, self.samples
        self.samples += 1
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
    def sqnr_db(self) -> float:
        """Mean SQNR in dB over samples."""
        return self._sqnr / self.samples if self.samples else math.nan

    @property
    def mse(self) -> float:
        """Mean MSE over samples."""
        return self._mse / self.samples if self.samples else math.nan
