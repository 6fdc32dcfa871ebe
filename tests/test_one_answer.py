"""Issue 20: one answer whatever the strategy. For random graphs, faults and memory budgets,
the full scan, the prefix scan, auto, an executor and bisection name the same first bad layer,
cause and culprit (bisection: wherever it finds a bad layer, which it can miss only where the
error, once below the threshold, heals)."""

from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerbisect import LayerbisectError, find_first_bad_layer

from fuzz_graphs import OPS, THRESHOLD, Case, Unquantizable, _feeds, corrupt, random_model, rewrite, weighted_nodes


def answer(report) -> tuple:
    index = lambda layer: None if layer is None else layer.index  # noqa: E731
    return index(report.first_bad), report.first_bad_cause, index(report.culprit)


def contributors(report) -> list[int]:
    return [layer.index for layer in report.contributors]


def heals(report) -> bool:
    """Whether a layer after the first bad one is back above the threshold."""
    bad = report.first_bad
    return bad is not None and any(layer.passes(THRESHOLD) for layer in report.layers if layer.index > bad.index)


@settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    ops=st.lists(st.sampled_from(OPS), min_size=2, max_size=12).map(tuple),
    how=st.sampled_from(["qdq", "qoperator", "dynamic"]),
    fault=st.one_of(st.none(), st.integers(0, 999)),  # None: quantization error alone
    fraction=st.sampled_from([2, 4, 16, 10**9]),
)
def test_scan_prefix_auto_bisection_and_an_executor_give_one_answer(seed, ops, how, fault, fraction):
    model = random_model(seed, ops)
    weighted = weighted_nodes(model)
    feeds = _feeds(Case(seed, ops, how, fault or 0), model)
    try:
        faulty = model if fault is None or not weighted else corrupt(
            model, weighted[fault // 2 % len(weighted)][1], shuffle=fault % 2 == 1)
        quant = rewrite(faulty, how)
        scan = find_first_bad_layer(model, quant, feeds, THRESHOLD, strategy="scan", quiet=True)
    except (Unquantizable, LayerbisectError):
        return
    budget = max(1, scan.peak_bytes // fraction)
    with ThreadPoolExecutor(2) as pool:
        others = {
            "prefix": find_first_bad_layer(model, quant, feeds, THRESHOLD, strategy="prefix", memory_budget=budget),
            "auto": find_first_bad_layer(model, quant, feeds, THRESHOLD, memory_budget=budget),
            "scan in pieces": find_first_bad_layer(model, quant, feeds, THRESHOLD, strategy="scan", memory_budget=budget),
            "executor": find_first_bad_layer(model, quant, feeds, THRESHOLD, memory_budget=budget, executor=pool),
            "bisect": find_first_bad_layer(model, quant, feeds, THRESHOLD, strategy="bisect", memory_budget=budget),
        }
    if others["bisect"].first_bad is None and heals(scan):
        del others["bisect"]  # its probes all passed: the error healed before each of them
    for name, report in others.items():
        assert answer(report) == answer(scan), f"{name} (budget {budget}) against the scan"
        assert contributors(report) == contributors(scan), name


def test_auto_prefix_stops_at_the_piece_of_the_first_bad_layer():
    """Over a budget that forces pieces, auto measures the layers in order and stops after the
    piece holding the first bad one, which it names as the scan does."""
    from models import corrupt_weights, make_cnn, quant_node_for, quantize, random_inputs

    float_model = make_cnn()
    quant = quantize(float_model, "qdq")
    quant = corrupt_weights(quant, quant_node_for(quant, "conv2"))
    feeds = random_inputs(float_model)
    scan = find_first_bad_layer(float_model, quant, feeds, strategy="scan")
    auto = find_first_bad_layer(float_model, quant, feeds, memory_budget=scan.peak_bytes // 3)
    assert auto.strategy == "prefix" and answer(auto) == answer(scan) == (2, "introduced", 2)
    assert len(scan.layers) > len(auto.layers) >= 3
    assert f"{len(auto.layers)} of {len(scan.layers)} aligned layers measured" in auto.summary_line()


@pytest.mark.parametrize("fraction", [2, 5, 10**9])
def test_accumulated_error_gets_one_answer_and_no_culprit_whatever_the_strategy(fraction):
    """Eight MatMul+Tanh layers, each slightly perturbed: the error accumulates."""
    import numpy as np

    from test_search_engine import chain

    noise = [0.05, 0.16, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05]
    float_model, other = chain([0.0] * len(noise)), chain(noise)
    feeds = {"x": np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32)}
    scan = find_first_bad_layer(float_model, other, feeds, strategy="scan")
    assert answer(scan) == (10, "accumulated", None) and not heals(scan)
    budget = max(1, scan.peak_bytes // fraction)
    with ThreadPoolExecutor(2) as pool:
        for options in ({"strategy": "prefix"}, {}, {"executor": pool}, {"strategy": "bisect"}):
            report = find_first_bad_layer(float_model, other, feeds, memory_budget=budget, **options)
            assert answer(report) == answer(scan), options
            assert contributors(report) == contributors(scan), options


def test_a_cut_feeds_only_the_readers_of_its_float_value():
    """onnxruntime's QOperator quantizer dropped relu2 though concat1 reads its input too:
    concat0's quantized tensor stands for concat0 (read by concat1) and relu2 (read by conv3).
    Cut for conv3, it was fed relu2's values for concat1 as well: concat1's isolated cosine
    was 0.76 in one pass (culprit #0), 0.99996 in pieces. It keeps the quantized tensor now."""
    ops = ("concat", "concat", "relu", "conv")
    model = random_model(0, ops)
    quant = rewrite(model, "qoperator")
    feeds = _feeds(Case(0, ops, "qoperator", 0), model)
    scan = find_first_bad_layer(model, quant, feeds, strategy="scan")
    concat1 = next(layer for layer in scan.layers if layer.float_nodes == ("concat1",))
    assert concat1.isolated_cosine == pytest.approx(concat1.cosine) and concat1.cosine > 0.9999
    assert answer(scan) == (1, "introduced", 1)  # the dropped Relu: concat0+relu2 at cosine 0.61
