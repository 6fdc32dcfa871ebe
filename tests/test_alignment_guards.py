"""What keeps structural alignment from pairing values that only look alike: each case here
was once paired wrongly (found by fuzzing random graphs) and is checked against the true
correspondence, known by construction."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from layerbisect import find_first_bad_layer
from layerbisect.align import align
from layerbisect.graph import build_graph
from layerbisect.load import load_model

RNG = np.random.default_rng(4)


def model(nodes: list[onnx.NodeProto], shape: list[int], outputs: list[str], inits=()) -> onnx.ModelProto:
    info = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [info(name) for name in outputs], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def decomposed_sigmoids(original: onnx.ModelProto) -> onnx.ModelProto:
    """Each Sigmoid as 1 / (1 + exp(-x)), producing the same tensor name."""
    out = onnx.ModelProto()
    out.CopyFrom(original)
    nodes = []
    for node in out.graph.node:
        if node.op_type != "Sigmoid":
            nodes.append(node)
            continue
        (x,), (y,) = node.input, node.output
        nodes += [helper.make_node("Neg", [x], [f"{y}.neg"]), helper.make_node("Exp", [f"{y}.neg"], [f"{y}.exp"]),
                  helper.make_node("Add", [f"{y}.exp", "one"], [f"{y}.den"]), helper.make_node("Div", ["one", f"{y}.den"], [y])]
    out.graph.ClearField("node")
    out.graph.node.extend(nodes)
    out.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), "one"))
    return out


def pairs(float_model: onnx.ModelProto, other: onnx.ModelProto) -> dict[str, str]:
    alignment = align(build_graph(load_model(float_model)), build_graph(load_model(other)))
    return {pair.float_tensor: pair.quant_tensor for pair in alignment.pairs}


def test_a_region_does_not_swallow_a_value_read_outside_it():
    """s1 = sigmoid(s0) and s0 is also read by another softmax: s0 and s1 must not be taken
    together for s0's decomposition alone."""
    plain = model([
        helper.make_node("Sigmoid", ["x"], ["s0"]), helper.make_node("Sigmoid", ["s0"], ["s1"]),
        helper.make_node("Softmax", ["s1"], ["a"]), helper.make_node("Softmax", ["s0"], ["b"]),
    ], [1, 3, 4, 5], ["a", "b"])
    found = pairs(plain, decomposed_sigmoids(plain))
    assert all(found[name] == name for name in found) and {"a", "b"} <= set(found)


def test_a_region_of_moves_alone_does_not_stand_for_computation():
    """With H == W, a Transpose has the shape of a Sigmoid's decomposition; it computes none of it."""
    plain = model([
        helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Transpose", ["s"], ["t"], perm=[0, 1, 3, 2]),
        helper.make_node("Add", ["t", "c"], ["a"]), helper.make_node("Softmax", ["a"], ["y"]),
    ], [1, 4, 6, 6], ["y"], [numpy_helper.from_array(RNG.standard_normal((1, 4, 1, 1)).astype(np.float32), "c")])
    decomposed = decomposed_sigmoids(plain)
    backward = pairs(decomposed, plain)
    assert all(backward[name] == name for name in backward) and "s" in backward
    report = find_first_bad_layer(decomposed, plain, {"x": RNG.standard_normal((1, 4, 6, 6)).astype(np.float32)})
    assert report.first_bad is None and report.coverage == 1.0


def test_of_two_batchnorms_in_a_row_the_folded_one_is_told_by_the_weights():
    """conv -> bn_a -> bn_b against conv(bn_a folded) -> bn_b: the remaining BatchNormalization
    carries bn_b's parameters, so it is bn_b's counterpart, not bn_a's."""
    channels = 4
    weight = RNG.standard_normal((channels, channels, 1, 1)).astype(np.float32)
    params = {f"{bn}.{p}": RNG.uniform(0.5, 1.5, channels).astype(np.float32)
              for bn in ("bn_a", "bn_b") for p in ("scale", "bias", "mean", "var")}

    def batchnorm(name: str, x: str) -> onnx.NodeProto:
        return helper.make_node("BatchNormalization", [x, *(f"{name}.{p}" for p in ("scale", "bias", "mean", "var"))], [name])

    inits = [numpy_helper.from_array(v, k) for k, v in params.items()]
    plain = model([helper.make_node("Conv", ["x", "w"], ["conv"]), batchnorm("bn_a", "conv"), batchnorm("bn_b", "bn_a"),
                   helper.make_node("Relu", ["bn_b"], ["y"])], [1, channels, 5, 5], ["y"],
                  [numpy_helper.from_array(weight, "w"), *inits])
    factor = params["bn_a.scale"] / np.sqrt(params["bn_a.var"] + 1e-5)
    folded_w = (weight * factor[:, None, None, None]).astype(np.float32)
    folded_b = (params["bn_a.bias"] - params["bn_a.mean"] * factor).astype(np.float32)
    folded = model([helper.make_node("Conv", ["x", "w", "b"], ["conv_bn"]), batchnorm("bn_b", "conv_bn"),
                    helper.make_node("Relu", ["bn_b"], ["y"])], [1, channels, 5, 5], ["y"],
                   [numpy_helper.from_array(folded_w, "w"), numpy_helper.from_array(folded_b, "b"), *inits])
    assert pairs(plain, folded) == {"bn_a": "conv_bn", "bn_b": "bn_b", "y": "y"}
    report = find_first_bad_layer(plain, folded, {"x": RNG.standard_normal((1, channels, 5, 5)).astype(np.float32)})
    assert report.first_bad is None and report.layers[0].float_tensor == "bn_a" and len(report.layers[0].float_nodes) == 2


def test_a_relu_that_a_quantize_clamps_away_may_share_its_input():
    """x -> Relu -> Transpose, and x + Relu(x): onnxruntime drops the Relu when the
    QuantizeLinear after it clamps at zero anyway, and both reads of x go through Q/DQ."""
    plain = model([
        helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Transpose", ["r"], ["t"], perm=[0, 1, 3, 2]),
        helper.make_node("Add", ["x", "r"], ["a"]),
    ], [1, 2, 3, 4], ["t", "a"])
    scale, zero = numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(-128, np.int8), "z")
    clamped = model([
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 1, 3, 2]), helper.make_node("Add", ["x", "r"], ["a"]),
    ], [1, 2, 3, 4], ["t", "a"], [scale, zero])
    assert pairs(plain, clamped) == {"t": "t", "a": "a"}
