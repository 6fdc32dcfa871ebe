"""Metrics between a reference tensor and a tensor that should hold the same values.

Pure numpy. Metrics are defined for all-zero tensors; NaN and Inf are counted, not propagated
into a crash. Large float32 tensors are summed a chunk at a time: each chunk's sums of squares
by a float32 BLAS dot, the chunks in float64, for a relative error of a few 1e-7 at most, far below
what a threshold or a dB figure can tell, at a fifth of the cost of float64 throughout. Small
tensors, other dtypes, and float32 data whose squares leave float32's range
are summed in float64 (so the cosine of two positive scalars is exactly 1). Integers read with
one scale (``Quantized``) are dequantized a chunk at a time, never whole.

>>> m = compare(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.5]))
>>> round(m.cosine, 4), round(m.sqnr_db, 1), m.max_abs
(0.9974, 17.5, 0.5)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from layerbisect.grid import dequantize

CHUNK = 1 << 16  # elements summed at a time
FAST_SIZE = 1 << 14  # float32 tensors this large are summed in float32 (smaller ones cost nothing)


@dataclass(frozen=True)
class Quantized:
    """Integer ``values`` that stand for ``(values - zero_point) * scale``, computed in float32
    as onnxruntime's DequantizeLinear does, one scale and zero point for the whole tensor.

    >>> q = Quantized(np.array([0, 2, 4], np.int8), scale=0.5, zero_point=2)
    >>> q.dequantized()
    array([-1.,  0.,  1.], dtype=float32)
    """

    values: np.ndarray
    scale: float
    zero_point: float = 0.0

    dtype = np.dtype(np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def size(self) -> int:
        return self.values.size

    def dequantized(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The float values, of the flattened elements ``start:stop`` (all by default)."""
        return dequantize(self.values.reshape(-1)[start:stop], np.asarray(self.scale), np.asarray(self.zero_point))


Values = np.ndarray | Quantized


@dataclass(frozen=True)
class Metrics:
    """How close ``actual`` is to ``reference``.

    ``cosine`` is 1.0 when both are all zeros and 0.0 when only one is; ``sqnr_db`` is the
    signal-to-quantization-noise ratio in dB (inf when equal); ``nonfinite`` counts elements
    where ``actual`` holds NaN/Inf and ``reference`` does not; when it is non-zero, ``cosine``
    and ``sqnr_db`` are NaN, which never passes a threshold. ``reference_nonfinite`` counts
    elements where the reference itself holds NaN/Inf and ``actual`` not the same infinity
    (both -inf, as an additive attention mask, agree); NaN/Inf are left out of every metric.
    ``degenerate`` is set when the two differ while the reference is all zeros: no direction
    to compare with. ``faint`` when they differ while the reference's root mean square is below
    half the ``resolution`` ``compare`` was given (the quantized tensor's step): most values
    round to the zero point. That is a finding when the quantized range is far too wide, and
    noise when the sample is quiet; the metrics stand either way.
    """

    cosine: float
    sqnr_db: float
    mse: float
    max_abs: float
    nonfinite: int = 0
    reference_nonfinite: int = 0
    degenerate: bool = False
    faint: bool = False
    token_cosine: float = math.nan  # the worst position's cosine, where compared by token (``token_cosines``)
    worst_token: int = -1  # that position, flattened over the leading axes ([batch, seq] of logits)


def compare(reference: Values, actual: Values, resolution: float = 0.0) -> Metrics:
    """Compare two arrays (or ``Quantized`` integers) of the same shape; ``resolution`` is the
    step of the quantized tensor, where it has one (see ``Metrics.degenerate``)."""
    ref, act = _flat(reference), _flat(actual)
    if ref.size != act.size:
        raise ValueError(f"cannot compare arrays of {ref.size} and {act.size} elements")
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):  # looked at below
        signal, actual_square, product, noise, max_abs = _sums(ref, act)
    reference_nonfinite = 0
    if not (math.isfinite(signal + actual_square + noise) and _held(signal, ref) and _held(actual_square, act)):
        # NaN or Inf in the data, or squares beyond float32's range: a second look, in float64
        ref, act, nonfinite, reference_nonfinite = _finite_part(_whole(ref), _whole(act))
        if nonfinite:
            error = act - ref
            return Metrics(math.nan, math.nan, _mean_square(error), _max_abs(error), nonfinite, reference_nonfinite)
        signal, actual_square, product, noise, max_abs = _sums(ref, act)
    return Metrics(
        cosine=_cosine(signal, actual_square, product),
        sqnr_db=_sqnr_db(signal, noise),
        mse=noise / ref.size if ref.size else 0.0,
        max_abs=max_abs,
        reference_nonfinite=reference_nonfinite,
        degenerate=noise > 0 and signal == 0,
        faint=noise > 0 and signal < ref.size * (resolution / 2) ** 2,
    )


def _flat(values: Values) -> Values:
    if isinstance(values, Quantized):
        return Quantized(values.values.ravel(), values.scale, values.zero_point)
    return np.asarray(values).ravel()


