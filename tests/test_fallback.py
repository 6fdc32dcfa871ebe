"""Which layers to keep in float: found, minimal, and verified by running the repaired model."""

from functools import lru_cache

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from layerbisect import LayerbisectError, find_first_bad_layer
from layerbisect.fallback import bypass, keep_in_float
from layerbisect.find import setup
from models import corrupt_weights, make_cnn, make_transformer, quant_node_for, quantize, random_inputs

BUILDERS = {"cnn": make_cnn, "transformer": make_transformer}


@lru_cache(maxsize=None)
def models(name: str):
    float_model = BUILDERS[name]()
    return float_model, quantize(float_model, "qdq")


def samples(model, n=3):
    return [random_inputs(model, seed) for seed in range(n)]


def output_cosine(float_model, model, feeds) -> float:
    report = find_first_bad_layer(float_model, model, feeds, isolated=False)
    return next(layer.cosine for layer in report.layers if layer.float_tensor == "y")


@pytest.mark.parametrize("name,faults", [("cnn", ["conv2"]), ("transformer", ["ffn1_proj"]), ("cnn", ["conv1", "conv3"])])
def test_fallback_repairs_and_every_member_is_needed(name, faults):
    float_model, quant = models(name)
    broken = quant
    for fault in faults:
        broken = corrupt_weights(broken, quant_node_for(broken, fault, float_model))
    feeds = samples(float_model)
    fix = keep_in_float(float_model, broken, feeds)
    assert fix and fix.cosine_before < 0.98 <= fix.cosine_after
    assert set(fix.nodes_to_exclude) == set(faults)
    assert output_cosine(float_model, fix.repaired, feeds) >= 0.98  # verified independently
    kept = [p for p in _pairs(float_model, broken) if p.quant_nodes[0] in fix.nodes_to_exclude]
    for member in kept:  # each one is needed
        rest = [p for p in kept if p is not member]
        assert output_cosine(float_model, bypass(float_model, broken, rest), feeds) < 0.98


def _pairs(float_model, quant_model):
    return setup(float_model, quant_model).alignment.pairs


def test_healthy_model_needs_nothing():
    float_model, quant = models("cnn")
    fix = keep_in_float(float_model, quant, samples(float_model))
    assert fix.float_nodes == () and fix.cosine_after == fix.cosine_before >= 0.98


def test_bypass_puts_back_the_relu_the_quantizer_folded_into_quantization():
    float_model, quant = models("cnn")
    everything = _pairs(float_model, quant)
    repaired = bypass(float_model, quant, everything)
    assert output_cosine(float_model, repaired, samples(float_model)) > 0.9999  # only the input stays quantized
    assert len(quant.graph.node) == len(models("cnn")[1].graph.node)  # the argument is untouched


def outlier_mlp() -> onnx.ModelProto:
    """x[8,32] -> MatMul+Relu (fc1) -> MatMul+Relu (fc2, with outlier weights) -> MatMul (fc3)."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(3):
        w = (rng.standard_normal((32, 32)) / np.sqrt(32)).astype(np.float32)
        if i == 1:
            w[0, :] = 40.0  # a dead input row with huge weights: the int8 scale is ruined
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"fc{i}"], name=f"fc{i}"))
        x = f"fc{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [x], [f"relu{i}"], name=f"relu{i}"))
            x = f"relu{i}"
    nodes[0].input[0] = "x"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 32])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [8, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return model


def test_suggestion_pasted_into_onnxruntime_quantizer_repairs_a_real_quantization_loss():
    float_model = outlier_mlp()
    feeds = [{"x": np.abs(np.random.default_rng(s).standard_normal((8, 32))).astype(np.float32) * np.r_[0, np.ones(31)].astype(np.float32)}
             for s in range(3)]
    calibration = [{"x": f["x"]} for f in feeds]
    quant = quantize(float_model, "qdq", calibration_inputs=calibration)
    fix = keep_in_float(float_model, quant, feeds)
    assert fix.cosine_before < 0.98 and fix.nodes_to_exclude == ("fc1",)
    requantized = quantize(float_model, "qdq", calibration_inputs=calibration, nodes_to_exclude=list(fix.nodes_to_exclude))
    report = find_first_bad_layer(float_model, requantized, feeds)
    assert report.first_bad is None


def test_only_qdq_models():
    float_model = make_cnn()
    with pytest.raises(LayerbisectError, match="needs a QDQ model"):
        keep_in_float(float_model, quantize(float_model, "dynamic"))


def test_outputs_to_paste(tmp_path):
    float_model, quant = models("cnn")
    broken = corrupt_weights(quant, "conv2")
    fix = keep_in_float(float_model, broken, samples(float_model, 1))
    assert '"nodes_to_exclude": [\n    "conv2"\n  ]' in fix.to_json()
    fix.save_model(tmp_path / "repaired.onnx")
    assert output_cosine(float_model, onnx.load(tmp_path / "repaired.onnx"), samples(float_model, 1)) >= 0.98
