"""Issue 13: traits of real producers' graphs, built here in code, with the true
correspondence known by construction: the pairs must be those of the plain graph, and the
planted fault named."""

import contextlib
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from layerbisect import find_first_bad_layer

from models import (
    corrupt_weights,
    make_bert,
    make_cnn,
    make_decoder,
    make_transformer,
    quant_node_for,
    quantize,
    random_inputs,
    scaled_columns,
)


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
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False, quant_format=QuantFormat[quant_format])
    quantizer = MatMulNBitsQuantizer(copy, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def shuffled_weight(model: onnx.ModelProto, node_prefix: str) -> onnx.ModelProto:
    """A copy with the weight read by the MatMul, MatMulNBits or Conv named ``node_prefix...``
    shuffled (the packed bytes of a MatMulNBits, the integer initializer behind a
    DequantizeLinear, or a float initializer)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    nodes = {out: node for node in copy.graph.node for out in node.output}
    node = next(n for n in copy.graph.node if n.name.startswith(node_prefix) and n.op_type in ("MatMulNBits", "MatMul", "Conv"))
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
    return scaled_columns(model, node_name, 1, factor)


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
    # Q, K and V in one Attention: each pairs with its block of the packed weight's columns
    assert (report.weighted, report.weighted_paired, report.weight_agreement) == (6, 6, pytest.approx(1.0))
    assert "weighted layers paired" not in report.verdict
    faulty = find_first_bad_layer(float_model, scaled_weight(optimized, "ffn1_proj", -1.0), inputs)
    assert faulty.culprit.float_nodes == ("ffn1_proj",) and faulty.first_bad_cause == "introduced"
    assert [layer.float_nodes for layer in faulty.layers] == [layer.float_nodes for layer in report.layers]
    if name == "bert":  # Q, K and V in one packed weight: the fault is the attention's
        faulty = find_first_bad_layer(float_model, scaled_weight(optimized, "Attention_0", 0.2), inputs)
        assert faulty.culprit.quant_nodes == ("Attention_0",) and faulty.first_bad_cause == "introduced"


# make_bert(vocab=...) after the optimizer: each fused op and the float span it computes (the
# position Gather reads ids computed from the input's shape alone: a constant, in no span)
EMBEDDED_SPANS = {
    "EmbedLayerNormalization_0": ("word_gather", "type_gather", "emb_add", "emb_add_position", "emb_ln"),
    "Attention_0": FUSIONS["bert"]["Attention_0"][0] + ("mask_add",),
    "SkipLayerNorm_AddBias_0": ("o_bias", "residual1", "ln1"),
    "Gelu_AddBias_0": FUSIONS["bert"]["Gelu_AddBias_0"][0],
    "SkipLayerNorm_AddBias_1": ("ffn2_bias", "residual2", "ln2"),
}


def token_inputs(vocab: int, samples: int = 2, seq: int = 8) -> list[dict[str, np.ndarray]]:
    """Token ids and an attention mask padding the last two positions of each sequence."""
    rng = np.random.default_rng(0)
    mask = np.array([[1] * (seq - 2) + [0] * 2], np.int64)
    return [{"input_ids": rng.integers(0, vocab, (1, seq)).astype(np.int64), "attention_mask": mask}
            for _ in range(samples)]


@pytest.mark.parametrize("fault,position", [("ffn1_proj", 1), ("Attention_0", 1), ("EmbedLayerNormalization_0", 5)])
def test_bert_embeddings_and_attention_mask_fused_by_the_optimizer_pair_and_a_fault_is_named(fault, position):
    """EmbedLayerNormalization computes the embeddings' Gathers, their sum and LayerNorm, and
    passes the attention mask on as a mask index, which the Attention reads where the float
    graph adds (1 - mask) * -10000 to its scores: the float mask is computed by nothing on
    the other side and compared with nothing, and every other float op pairs with its span."""
    float_model = make_bert(vocab=40)
    optimized = transformers_optimized(float_model)
    assert {"EmbedLayerNormalization", "Attention"} <= {n.op_type for n in optimized.graph.node}
    inputs = token_inputs(40)
    report = find_first_bad_layer(float_model, optimized, inputs)
    spans = {layer.quant_nodes[-1]: tuple(sorted(layer.float_nodes)) for layer in report.layers}
    assert len(spans) == len(report.layers)  # one layer per quantized op
    for quant, expected in EMBEDDED_SPANS.items():
        assert spans.pop(quant) == tuple(sorted(expected))
    assert all(floats == (quant,) for quant, floats in spans.items())  # the rest: same names
    assert report.coverage == 1.0 and (report.weighted, report.weighted_paired) == (6, 6)
    assert report.first_bad is None and min(layer.cosine for layer in report.layers) > 0.9999
    faulty = find_first_bad_layer(float_model, scaled_columns(optimized, fault, position, -1.0), inputs)
    assert faulty.first_bad.quant_nodes[-1] == fault and faulty.first_bad_cause == "introduced"
    assert faulty.culprit == faulty.first_bad
    assert [layer.float_nodes for layer in faulty.layers] == [layer.float_nodes for layer in report.layers]


HARDSWISH_FORMS = ("fused", "clip", "hardsigmoid")


class _Side:
    """Nodes and initializers of one side of ``hardswish_cnns``, each node named by ``namer``."""

    def __init__(self, namer) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.namer = namer

    def const(self, name: str, value) -> str:
        """Add a float32 initializer; its name is ``name`` numbered, so that it is unique."""
        name = f"{name}.{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def node(self, op: str, base: str, inputs: list[str], **attrs) -> str:
        """Add a node; returns its name, which is also its output's."""
        name = self.namer(op, base)
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def hardswish(self, form: str, base: str, x: str) -> tuple[str, tuple[str, ...]]:
        """x * relu6(x + 3) / 6 in ``form``: one HardSwish (opset 14), Add/Clip/Mul/Div as the
        PyTorch and Paddle exporters write it, or HardSigmoid and Mul; its output and nodes."""
        if form == "fused":
            out = self.node("HardSwish", base, [x])
            return out, (out,)
        if form == "clip":
            shifted = self.node("Add", f"{base}_add", [x, self.const(f"{base}.three", 3.0)])
            clipped = self.node("Clip", f"{base}_clip", [shifted, self.const(f"{base}.zero", 0.0),
                                                         self.const(f"{base}.six", 6.0)])
            scaled = self.node("Mul", f"{base}_mul", [x, clipped])
            out = self.node("Div", f"{base}_div", [scaled, self.const(f"{base}.div", 6.0)])
            return out, (shifted, clipped, scaled, out)
        gate = self.node("HardSigmoid", f"{base}_sigmoid", [x], alpha=1.0 / 6.0, beta=0.5)
        out = self.node("Mul", f"{base}_mul", [x, gate])
        return out, (gate, out)

    def model(self, inp: str, out: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "hardswish_cnn", [helper.make_tensor_value_info(inp, TensorProto.FLOAT, [1, 3, 16, 16])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 10])], self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def hardswish_cnns(float_form: str, rewritten_form: str, seed: int = 0):
    """A CNN of Conv -> BatchNormalization -> HardSwish blocks (a residual Add, then
    GlobalAveragePool, Flatten, Gemm), and the same network as an optimizer rewrites it: each
    BatchNormalization folded into its Conv's weights and bias (exactly, in float64), the
    HardSwish written in ``rewritten_form``, every node and tensor renamed. Returns both
    models and the true pairs, ``(float_nodes, quant_nodes)`` in the float model's order."""
    rng = np.random.default_rng(seed)
    plain = _Side(lambda op, base: base)
    counts: dict[str, int] = {}

    def renamed(op: str, base: str) -> str:  # as tools name nodes: by type, counted
        counts[op] = counts.get(op, -1) + 1
        return f"{op}.{counts[op]}"

    rewritten = _Side(renamed)
    truth = []

    def block(index: int, x: str, rx: str, cin: int, cout: int, stride: int) -> tuple[str, str]:
        w = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))
        b = 0.1 * rng.standard_normal(cout)
        gamma = rng.uniform(0.5, 2.0, cout) * rng.choice([-1.0, 1.0], cout)
        beta, mean, var = rng.uniform(-0.5, 0.5, cout), rng.uniform(-0.5, 0.5, cout), rng.uniform(0.5, 2.0, cout)
        conv = dict(kernel_shape=[3, 3], pads=[1] * 4, strides=[stride] * 2)
        name = f"conv{index}"
        y = plain.node("Conv", name, [x, plain.const(f"{name}.w", w), plain.const(f"{name}.b", b)], **conv)
        bn_params = [plain.const(f"bn{index}.{p}", v) for p, v in zip("sbmv", (gamma, beta, mean, var))]
        y = plain.node("BatchNormalization", f"bn{index}", [y, *bn_params], epsilon=1e-5)
        y, hs = plain.hardswish(float_form, f"hs{index}", y)
        factor = gamma / np.sqrt(var + 1e-5)
        folded = [rewritten.const(f"w{index}", w * factor[:, None, None, None]),
                  rewritten.const(f"b{index}", (b - mean) * factor + beta)]
        rconv = rewritten.node("Conv", "", [rx, *folded], **conv)
        ry, rhs = rewritten.hardswish(rewritten_form, "", rconv)
        truth.extend([((name, f"bn{index}"), (rconv,)), (hs, rhs)])
        return y, ry

    h1, r1 = block(1, "x", "input", 3, 8, 1)
    h2, r2 = block(2, h1, r1, 8, 8, 1)
    h, r = plain.node("Add", "add", [h1, h2]), rewritten.node("Add", "", [r1, r2])
    truth.append((("add",), (r,)))
    h, r = block(3, h, r, 8, 16, 2)
    for op, base in (("GlobalAveragePool", "gap"), ("Flatten", "flatten")):
        h, r = plain.node(op, base, [h]), rewritten.node(op, "", [r])
        truth.append(((base,), (r,)))
    fc_w, fc_b = rng.standard_normal((10, 16)) * np.sqrt(2.0 / 16), 0.1 * rng.standard_normal(10)
    plain.nodes.append(helper.make_node("Gemm", [h, plain.const("fc.w", fc_w), plain.const("fc.b", fc_b)], ["y"],
                                        name="fc", transB=1))
    rewritten.nodes.append(helper.make_node("Gemm", [r, rewritten.const("fc_w", fc_w), rewritten.const("fc_b", fc_b)],
                                            ["output"], name="Gemm.0", transB=1))
    truth.append((("fc",), ("Gemm.0",)))
    return plain.model("x", "y"), rewritten.model("input", "output"), truth


