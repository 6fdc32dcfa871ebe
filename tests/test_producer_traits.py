"""Issue 13: traits of real producers' graphs, built here in code, with the true
correspondence known by construction: the pairs must be those of the plain graph, and the
planted fault named."""

import onnx
import pytest

from layerbisect import find_first_bad_layer
from models import corrupt_weights, make_cnn, make_transformer, quant_node_for, quantize, random_inputs


def paddle_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose dynamic dimensions are written as -1, as Paddle2ONNX writes them: every
    dimension of the inputs, outputs and value infos but the channels (axis 1)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    for info in [*graph.input, *graph.output, *graph.value_info]:
        for axis, dim in enumerate(info.type.tensor_type.shape.dim):
            if axis != 1:
                dim.Clear()
                dim.dim_value = -1
    return copy


def pairs(report) -> list[tuple[tuple[str, ...], str]]:
    return [(layer.float_nodes, layer.quant_tensor) for layer in report.layers]


@pytest.mark.parametrize("make,faulty", [(make_cnn, "conv2"), (make_transformer, "ffn1_proj")])
@pytest.mark.parametrize("side", ["float", "quantized", "both"])
def test_dimensions_written_as_minus_one_are_unknown_not_a_mismatch(make, faulty, side):
    float_model = make()
    quant = quantize(float_model, "qdq")
    broken = corrupt_weights(quant, quant_node_for(quant, faulty))
    inputs = random_inputs(float_model)
    plain = find_first_bad_layer(float_model, broken, inputs)
    report = find_first_bad_layer(
        paddle_dims(float_model) if side != "quantized" else float_model,
        paddle_dims(broken) if side != "float" else broken, inputs,
    )
    assert pairs(report) == pairs(plain) and report.coverage == plain.coverage > 0.9
    assert report.first_bad.float_nodes[-1] == plain.first_bad.float_nodes[-1]
    assert faulty in report.culprit.float_nodes
