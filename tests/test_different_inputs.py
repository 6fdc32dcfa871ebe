"""Model pairs that declare different inputs (issue: inputs when the two models differ)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from layerbisect import LayerbisectError, find_first_bad_layer

RNG = np.random.default_rng(7)
WEIGHT = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)


def conv_net(*, gain_input: bool = False, nhwc: bool = False, gain: float = 1.0, weight=WEIGHT) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv -> Mul(gain) -> Relu -> y; the gain is an input or a constant."""
    inits = [numpy_helper.from_array(weight, "w")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 3] if nhwc else [1, 3, 8, 8])]
    nodes = []
    x = "x"
    if nhwc:
        nodes.append(helper.make_node("Transpose", ["x"], ["x_nchw"], name="to_nchw", perm=[0, 3, 1, 2]))
        x = "x_nchw"
    if gain_input:
        inputs.append(helper.make_tensor_value_info("gain", TensorProto.FLOAT, [1]))
    else:
        inits.append(numpy_helper.from_array(np.array([gain], np.float32), "gain"))
    nodes += [
        helper.make_node("Conv", [x, "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "gain"], ["m"], name="gain_mul"),
        helper.make_node("Relu", ["m"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(nodes, "net", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


X = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)


def test_input_declared_by_one_model_only_goes_to_that_model():
    report = find_first_bad_layer(conv_net(gain_input=True), conv_net(gain=2.0), {"x": X, "gain": np.array([2.0], np.float32)})
    assert report.first_bad is None and report.coverage == 1.0
    assert [layer.float_nodes for layer in report.layers] == [("conv",), ("gain_mul",), ("relu",)]
    assert any("'gain' is declared by the float model only" in note for note in report.notes)


def test_value_baked_differently_is_found():
    report = find_first_bad_layer(conv_net(gain_input=True), conv_net(gain=-1.0), {"x": X, "gain": np.array([2.0], np.float32)})
    assert report.first_bad.float_nodes == ("gain_mul",)


def test_declared_input_missing_from_feeds_names_model_and_flag():
    with pytest.raises(LayerbisectError) as info:
        find_first_bad_layer(conv_net(gain_input=True), conv_net(), {"x": X})
    assert "the float model needs input 'gain' (float32[1])" in str(info.value)
    assert "--input gain=FILE.npy" in str(info.value)


def test_random_inputs_cover_both_models():
    report = find_first_bad_layer(conv_net(), conv_net(gain_input=True), seed=1)
    assert report.layers[0].cosine == pytest.approx(1.0)  # the conv sees the same x in both


def test_nhwc_input_is_permuted_for_the_model_that_needs_it():
    report = find_first_bad_layer(conv_net(), conv_net(nhwc=True), {"x": X})
    assert report.first_bad is None and report.coverage == 1.0
    assert [layer.quant_nodes for layer in report.layers] == [("conv",), ("gain_mul",), ("relu",)]
    assert report.layers[-1].cosine == pytest.approx(1.0)
    assert any("permuted between NCHW" in note for note in report.notes)
    broken = find_first_bad_layer(conv_net(), conv_net(nhwc=True, weight=-WEIGHT), {"x": X})
    assert broken.first_bad.float_nodes == ("conv",)


def test_nhwc_feed_is_permuted_for_the_nchw_model():
    report = find_first_bad_layer(conv_net(nhwc=True), conv_net(), {"x": X.transpose(0, 2, 3, 1)})
    assert report.first_bad is None and [layer.float_nodes for layer in report.layers] == [("conv",), ("gain_mul",), ("relu",)]
    assert report.unaligned == () and report.coverage == 1.0
    assert any("permuted between NHWC" in note for note in report.notes)


def test_other_shape_differences_are_an_error():
    other = conv_net()
    other.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 16
    other.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 16
    with pytest.raises(LayerbisectError, match="only an NCHW/NHWC difference"):
        find_first_bad_layer(conv_net(), other, {"x": X})
