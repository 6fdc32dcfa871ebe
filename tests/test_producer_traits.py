"""Issue 13: traits of real producers' graphs, built here in code, with the true
correspondence known by construction: the pairs must be those of the plain graph, and the
planted fault named."""

import contextlib
import logging

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from layerbisect import find_first_bad_layer
from models import corrupt_weights, make_bert, make_cnn, make_transformer, quant_node_for, quantize, random_inputs


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


def int4(model: onnx.ModelProto, quant_format: str) -> onnx.ModelProto:
    """``model`` with its MatMul weights in int4 blocks of 32, by onnxruntime's
    MatMulNBitsQuantizer: com.microsoft MatMulNBits ("QOperator") or blocked DequantizeLinear
    of int4 initializers ("QDQ")."""
    pytest.importorskip("onnx_ir", reason="onnxruntime's MatMulNBitsQuantizer needs onnx_ir")
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False, quant_format=QuantFormat[quant_format])
    quantizer = MatMulNBitsQuantizer(copy, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def shuffled_weight(model: onnx.ModelProto, node_prefix: str) -> onnx.ModelProto:
    """A copy with the integer weight read by the node named ``node_prefix...`` shuffled (the
    packed bytes of a MatMulNBits, or the int4 initializer behind a DequantizeLinear)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    nodes = {out: node for node in copy.graph.node for out in node.output}
    node = next(n for n in copy.graph.node if n.name.startswith(node_prefix) and n.op_type in ("MatMulNBits", "MatMul"))
    name = node.input[1]
    if name in nodes:  # through its DequantizeLinear
        name = nodes[name].input[0]
    init = next(i for i in copy.graph.initializer if i.name == name)
    values = numpy_helper.to_array(init)
    shuffled = np.random.default_rng(0).permutation(values.reshape(-1)).reshape(values.shape)
    init.CopyFrom(numpy_helper.from_array(shuffled, name))
    return copy


@pytest.mark.parametrize("quant_format", ["QOperator", "QDQ"])
def test_int4_weights_pair_as_matmuls_and_a_shuffled_one_is_named(quant_format):
    float_model = make_transformer(hidden=64)
    quant = int4(float_model, quant_format)
    inputs = random_inputs(float_model)
    clean = find_first_bad_layer(float_model, quant, inputs)
    matmuls = {layer.float_nodes[-1]: layer for layer in clean.layers if layer.op_type == "MatMul"}
    weighted = ("q_proj", "k_proj", "v_proj", "o_proj", "ffn1_proj", "ffn2_proj")
    assert all(matmuls[name].quant_nodes[-1].startswith(name) for name in weighted)
    assert clean.coverage == 1.0 and clean.first_bad is None
    assert min(matmuls[name].isolated_cosine for name in weighted) > 0.99  # int4 blocks of 32
    report = find_first_bad_layer(float_model, shuffled_weight(quant, "ffn1_proj"), inputs)
    assert report.culprit.float_nodes == ("ffn1_proj",) and report.culprit.isolated_cosine < 0.5
    assert [(layer.float_nodes, layer.quant_tensor) for layer in report.layers] == \
        [(layer.float_nodes, layer.quant_tensor) for layer in clean.layers]


def transformers_optimized(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` after onnxruntime's transformers optimizer (model type bert, 2 heads of 32)."""
    from onnxruntime.transformers.optimizer import optimize_model

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with quiet_logging():
        return optimize_model(copy, model_type="bert", num_heads=2, hidden_size=64, opt_level=0).model


@contextlib.contextmanager
def quiet_logging():
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def scaled_weight(model: onnx.ModelProto, node_name: str, factor: float) -> onnx.ModelProto:
    """A copy with the float weight (input 1) of node ``node_name`` multiplied by ``factor``
    on its first half of columns: a fault no rescaling explains."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    node = next(n for n in copy.graph.node if n.name == node_name)
    init = next(i for i in copy.graph.initializer if i.name == node.input[1])
    values = numpy_helper.to_array(init).copy()
    values[..., : values.shape[-1] // 2] *= factor
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    return copy


# The true correspondence, by construction: each fused op of the optimized graph and the float
# span it computes (the last float op holds the value compared).
FUSIONS = {
    "transformer": {  # pre-norm: the residual sum is SkipLayerNormalization's output 3
        "SkipLayerNorm_AddBias_0": [("o_bias", "residual1"), ("ln2",)],
        "Gelu_AddBias_0": [("ffn1_bias", "gelu_div", "gelu_erf", "gelu_add", "gelu_mul", "gelu_half")],
    },
    "bert": {
        "Attention_0": [("q_proj", "q_bias", "q_reshape", "q_transpose", "k_proj", "k_bias", "k_reshape",
                         "k_transpose", "qk_matmul", "qk_scale", "softmax", "v_proj", "v_bias", "v_reshape",
                         "v_transpose", "attn_v", "attn_transpose", "attn_reshape")],
        "SkipLayerNorm_AddBias_0": [("o_bias", "residual1", "ln1")],
        "Gelu_AddBias_0": [("ffn1_bias", "gelu_div", "gelu_erf", "gelu_add", "gelu_mul", "gelu_half")],
        "SkipLayerNorm_AddBias_1": [("ffn2_bias", "residual2", "ln2")],
    },
}


@pytest.mark.parametrize("name,make", [("transformer", lambda: make_transformer(hidden=64)), ("bert", make_bert)])
def test_transformers_optimizer_fusions_pair_with_their_spans_and_a_fault_is_named(name, make):
    """Attention, SkipLayerNormalization (with and without its residual-sum output) and
    BiasGelu: each pairs with the float span it computes; every other op with its namesake."""
    float_model = make()
    optimized = transformers_optimized(float_model)
    assert {"SkipLayerNormalization", "BiasGelu"} <= {n.op_type for n in optimized.graph.node}
    inputs = random_inputs(float_model)
    report = find_first_bad_layer(float_model, optimized, inputs)
    spans: dict[str, list] = {}
    for layer in report.layers:
        (quant,) = set(layer.quant_nodes[-1:])
        spans.setdefault(quant, []).append(layer.float_nodes)
    for quant, expected in FUSIONS[name].items():
        assert [tuple(sorted(span)) for span in spans.pop(quant)] == [tuple(sorted(span)) for span in expected]
    assert all(floats == [(quant,)] for quant, floats in spans.items())  # the rest: same names
    assert report.coverage == 1.0 and report.first_bad is None
    assert min(layer.cosine for layer in report.layers) > 0.9999
    fused = 3 if name == "bert" else 0  # Q, K and V in one Attention
    assert (report.weighted, report.weighted_paired) == (6, 6 - fused)
    assert ("only 3 of 6 weighted layers paired one for one" in report.verdict) == bool(fused)
    faulty = find_first_bad_layer(float_model, scaled_weight(optimized, "ffn1_proj", -1.0), inputs)
    assert faulty.culprit.float_nodes == ("ffn1_proj",) and faulty.first_bad_cause == "introduced"
    assert [layer.float_nodes for layer in faulty.layers] == [layer.float_nodes for layer in report.layers]
    if name == "bert":  # Q, K and V in one packed weight: the fault is the attention's
        faulty = find_first_bad_layer(float_model, scaled_weight(optimized, "Attention_0", 0.2), inputs)
        assert faulty.culprit.quant_nodes == ("Attention_0",) and faulty.first_bad_cause == "introduced"
