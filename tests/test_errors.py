"""Bad input gets a clear LayerbisectError, never a traceback from inside a dependency."""

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from layerbisect import LayerbisectError, find_first_bad_layer

from models import make_cnn, make_transformer, random_inputs


def scaled(factor: float, op: str = "Mul", domain: str = "") -> onnx.ModelProto:
    """y = op(x, factor) on x float32[2, 3]."""
    node = helper.make_node(op, ["x", "k"], ["y"], name="scale", domain=domain)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.array(factor, np.float32), "k")],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


X = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}


def test_missing_file(tmp_path):
    with pytest.raises(LayerbisectError, match="quantized model file not found: .*nope.onnx"):
        find_first_bad_layer(scaled(1.0), tmp_path / "nope.onnx")


def test_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model")
    with pytest.raises(LayerbisectError, match="float model .*notes.onnx is not a readable ONNX file"):
        find_first_bad_layer(path, scaled(1.0))
    assert path.read_text() == "this is not a model"


def test_truncated_onnx(tmp_path):
    path = tmp_path / "cut.onnx"
    path.write_bytes(make_cnn().SerializeToString()[:1500])
    with pytest.raises(LayerbisectError, match="cut.onnx is not a readable ONNX file|has no nodes|cannot load"):
        find_first_bad_layer(make_cnn(), path)


def test_wrong_argument_type():
    with pytest.raises(LayerbisectError, match="expected a path to an .onnx file or an onnx.ModelProto, got int"):
        find_first_bad_layer(3, scaled(1.0))


def with_custom_op(before: bool) -> onnx.ModelProto:
    """scaled(1.0) with a vendor op onnxruntime does not know before or after its Mul."""
    custom = scaled(1.0)
    if before:
        custom.graph.node[0].input[0] = "t"
        custom.graph.node.insert(0, helper.make_node("VendorClip", ["x"], ["t"], name="clip", domain="com.vendor"))
    else:
        custom.graph.node[0].output[0] = "t"
        custom.graph.node.append(helper.make_node("VendorClip", ["t"], ["y"], name="clip", domain="com.vendor"))
    custom.opset_import.append(helper.make_opsetid("com.vendor", 1))
    return custom


def test_model_onnxruntime_cannot_load_names_model_and_op():
    with pytest.raises(LayerbisectError, match="onnxruntime cannot load the quantized model: .*com.vendor:VendorClip"):
        find_first_bad_layer(scaled(1.0), with_custom_op(before=True), X)


def test_an_unknown_op_after_every_aligned_layer_is_never_run():
    report = find_first_bad_layer(scaled(1.0), with_custom_op(before=False), X)
    assert [layer.float_nodes for layer in report.layers] == [("scale",)]
    assert report.layers[0].cosine == pytest.approx(1.0) and report.first_bad is None


@pytest.mark.parametrize("threshold", [0, -0.5, 1.01, float("nan"), "0.9"])
def test_threshold_out_of_range(threshold):
    with pytest.raises(LayerbisectError, match="threshold must be in \\(0, 1\\]"):
        find_first_bad_layer(scaled(1.0), scaled(1.0), X, threshold=threshold)


def test_wrong_dtype_names_expected_and_got():
    with pytest.raises(LayerbisectError, match=r"input 'x' of the float model expects float32\[2,3\], got float64\[2,3\]"):
        find_first_bad_layer(scaled(1.0), scaled(1.0), {"x": np.zeros((2, 3))})


def test_missing_and_unknown_inputs():
    with pytest.raises(LayerbisectError, match="needs input 'x'"):
        find_first_bad_layer(scaled(1.0), scaled(1.0), {})
    with pytest.raises(LayerbisectError, match="'y' is not an input of either model"):
        find_first_bad_layer(scaled(1.0), scaled(1.0), {**X, "y": np.zeros(1)})


def test_inputs_of_the_wrong_kind():
    with pytest.raises(LayerbisectError, match="inputs must be a dict"):
        find_first_bad_layer(scaled(1.0), scaled(1.0), np.zeros((2, 3), np.float32))
    with pytest.raises(LayerbisectError, match="a sample must be a dict"):
        find_first_bad_layer(scaled(1.0), scaled(1.0), [np.zeros((2, 3), np.float32)])


@pytest.mark.parametrize("empty", [[], iter(())])
def test_no_samples(empty):
    with pytest.raises(LayerbisectError, match="inputs holds no sample"):
        find_first_bad_layer(scaled(1.0), scaled(1.0), empty)


def test_unrelated_models_say_nothing_aligned():
    with pytest.raises(LayerbisectError, match="no layer of the float model could be paired.*same network"):
        find_first_bad_layer(scaled(1.0, op="Add"), scaled(1.0, op="Mul"), X)
    emptied = scaled(1.0)  # what an optimizer leaves of a graph whose layers cancel out
    emptied.graph.node[0].CopyFrom(helper.make_node("Identity", ["x"], ["y"], name="scale"))
    with pytest.raises(LayerbisectError, match="the quantized model computes nothing"):
        find_first_bad_layer(scaled(1.0), emptied, X)
    with pytest.raises(LayerbisectError, match="input 'x' is float32\\[1,3,16,16\\] in the float model but float32\\[1,8,32\\]"):
        find_first_bad_layer(make_cnn(), make_transformer(), random_inputs(make_cnn()))


def test_nan_in_the_quantized_model_is_reported_as_bad_not_raised():
    report = find_first_bad_layer(scaled(2.0), scaled(float("nan")), X)
    assert report.first_bad is not None and report.first_bad.nonfinite == 6
    assert math.isnan(report.first_bad.cosine)
    assert '"cosine": "nan"' in report.to_json()


def test_all_zero_tensors_compare_as_equal():
    report = find_first_bad_layer(scaled(0.0), scaled(0.0), X)
    assert report.first_bad is None and report.layers[0].cosine == 1.0


def test_zero_against_nonzero_is_bad():
    report = find_first_bad_layer(scaled(1.0), scaled(0.0), X)
    assert report.first_bad.cosine == 0.0


def test_numpy_threshold_is_a_number_and_bool_is_not():
    assert find_first_bad_layer(scaled(1.0), scaled(1.0), X, threshold=np.float32(0.98)).threshold == pytest.approx(0.98)
    with pytest.raises(LayerbisectError, match="threshold must be in"):
        find_first_bad_layer(scaled(1.0), scaled(1.0), X, threshold=True)


def test_negative_shape_for_random_inputs():
    dynamic = scaled(1.0)
    dynamic.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "n"
    with pytest.raises(LayerbisectError, match=r"shape \[-2, 3\] given for input 'x' does not fit"):
        find_first_bad_layer(dynamic, dynamic, shapes={"x": (-2, 3)})