def _whole(values: Values) -> np.ndarray:
    return values.dequantized() if isinstance(values, Quantized) else values


def _chunk(values: Values, start: int) -> np.ndarray:
    if isinstance(values, Quantized):
        return values.dequantized(start, start + CHUNK)
    return values[start:start + CHUNK]


def _sums(ref: Values, act: Values) -> tuple[float, float, float, float, float]:
    """Sums of squares and products, a chunk at a time (chunks stay in cache; no copy of whole
    tensors): in float32 for large float32 tensors, else in float64. The product comes from the
    three sums of squares (``r.a = (r.r + a.a - e.e) / 2``)."""
    exact = not (ref.dtype == act.dtype == np.float32) or ref.size < FAST_SIZE
    ref_square = act_square = noise = max_abs = 0.0
    for start in range(0, ref.size, CHUNK):
        r, a = _chunk(ref, start), _chunk(act, start)
        if exact:
            r, a = r.astype(np.float64), a.astype(np.float64)
        e = a - r
        square_sum = _pairwise_square_sum if exact else _dot_square_sum
        ref_square += square_sum(r)
        act_square += square_sum(a)
        noise += square_sum(e)
        max_abs = max(max_abs, float(e.max()), -float(e.min()))
    return ref_square, act_square, (ref_square + act_square - noise) / 2, noise, max_abs


def _pairwise_square_sum(x: np.ndarray) -> float:
    """Sum of squares, pairwise (numpy's own loop): no float64 BLAS dot, which OpenBLAS
    spreads over its threads, so that on a busy machine each call waited for a descheduled
    thread (5 ns an element against 0.5)."""
    return float(np.add.reduce(x * x))


def _dot_square_sum(x: np.ndarray) -> float:
    """Sum of squares of float32 values: a BLAS dot, a fifth of the pairwise sum's cost, as
    precise here (1e-8 to 3.5e-7 relative by CPU, as BLAS keeps many partial sums), and on one thread
    (OpenBLAS's sdot took as long capped at one thread, busy machine or not)."""
    return float(np.dot(x, x))


def _held(square_sum: float, values: Values) -> bool:
    """False when a sum of squares is zero though some value is not: squares too small for
    float32."""
    return square_sum > 0.0 or not _whole(values).any()


def _finite_part(ref: np.ndarray, act: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The elements finite in both; how many are NaN/Inf in ``act`` alone; how many in ``ref``
    where ``act`` is not the same infinity (an additive attention mask's -inf, which both
    models compute, is agreement, not a broken reference)."""
    ref, act = ref.astype(np.float64), act.astype(np.float64)
    finite_ref, finite_act = np.isfinite(ref), np.isfinite(act)
    both = finite_ref & finite_act
    broken = ~finite_ref & (ref != act)
    return ref[both], act[both], int(np.count_nonzero(finite_ref & ~finite_act)), int(np.count_nonzero(broken))


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


def token_cosines(reference: Values, actual: Values) -> np.ndarray:
    """The cosine at each position of ``[..., features]`` values (a language model's logits
    ``[batch, seq, vocab]``: one per token), flattened over the leading axes; positions where
    either holds NaN/Inf are NaN.

    >>> token_cosines(np.array([[[1.0, 0.0], [0.0, 2.0]]]), np.array([[[1.0, 0.0], [1.0, 1.0]]])).round(4)
    array([1.    , 0.7071])
    """
    ref, act = (_whole(v).astype(np.float64) for v in (_flat(reference), _flat(actual)))
    width = reference.shape[-1] if reference.shape else 1
    ref, act = ref.reshape(-1, width), act.reshape(-1, width)
    with np.errstate(invalid="ignore", over="ignore"):
        ref_square, act_square = np.einsum("ij,ij->i", ref, ref), np.einsum("ij,ij->i", act, act)
        product = np.einsum("ij,ij->i", ref, act)
    return np.array([_cosine(r, a, p) if math.isfinite(r + a + p) else math.nan
                     for r, a, p in zip(ref_square, act_square, product)])


class Aggregate:
    """Running summary of one layer's metrics over samples, holding no tensors (only each
    sample's cosine, a float, for the percentile). ``samples`` counts the samples folded in,
    ``degenerate`` those only counted, ``faint`` those folded in but faint (see ``Metrics``).

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
        self.nonfinite = self.reference_nonfinite = self.degenerate = self.faint = 0
        self._cosines: list[float] = []
        self.token_cosine = math.nan  # the worst token's cosine over samples, where compared by token
        self.worst_token = (-1, -1)  # (sample, position) of that token

    def add(self, metrics: Metrics) -> None:
        """Fold in the metrics of the next sample; a degenerate one is only counted."""
        if metrics.degenerate:
            self.degenerate += 1
            return
        self.faint += metrics.faint
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
        self.reference_nonfinite += metrics.reference_nonfinite
        if not math.isnan(metrics.token_cosine) and not metrics.token_cosine >= self.token_cosine:
            self.token_cosine, self.worst_token = metrics.token_cosine, (self.samples - 1, metrics.worst_token)

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