HARDSWISH_PAIRS = [("clip", "fused"), ("hardsigmoid", "fused"), ("fused", "clip"), ("fused", "hardsigmoid")]


@pytest.mark.parametrize("rewrite", ["folded", "qdq", "folded reference"])
@pytest.mark.parametrize("float_form,rewritten_form", HARDSWISH_PAIRS)
def test_folded_batchnorm_before_a_hardswish_pairs_with_the_batchnorm_not_the_bare_conv(
        float_form, rewritten_form, rewrite):
    """The rewritten model against the original, quantized or not; "folded reference": the
    original against the rewritten model, the folded Conv the reference for Conv+BN."""
    float_model, rewritten, truth = hardswish_cnns(float_form, rewritten_form)
    faulty, culprit = "Conv.1", ("conv2", "bn2")
    if rewrite == "folded reference":
        float_model, rewritten, truth = rewritten, float_model, [(quant, span) for span, quant in truth]
        faulty, culprit = "conv2", ("Conv.1",)
    if rewrite == "qdq":  # onnxruntime drops the Clip whose QuantizeLinear clamps the same
        rewritten = quantize(rewritten, "qdq")
        kept = {node.name for node in rewritten.graph.node}
        truth = [(span, tuple(n for n in quant if n in kept)) for span, quant in truth]
    inputs = random_inputs(float_model)
    report = find_first_bad_layer(float_model, rewritten, inputs)
    assert [(layer.float_nodes, layer.quant_nodes) for layer in report.layers] == truth
    assert report.coverage >= 0.95 and report.weighted_paired == report.weighted == 4
    assert {layer.evidence for layer in report.layers if len(layer.float_nodes) > 1} <= {"fused", "region"}
    assert report.first_bad is None  # folding is exact; int8 activations keep every cosine above 0.98
    broken = find_first_bad_layer(float_model, shuffled_weight(rewritten, faulty), inputs)  # conv2's
    assert [(layer.float_nodes, layer.quant_nodes) for layer in broken.layers] == truth
    assert broken.culprit.float_nodes == culprit and broken.culprit.isolated_cosine < 0.5


