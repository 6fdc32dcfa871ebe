"""Which layers to keep in float: found, minimal, and verified by running the repaired model."""

import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from layerbisect import LayerbisectError, find_first_bad_layer
from layerbisect.fallback import bypass, keep_in_float
from layerbisect.pipeline import setup

from fuzz_graphs import OPS, Unquantizable, corrupt, random_model, rewrite, weighted_nodes
from models import (
    corrupt_weights,
    make_cnn,
    make_transformer,
    output_cosines,
    quant_node_for,
    quantization_left,
    quantize,
    random_inputs,
)

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
    assert fix and fix.float_nodes == () and fix.cosine_after == fix.cosine_before >= 0.98
    assert str(fix).startswith("nothing to keep in float")


def written(fix, tmp_path) -> onnx.ModelProto:
    """The repaired model as ``save_model`` wrote it, loaded back."""
    fix.save_model(tmp_path / "repaired.onnx")
    return onnx.load(tmp_path / "repaired.onnx")


@pytest.mark.parametrize("name", BUILDERS)
def test_every_layer_in_float_computes_the_float_model(name, tmp_path):
    """Weights, constants and graph inputs read in float, every output handed on unquantized:
    no QuantizeLinear or DequantizeLinear is left, and onnxruntime computes the float outputs."""
    float_model, quant = models(name)
    pairs = _pairs(float_model, quant)
    onnx.save(bypass(float_model, quant, pairs), tmp_path / "all.onnx")
    model = onnx.load(tmp_path / "all.onnx")
    assert not {"QuantizeLinear", "DequantizeLinear"} & {node.op_type for node in model.graph.node}
    cosines = output_cosines(float_model, model, random_inputs(float_model, 7))
    assert min(cosines.values()) > 0.99999, cosines


@pytest.mark.parametrize("name,fault", [("cnn", "conv2"), ("transformer", "ffn1_proj")])
def test_the_written_model_runs_the_layers_kept_in_float_in_float(name, fault, tmp_path):
    float_model, quant = models(name)
    broken = corrupt_weights(quant, quant_node_for(quant, fault, float_model))
    fix = keep_in_float(float_model, broken, samples(float_model))
    model = written(fix, tmp_path)
    assert fix.freed and quantization_left(model, fix.freed) == []
    assert fix.attempted == fix.float_nodes
    assert min(output_cosines(float_model, model, samples(float_model)[0]).values()) >= 0.98


def test_the_repair_judges_every_layer_as_the_verdict_does(tmp_path):
    """At a threshold between the lowest layer cosine and the output's, the report fails while
    the output passes: keeping nothing in float is no repair, and what is suggested passes the
    report. (The transformer's lowest layer is inside it, below its output.)"""
    float_model, quant = models("transformer")
    feeds = samples(float_model)
    report = find_first_bad_layer(float_model, quant, feeds, isolated=False)
    lowest = min(layer.cosine for layer in report.layers)
    threshold = (lowest + output_cosine(float_model, quant, feeds)) / 2
    assert find_first_bad_layer(float_model, quant, feeds, threshold, isolated=False).first_bad is not None
    fix = keep_in_float(float_model, quant, feeds, threshold)
    assert fix.cosine_before == lowest and fix.nodes_to_exclude != ()
    assert fix and find_first_bad_layer(float_model, written(fix, tmp_path), feeds, threshold).first_bad is None


def test_a_fault_no_layer_in_float_can_undo_is_not_reported_as_a_fix(tmp_path):
    """A float constant of the quantized model (a BatchNorm variance, read without Q/DQ) made
    wrong: keeping layers in float restores quantized values only, so nothing repairs. Nothing
    is suggested; the result says how close the best attempt came, never below the start."""
    float_model, quant = models("cnn")
    broken = onnx.ModelProto()
    broken.CopyFrom(quant)
    var = next(init for init in broken.graph.initializer if init.name == "bn1.var")
    var.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(var) * 1e4, "bn1.var"))
    fix = keep_in_float(float_model, broken, samples(float_model))
    assert not fix and fix.float_nodes == fix.nodes_to_exclude == ()
    assert fix.cosine_before <= fix.cosine_after < 0.98
    assert str(fix).startswith("no set of layers kept in float repairs the model")
    assert f"reaches {fix.cosine_after:.4f}" in str(fix) and '"repairs": false' in fix.to_json()
    assert quantization_left(written(fix, tmp_path), fix.freed) == []


@settings(max_examples=8, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=8).map(tuple),
    fault=st.integers(0, 999),
)
def test_random_graphs_are_repaired_or_said_not_to_be(seed, ops, fault):
    """A random graph quantized QDQ from a copy with one weight negated: the written model
    keeps its suggestion in float and passes the report, or nothing is suggested; every layer
    in float computes the float model."""
    model = random_model(seed, ops)
    weighted = weighted_nodes(model)
    faulty = corrupt(model, weighted[fault % len(weighted)][1], shuffle=False) if weighted else model
    try:
        quant = rewrite(faulty, "qdq")
        fix = keep_in_float(model, quant, random_inputs(model, seed))
    except (Unquantizable, LayerbisectError) as exc:  # refused: not quantizable, or nothing quantized
        event(f"refused: {type(exc).__name__}")
        return
    event("repaired" if fix and fix.nodes_to_exclude else "passes as it is" if fix else "no repair")
    report = find_first_bad_layer(model, quant, random_inputs(model, seed), isolated=False)
    assert (fix.cosine_before >= 0.98) == (report.first_bad is None)
    with tempfile.TemporaryDirectory() as folder:
        repaired = written(fix, Path(folder))
    assert quantization_left(repaired, fix.freed) == []
    if fix:
        assert find_first_bad_layer(model, repaired, random_inputs(model, seed)).first_bad is None
    else:
        assert fix.nodes_to_exclude == () and fix.cosine_after >= fix.cosine_before
    everything = bypass(model, quant, _pairs(model, quant))
    assert min(output_cosines(model, everything, random_inputs(model, 3)).values()) > 0.9999


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
    assert output_cosine(float_model, written(fix, tmp_path), samples(float_model, 1)) >= 0.98
