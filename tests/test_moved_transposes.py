"""Alignment where onnxruntime's optimizer moves Transposes past the operations after them and
cancels two of them: the quantized graph has neither, and the layers between compare through
the permutation (here a swap of H and W, not a channels-last layout)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from layerbisect import find_first_bad_layer

from models import corrupt_weights, quantize, random_inputs

SWAP = (0, 1, 3, 2)
RNG = np.random.default_rng(7)


def weight(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)


def model(nodes: list[onnx.NodeProto], outputs: dict[str, list[int]], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 5])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs.items()], inits,
    )
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(built, full_check=True)
    return built


def cancelled_across(op_type: str) -> onnx.ModelProto:
    """conv_a -> Transpose -> ``op_type`` -> Concat of it twice -> Transpose back -> conv_b."""
    return model([
        helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
        helper.make_node("Transpose", ["a"], ["t"], name="swap", perm=SWAP),
        helper.make_node(op_type, ["t"], ["e"], name="between"),
        helper.make_node("Concat", ["e", "e"], ["c"], name="concat", axis=1),
        helper.make_node("Transpose", ["c"], ["u"], name="unswap", perm=SWAP),
        helper.make_node("Conv", ["u", "wb"], ["y"], name="conv_b"),
    ], {"y": [1, 4, 6, 5]}, [weight("wa", 4, 3, 1, 1), weight("wb", 4, 8, 1, 1)])


@pytest.mark.parametrize("op_type", ["Relu", "Sigmoid"])  # a Relu is clamped away by quantization
def test_layers_on_both_sides_of_transposes_cancelled_across_a_concat_align(op_type):
    float_model = cancelled_across(op_type)
    quant = quantize(float_model, "qdq", num_samples=16)
    inputs = random_inputs(float_model)
    healthy = find_first_bad_layer(float_model, quant, inputs, ort_optimized=True)
    assert healthy.first_bad is None and healthy.coverage == 1.0
    by_float = {layer.float_tensor: layer for layer in healthy.layers}
    # the Concat's quantized value is H x W, compared once permuted to the float layout
    assert by_float["c"].shape == (1, 8, 5, 6) and by_float["c"].cosine > 0.99
    assert by_float["y"].float_nodes == ("conv_b",)
    for faulty in ("conv_a", "conv_b"):
        report = find_first_bad_layer(float_model, corrupt_weights(quant, faulty), inputs, ort_optimized=True)
        assert report.first_bad is not None and report.first_bad.float_nodes[0] == faulty


def test_of_two_relus_on_one_value_the_one_clamped_away_is_told_by_its_readers():
    """relu0 -> conv and relu1 as an output both read x: onnxruntime drops relu0 (the
    QuantizeLinear before the QLinearConv clamps) and keeps relu1, which stands for relu1 only."""
    float_model = model([
        helper.make_node("Relu", ["x"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w"], ["y"], name="conv"),
        helper.make_node("Relu", ["x"], ["r1"], name="relu1"),
    ], {"y": [1, 4, 6, 5], "r1": [1, 3, 6, 5]}, [weight("w", 4, 3, 1, 1)])
    quant = quantize(float_model, "qdq", num_samples=16)
    inputs = random_inputs(float_model)
    healthy = find_first_bad_layer(float_model, quant, inputs, ort_optimized=True)
    assert healthy.first_bad is None
    assert {layer.float_tensor: layer.quant_tensor for layer in healthy.layers}["r1"] == "r1"
    report = find_first_bad_layer(float_model, corrupt_weights(quant, "conv"), inputs, ort_optimized=True)
    assert report.first_bad is not None and report.first_bad.float_nodes == ("conv",)
