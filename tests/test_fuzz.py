"""Property: in a random graph rewritten as a quantizer or an optimizer would, a fault planted
at one layer is named by layerbisect (or it says clearly why it cannot). A few derandomized
examples per rewrite here; benchmarks/fuzz.py runs many more."""

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fuzz_graphs import OPS, REWRITES, Case, check


@pytest.mark.parametrize("rewrite", REWRITES)
@settings(max_examples=8, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=10).map(tuple),
    fault=st.integers(0, 999),
)
def test_planted_fault_is_named(rewrite, seed, ops, fault):
    """``check`` raises on a wrong answer; what it returns is tallied (--hypothesis-show-statistics)."""
    event(check(Case(seed, ops, rewrite, fault)).split(":")[0])


@pytest.mark.parametrize("case", [
    # onnxruntime clamps relu1 away into QLinearMatMul; with mul2's factor negated, relu4
    # stays: mul2 was taken as absorbed by matmul0 and relu1 paired with relu4
    Case(1897704307, ("matmul", "relu", "mul", "mul", "relu", "sigmoid", "sigmoid", "conv", "gap"), "optimized", 186),
    # bn3 folded into conv2 though a Sigmoid reads it too, bn4 kept; one channel, so no
    # weights told the two BatchNormalizations apart: bn3 was paired with bn4's counterpart
    Case(1495291419, ("matmul", "conv", "conv", "bn", "bn", "sigmoid", "add", "sigmoid"), "fold", 566),
])
def test_fuzz_cases_once_wrong(case):
    assert check(case) == "found"
