"""Two models that are not one network: another architecture with the same inputs and outputs
is refused, the same architecture with other weights is said to share nothing, and what
quantizers and optimizers do to one network's weights is neither."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from layerbisect import LayerbisectError, find_first_bad_layer
from layerbisect.cli import main
from layerbisect.graph import build_graph
from layerbisect.weights import channel_agreement

from models import corrupt_weights, make_cnn, make_transformer, quant_node_for, quantize, random_inputs
from test_rewrites import copy, fold_batchnorm
from test_unusual_models import to_float16

CNN = make_cnn()
X = random_inputs(CNN)
SHARE_NOTHING = "the weights share nothing"


def mlp_like_cnn() -> onnx.ModelProto:
    """x [1,3,16,16] -> Flatten -> MatMul -> Relu -> MatMul -> y [1,10]: the CNN's inputs and
    outputs, another network."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array((rng.standard_normal((768, 32)) * 0.05).astype(np.float32), "w0"),
             numpy_helper.from_array((rng.standard_normal((32, 10)) * 0.2).astype(np.float32), "w1")]
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat", axis=1),
             helper.make_node("MatMul", ["f", "w0"], ["h"], name="fc0"),
             helper.make_node("Relu", ["h"], ["r"], name="relu0"),
             helper.make_node("MatMul", ["r", "w1"], ["y"], name="fc1")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_another_network_with_the_same_inputs_and_outputs_is_refused(tmp_path, capsys):
    """Unrefused, the whole CNN became one region against the whole MLP, reported as layer #0."""
    message = "the two models do not compute the same network: 0 of 4 weighted layers pair"
    with pytest.raises(LayerbisectError, match=message + ".*first without a counterpart is 'conv1'"):
        find_first_bad_layer(CNN, mlp_like_cnn(), X)
    onnx.save(CNN, tmp_path / "cnn.onnx")
    onnx.save(mlp_like_cnn(), tmp_path / "mlp.onnx")
    assert main([str(tmp_path / "cnn.onnx"), str(tmp_path / "mlp.onnx")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("other", ["float", "qdq"])
def test_the_same_architecture_with_other_weights_shares_nothing(other):
    """Another seed of the CNN, as it is or quantized: every layer pairs, no weight agrees."""
    retrained = make_cnn(seed=1) if other == "float" else quantize(make_cnn(seed=1), "qdq")
    report = find_first_bad_layer(CNN, retrained, X)
    assert report.weighted == report.weighted_paired == 4
    assert report.weight_agreement < 0.15  # measured 0.12
    assert report.weights_unrelated and SHARE_NOTHING in report.verdict
    assert any(note.startswith(SHARE_NOTHING) and "another training" in note for note in report.notes)


def int4(model: onnx.ModelProto) -> onnx.ModelProto:
    return quantize(model, "qdq", weight_type="int4", per_channel=True)


QUANTIZERS = {
    "qdq": lambda m: quantize(m, "qdq"),
    "qdq per channel": lambda m: quantize(m, "qdq", per_channel=True),
    "qoperator": lambda m: quantize(m, "qoperator"),
    "qoperator per channel": lambda m: quantize(m, "qoperator", per_channel=True),
    "dynamic": lambda m: quantize(m, "dynamic"),
    "dynamic per channel": lambda m: quantize(m, "dynamic", per_channel=True),
    "int4 weights": int4,
}


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("float_model, weighted", [(CNN, 4), (make_transformer(), 6)], ids=["cnn", "transformer"])
def test_quantization_keeps_every_weighted_layer_and_its_weights(quantizer, float_model, weighted):
    quant = QUANTIZERS[quantizer](float_model)
    report = find_first_bad_layer(float_model, quant, random_inputs(float_model), isolated=False)
    assert report.weighted == report.weighted_paired == weighted
    assert report.weight_agreement > (0.99 if quantizer == "int4 weights" else 0.999)  # int4 measured 0.994
    assert not report.weights_unrelated and SHARE_NOTHING not in str(report)
    assert f"weighted layers paired: {weighted} of {weighted}" in report.summary_line()
    data = json.loads(report.to_json())
    assert (data["weighted"], data["weighted_paired"]) == (weighted, weighted)


OPTIMIZED = {
    "batchnorm folded": fold_batchnorm(CNN),
    "batchnorm folded, qdq per channel": quantize(fold_batchnorm(CNN), "qdq", per_channel=True),
    "float16": to_float16(CNN),
}


@pytest.mark.parametrize("rewrite", OPTIMIZED)
def test_folding_and_float16_keep_every_weighted_layer_and_its_weights(rewrite):
    """BatchNorm folding scales each output channel of the Conv before it."""
    report = find_first_bad_layer(CNN, OPTIMIZED[rewrite], X, isolated=False)
    assert report.weighted == report.weighted_paired == 4
    assert report.weight_agreement > 0.999 and not report.weights_unrelated


def zero_weight(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    out = copy(model)
    init = next(i for i in out.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(init)), name))
    return out


QDQ = quantize(CNN, "qdq")
CORRUPTED = {
    "shuffled": corrupt_weights(QDQ, quant_node_for(QDQ, "conv2")),
    "negated": fold_batchnorm(CNN, flip="conv2"),
    "zeroed": zero_weight(CNN, "conv2.weight"),
}


@pytest.mark.parametrize("fault", CORRUPTED)
def test_one_corrupted_layer_is_named_not_taken_for_other_weights(fault):
    report = find_first_bad_layer(CNN, CORRUPTED[fault], X)
    assert report.weighted == report.weighted_paired == 4
    assert report.weight_agreement > 0.999 and not report.weights_unrelated
    assert SHARE_NOTHING not in str(report)
    assert report.first_bad.float_nodes[0] == "conv2" and report.first_bad_cause == "introduced"


def linear(weight: np.ndarray, gemm: bool) -> onnx.ModelProto:
    """x [1,16] times ``weight`` [16,n]: a MatMul, or a Gemm holding the transposed weight."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.shape[1]])
    stored = weight.T if gemm else weight
    node = helper.make_node("Gemm" if gemm else "MatMul", ["x", "w"], ["y"], name="fc", **({"transB": 1} if gemm else {}))
    graph = helper.make_graph([node], "fc", [x], [y], [numpy_helper.from_array(stored.astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_channel_agreement_ignores_scale_sign_offset_and_orientation_per_channel():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 10))
    scale = rng.uniform(0.2, 3.0, 10) * rng.choice([-1.0, 1.0], 10)  # per output channel
    rescaled = weight * scale + rng.standard_normal(10)  # and an offset per channel
    fc = build_graph(linear(weight, gemm=False)).op("fc")
    assert channel_agreement(fc, build_graph(linear(rescaled, gemm=True)).op("fc")) == pytest.approx(1.0)
    other = build_graph(linear(rng.standard_normal((16, 10)), gemm=True)).op("fc")
    assert channel_agreement(fc, other) < 0.5
    assert channel_agreement(fc, build_graph(linear(weight[:, :8], gemm=False)).op("fc")) is None  # 8 channels
