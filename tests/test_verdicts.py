"""Issue 20: verdicts a user can act on. Degenerate values are never the first bad layer."""

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from layerbisect import find_first_bad_layer
from layerbisect.assemble import _cause, _contributors, _culprit
from layerbisect.report import LayerComparison

from models import quantize


def chain(ops: list[tuple[str, float]], name: str = "chain") -> onnx.ModelProto:
    """x float32[1, 64] through ``(op, constant)`` steps in order ("Relu" takes no constant)."""
    nodes, inits, value = [], [], "x"
    for index, (op, constant) in enumerate(ops):
        inputs = [value]
        if op != "Relu" and op != "Sigmoid":
            inits.append(numpy_helper.from_array(np.array(constant, np.float32), f"k{index}"))
            inputs.append(f"k{index}")
        value = f"{op.lower()}{index}"
        nodes.append(helper.make_node(op, inputs, [value], name=value))
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info(value, TensorProto.FLOAT, [1, 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


X = {"x": np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)}


def test_an_all_zero_float_value_is_left_out_not_the_first_bad_layer():
    """Relu of values all below zero: the float value is all zeros, a shifted copy's is not."""
    float_model = chain([("Add", -10.0), ("Relu", 0), ("Add", 1.0)])
    shifted = chain([("Add", -10.0), ("Relu", 0), ("Add", 1.0)])
    shifted.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array(10.0, np.float32), "k0"))
    report = find_first_bad_layer(float_model, shifted, X)
    relu = next(layer for layer in report.layers if layer.float_nodes == ("relu1",))
    assert relu.float_zero == 1 and math.isnan(relu.cosine) and not relu.judged and relu.passes(0.98)
    assert report.first_bad.float_nodes == ("add0",)  # the shift itself is found, before it
    assert any("left out on samples where the float value is all zeros" in note for note in report.notes)


def test_a_quiet_generated_sample_below_the_quantized_step_is_said_with_advice():
    """Calibrated on inputs that reach 1, the Sigmoid's output on random inputs shifted far
    down is about 1e-5, below its uint8 step: the quantized model outputs zeros."""
    float_model = chain([("Add", -12.0), ("Sigmoid", 0)])
    quant = quantize(float_model, "qdq", calibration_inputs=[{"x": np.full((1, 64), 12.0, np.float32)},
                                                      {"x": np.full((1, 64), 10.0, np.float32)}])
    report = find_first_bad_layer(float_model, quant)  # generated inputs
    sigmoid = report.layers[-1]
    assert sigmoid.faint == 1 and sigmoid.cosine < 0.9  # the metrics stand: a range too wide is a finding too
    assert any("give real inputs" in note for note in report.notes)
    real = find_first_bad_layer(float_model, quant, {"x": np.full((1, 64), 12.0, np.float32)})
    assert not real.layers[-1].faint and not any("give real inputs" in note for note in real.notes)


def layer(index: int, cosine: float, isolated: float) -> LayerComparison:
    return LayerComparison(index, "Relu", (f"n{index}",), f"t{index}", (f"n{index}",), f"t{index}", (1,),
                           cosine, 0.0, 0.0, 0.0, cosine, 0, 0, "structure", isolated_cosine=isolated)


@pytest.mark.parametrize("isolated,first_bad,cause,culprit,contributors", [
    ((0.995, 0.5, 0.99), 1, "introduced", 1, ()),  # bad on its own
    ((0.5, 0.99, 0.99), 1, "inherited", 0, ()),  # an earlier layer bad on its own
    ((0.995, 0.99, 0.985), 2, "accumulated", None, (2, 1, 0)),  # none bad on its own: no culprit
    ((0.995, 0.99, 0.5), 1, "accumulated", None, (1, 0)),  # a bad layer after it is not its culprit
])
def test_cause_culprit_and_contributors_follow_their_definitions(isolated, first_bad, cause, culprit, contributors):
    layers = tuple(layer(i, 0.5 if i >= first_bad else 0.999, iso) for i, iso in enumerate(isolated))
    found = _culprit(layers, layers[first_bad], 0.98)
    assert (None if found is None else found.index) == culprit
    assert _cause(layers[first_bad], found, 0.98) == cause
    assert tuple(c.index for c in _contributors(layers, layers[first_bad], found)) == contributors
    assert _culprit(layers, None, 0.98) is None and _cause(None, None, 0.98) is None