# Fuzz graphs (tests/fuzz_graphs.py) with a Conv -> BatchNormalization, one with two
# BatchNormalizations after a Conv, where the folded model as the reference paired its
# folded Conv with the original's bare Conv.
FOLDED_REFERENCE_CASES = [
    (94290008, ("conv", "bn", "concat")),
    (1568500638, ("conv", "conv", "bn")),
    (2131917201, ("bn", "bn", "conv", "bn", "matmul", "maxpool", "bn", "add")),
    (1669637414, ("maxpool", "transpose", "add", "conv", "bn", "bn", "mul", "gap", "softmax")),
]


@pytest.mark.parametrize("seed,ops", FOLDED_REFERENCE_CASES)
def test_a_folded_model_as_the_reference_pairs_its_conv_with_the_batchnorm_output(seed, ops):
    from fuzz_graphs import random_model, rewrite

    original = random_model(seed, ops)
    folded = rewrite(original, "fold")
    report = find_first_bad_layer(folded, original, random_inputs(folded), isolated=False)
    assert report.coverage == 1.0 and report.weighted_paired == report.weighted
    assert min(layer.cosine for layer in report.layers) > 0.9999  # folding is exact: each true pair agrees


def test_a_kv_cache_decoder_with_int4_weights_pairs_and_a_shuffled_weight_is_named():
    """An LLM decoder block as the ONNX LLM builders export it before their fusions: past and
    present key/value tensors, RMSNorm decomposed, a SiLU-gated MLP, weights in int4 blocks."""
    float_model = make_decoder()
    quant = int4(float_model, "QOperator")
    shapes = {"x": (1, 4, 64), "past_key": (1, 2, 6, 32), "past_value": (1, 2, 6, 32)}
    clean = find_first_bad_layer(float_model, quant, shapes=shapes)
    assert clean.coverage == 1.0 and clean.first_bad is None and (clean.weighted, clean.weighted_paired) == (7, 7)
    assert {name for name, _ in clean.outputs} == {"y", "present_key", "present_value"}
    assert all(layer.quant_nodes == (f"{layer.float_nodes[0]}_Q4",) for layer in clean.layers if layer.op_type == "MatMul"
               and layer.float_nodes[0].endswith(("proj", "gate", "up", "down")))
    faulty = find_first_bad_layer(float_model, shuffled_weight(quant, "gate"), shapes=shapes)
    assert faulty.culprit.float_nodes == ("gate",) and faulty.first_bad_cause == "introduced"
