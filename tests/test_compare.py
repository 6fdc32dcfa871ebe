import math

import numpy as np
import pytest

from layerbisect.compare import Aggregate, Metrics, Quantized, compare
from layerbisect.search import first_failing


def test_cosine_sqnr_mse_maxabs_on_known_values():
    ref = np.array([3.0, 4.0], dtype=np.float32)
    act = np.array([3.0, 5.0], dtype=np.float32)
    m = compare(ref, act)
    assert m.cosine == pytest.approx((9 + 20) / (5 * math.sqrt(34)))
    assert m.sqnr_db == pytest.approx(10 * math.log10(25 / 1))
    assert m.mse == pytest.approx(0.5)
    assert m.max_abs == 1.0


def test_cosine_accumulates_in_float64():
    ref = np.full(10_000_000, 1e-3, dtype=np.float32)
    assert compare(ref, ref).cosine == 1.0


def test_zeros_are_defined():
    zero = np.zeros((2, 3), np.float32)
    assert compare(zero, zero).cosine == 1.0 and compare(zero, zero).sqnr_db == math.inf
    assert compare(zero, np.ones((2, 3))).cosine == 0.0
    assert compare(np.ones(3), np.zeros(3)).cosine == 0.0
    assert compare(np.zeros(0), np.zeros(0)).cosine == 1.0


def test_nan_and_inf_are_counted_not_raised():
    m = compare(np.array([1.0, 2.0, 3.0]), np.array([1.0, np.nan, np.inf]))
    assert m.nonfinite == 2 and math.isnan(m.cosine)
    same = compare(np.array([1.0, -np.inf]), np.array([1.0, -np.inf]))  # an additive mask's -inf, in both
    assert same.nonfinite == 0 and same.reference_nonfinite == 0 and same.cosine == 1.0
    other = compare(np.array([1.0, -np.inf]), np.array([1.0, np.inf]))
    assert other.nonfinite == 0 and other.reference_nonfinite == 1
    broken = compare(np.array([1.0, np.nan, 2.0]), np.array([1.0, 5.0, 2.0]))  # the reference's own NaN
    assert (broken.nonfinite, broken.reference_nonfinite) == (0, 1) and broken.cosine == 1.0


def test_aggregate_matches_brute_force():
    rng = np.random.default_rng(1)
    pairs = [(rng.standard_normal(50), rng.standard_normal(50)) for _ in range(5)]
    metrics = [compare(a, a + 0.3 * b) for a, b in pairs]
    agg = Aggregate()
    for m in metrics:
        agg.add(m)
    cosines = [m.cosine for m in metrics]
    assert agg.cosine == pytest.approx(np.mean(cosines))
    assert agg.cosine_worst == min(cosines) and agg.worst_sample == int(np.argmin(cosines))
    assert agg.cosine_p10 == pytest.approx(np.percentile(cosines, 10))
    assert agg.mse == pytest.approx(np.mean([m.mse for m in metrics]))
    assert agg.max_abs == max(m.max_abs for m in metrics)


@pytest.mark.parametrize("count", [1, 2, 3, 10, 11])
def test_cosine_p10_interpolates_as_numpy_and_is_nan_if_any_cosine_is(count):
    cosines = list(np.random.default_rng(count).uniform(-1, 1, count))
    agg = Aggregate()
    for cosine in cosines:
        agg.add(Metrics(cosine, 0.0, 0.0, 0.0))
    assert agg.cosine_p10 == pytest.approx(np.percentile(cosines, 10))
    agg.add(Metrics(math.nan, 0.0, 0.0, 0.0))
    assert math.isnan(agg.cosine_p10)


def test_first_failing():
    assert first_failing([]) is None
    assert first_failing([True, True]) is None
    assert first_failing([True, False, False]) == 1


@pytest.mark.parametrize("dtype,rel", [(np.float32, 1e-6), (np.float64, 1e-12)])
@pytest.mark.parametrize("size", [1, 16_384, 65_535, 65_536, 200_001])
def test_chunked_sums_match_a_direct_float64_computation(size, dtype, rel):
    """Large float32 tensors are summed in float32 chunks (BLAS dots), anything else in float64.
    The float32 sums' error depends on the CPU's dot kernel: up to 1.4e-7 relative on an AVX-512
    machine, 3.5e-7 on an AVX2 one (the sum of squared errors, whose terms never cancel)."""
    rng = np.random.default_rng(size)
    ref = rng.standard_normal(size).astype(dtype)
    act = (ref + 0.1 * rng.standard_normal(size)).astype(dtype)
    r, a = ref.astype(np.float64), act.astype(np.float64)
    m = compare(ref, act)
    assert m.cosine == pytest.approx(r @ a / np.sqrt((r @ r) * (a @ a)), rel=rel)
    assert m.mse == pytest.approx(np.mean((a - r) ** 2), rel=rel)
    assert m.sqnr_db == pytest.approx(10 * np.log10((r @ r) / ((a - r) @ (a - r))), rel=rel)
    assert m.max_abs == pytest.approx(np.max(np.abs(a - r)))


@pytest.mark.parametrize("scale", [1e25, 1e-25])
def test_float32_values_whose_squares_leave_float32s_range_are_summed_in_float64(scale):
    rng = np.random.default_rng(0)
    ref = (scale * rng.standard_normal(20_000)).astype(np.float32)
    act = (ref * np.float32(1.01)).astype(np.float32)
    r, a = ref.astype(np.float64), act.astype(np.float64)
    m = compare(ref, act)
    assert m.nonfinite == 0 and m.cosine == pytest.approx(1.0, abs=1e-9)
    assert m.sqnr_db == pytest.approx(10 * np.log10((r @ r) / ((a - r) @ (a - r))), rel=1e-9)


@pytest.mark.parametrize("size", [7, 16_384, 200_001])
def test_quantized_values_are_dequantized_a_chunk_at_a_time_with_the_same_result(size):
    rng = np.random.default_rng(size)
    ints = rng.integers(-128, 128, size).astype(np.int8)
    ref = ((ints.astype(np.float32) - 3) * np.float32(0.05) + 0.01 * rng.standard_normal(size)).astype(np.float32)
    whole = (ints.astype(np.float32) - np.float32(3)) * np.float32(0.05)
    assert compare(ref, Quantized(ints.reshape(1, -1), 0.05, 3)) == compare(ref, whole)
    assert compare(Quantized(ints, 0.05, 3), ref) == compare(whole, ref)
    ref[size // 2] = np.nan  # the second look, over whole tensors: the reference's NaN left out
    m = compare(ref, Quantized(ints, 0.05, 3))
    assert (m.reference_nonfinite, m.nonfinite) == (1, 0) and m.cosine > 0.999
    m = compare(whole, ref)
    assert (m.reference_nonfinite, m.nonfinite) == (0, 1) and math.isnan(m.cosine)
