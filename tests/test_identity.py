"""Property: a model compared with itself pairs every value with itself, at cosine 1: float,
quantized each way onnxruntime quantizes (QDQ, QOperator, dynamic), and as onnxruntime
optimizes it. A few derandomized random graphs, each rewrite, check the same
(benchmarks/fuzz.py --identity runs many)."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerbisect import find_first_bad_layer
from layerbisect.run import ort_optimized

from fuzz_graphs import IDENTICAL, OPS, REWRITES, Case, check_identity
from models import make_cnn, make_transformer, quantize, random_inputs

MODELS = {"cnn": make_cnn, "transformer": make_transformer}


def _model(name: str, fmt: str | None, optimized: bool):
    model = MODELS[name]()
    if fmt is not None:
        model = quantize(model, fmt)
    return ort_optimized(model, "model") if optimized else model


def _assert_all_at_one(report) -> None:
    assert report.first_bad is None and report.coverage == 1.0 and report.layers
    for layer in report.layers:
        assert layer.cosine >= IDENTICAL, layer.describe()
        assert layer.isolated_cosine >= IDENTICAL, f"{layer.describe()}: isolated {layer.isolated_cosine}"


@pytest.mark.parametrize("optimized", [False, True], ids=["as-built", "ort-optimized"])
@pytest.mark.parametrize("fmt", [None, "qdq", "qoperator", "dynamic"])
@pytest.mark.parametrize("name", MODELS)
def test_model_compared_with_itself(name, fmt, optimized):
    model = _model(name, fmt, optimized)
    report = find_first_bad_layer(model, model, random_inputs(model, seed=3), quiet=True)
    _assert_all_at_one(report)
    for layer in report.layers:
        assert (layer.float_nodes, layer.float_tensor) == (layer.quant_nodes, layer.quant_tensor), layer


@pytest.mark.parametrize("name", MODELS)
def test_float_model_against_its_ort_optimized_self(name):
    """The quantized side as onnxruntime runs it: its float fusions compute the same values.
    The transformer's FusedMatMul once hid every later shape, a [1,8,128] value paired with a
    Gemm's flattened [8,128] input, and its cut crashed the isolated run."""
    model = MODELS[name]()
    report = find_first_bad_layer(model, model, random_inputs(model, seed=3), ort_optimized=True, quiet=True)
    _assert_all_at_one(report)
    # no pair left out for shapes that differ; the fusions change no value (and fold some layers away)
    assert len(report.notes) == 1 and report.notes[0].startswith(
        f"onnxruntime's optimized graph computes each of the {len(report.layers)} layers it shares with the "
        "quantized model as given as that model does (the same values on the first sample)"), report.notes


def test_qdq_relu_renamed_conv_reads_the_same_tensor_on_both_sides():
    """onnxruntime's QDQ quantizer drops relu1 and names bn1's output "relu1": the float side
    read that raw, pre-Relu tensor while the quantized side read its QuantizeLinear's output
    (cosine 0.71 of the model with itself). Both now read the QuantizeLinear's output."""
    model = quantize(make_cnn(), "qdq")
    report = find_first_bad_layer(model, model, random_inputs(model, seed=3), quiet=True)
    bn1 = next(layer for layer in report.layers if layer.float_nodes == ("bn1",))
    assert bn1.float_tensor == bn1.quant_tensor == "relu1_QuantizeLinear_Output"
    assert bn1.cosine >= IDENTICAL and math.isinf(bn1.sqnr_db)


def test_qoperator_integer_outputs_are_paired():
    """A QLinearConv's uint8 output on the float side is read with its scale, not left out."""
    model = quantize(make_cnn(), "qoperator")
    report = find_first_bad_layer(model, model, random_inputs(model, seed=3), quiet=True)
    assert {"conv1_quant", "conv2_quant"} <= {layer.float_nodes[0] for layer in report.layers}


@pytest.mark.parametrize("rewrite", REWRITES)
@settings(max_examples=4, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=10).map(tuple))
def test_random_graph_compared_with_itself(rewrite, seed, ops):
    assert check_identity(Case(seed, ops, rewrite, 0)) in ("identical", "unquantizable")


@pytest.mark.parametrize("case", [
    # maxpool1 reads reshape0 unrounded, beside its QuantizeLinear: its cut was fed the
    # rounded readout (isolated cosine 0.999988)
    Case(353044762, ("reshape", "maxpool", "conv", "add", "softmax", "sigmoid", "matmul", "gap", "transpose", "gap"),
         "qoperator", 0),
    # relu3 dropped, clamped by a requantizing QuantizeLinear after gap0's DequantizeLinear:
    # the cut went past it and fed add4 unclamped values (isolated cosine 0.9935)
    Case(1828552078, ("gap", "maxpool", "concat", "relu", "add"), "optimized", 0),
])
def test_identity_cases_once_wrong(case):
    assert check_identity(case) == "identical"
