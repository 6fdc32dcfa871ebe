"""Issue 13: traits of real producers' graphs, built here in code, each with the true
correspondence of values known by construction.

- Two exports of one transformer: tests/models.py's ``make_transformer`` and a second
  exporter's style of the same weights and the same function (shapes computed at run time,
  LayerNorm decomposed, an attention mask applied by a ``Where``, swapped ``Add`` operands,
  ``Gemm`` with transB between Reshapes, another order of the Gelu's products, other names);
  Q, K and V as MatMuls, as Gemms on a 2-D view, or fused into one MatMul then a Split.
- Weight-only int8 as ``Cast`` + ``Mul`` of initializers, dequantized in the graph.
- fp16 conversion by onnxconverter-common, with ``Cast`` glue at the inputs, the outputs and
  around the operations kept in float32.

Each test asserts that at least 95% of the float values that have a counterpart are paired,
that no pair is wrong, and that a weight shuffled on the second side is named.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from layerbisect import find_first_bad_layer
from layerbisect.align import Alignment, align, is_weighted
from layerbisect.graph import build_graph

from models import OPSET, float16, make_cnn, make_transformer, random_inputs, weight_only_int8

SEQ, HIDDEN, HEADS = 8, 32, 2  # make_transformer's defaults
EPS = 1e-5  # make_transformer's LayerNorm epsilon
PAIRED = 0.95  # share of the values with a counterpart that must pair


def transformer_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The initializers of ``make_transformer``'s model, by name (``q.weight`` [in, out], ...)."""
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


class _Exporter:
    """A second exporter: ONNX-path-like names (``/encoder/3/MatMul``, tensors
    ``/encoder/3/MatMul_output_0``), nodes and initializers accumulated in order."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, value: np.ndarray) -> str:
        name = f"onnx::Const_{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, **attrs) -> str | list[str]:
        name = f"/encoder/{len(self.nodes)}/{op_type}"
        names = [f"{name}_output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, **attrs))
        return names[0] if outputs == 1 else names

    def dims(self, value: str, axes: list[int]) -> list[str]:
        """The sizes of ``value`` along ``axes``, each a 1-D tensor computed at run time."""
        shape = self.op("Shape", [value])
        return [self.op("Unsqueeze", [self.op("Gather", [shape, self.const(np.array(a, np.int64))], axis=0),
                                      self.const(np.array([0], np.int64))]) for a in axes]

    def reshape(self, value: str, parts: list[str]) -> str:
        """Reshape ``value`` to the concatenation of ``parts`` (1-D int64 tensors)."""
        return self.op("Reshape", [value, self.op("Concat", parts, axis=0)])

    def layer_norm(self, x: str, scale: np.ndarray, bias: np.ndarray) -> str:
        """LayerNorm over the last axis, decomposed; bias added first (bias + x * scale)."""
        mean = self.op("ReduceMean", [x], axes=[-1], keepdims=1)
        centered = self.op("Sub", [x, mean])
        var = self.op("ReduceMean", [self.op("Pow", [centered, self.const(np.array(2.0, np.float32))])],
                      axes=[-1], keepdims=1)
        std = self.op("Sqrt", [self.op("Add", [var, self.const(np.array(EPS, np.float32))])])
        normed = self.op("Div", [centered, std])
        return self.op("Add", [self.const(bias), self.op("Mul", [normed, self.const(scale)])])


def export_second(w: dict[str, np.ndarray], mask: str = "where", qkv: str = "matmul") -> tuple[onnx.ModelProto, dict[str, str]]:
    """``make_transformer``'s function from the weights ``w`` in a second exporter's style.

    Returns the model and, for each tensor of ``make_transformer``'s model that has a
    counterpart here, that counterpart (keys ending in " 2-D": the same values, a Gemm's
    output before it is reshaped back). ``qkv``: Q, K and V as MatMul + Add(bias, x)
    ("matmul"), as Gemms with transB on one 2-D flattening of their input, each Reshaped to
    heads ("gemm"), or as one MatMul + Add on the concatenated weights, then a Split
    ("fused"). ``mask``: scores kept by a Where with an all-true constant ("where"), an
    additive mask computed from an ``attention_mask`` input of ones ("input"), or none
    ("none"). The output and second FFN projections are a Gemm with transB (weights stored
    [out, in]) between Reshapes to 2-D and back; every Reshape target is computed from Shape;
    the Gelu multiplies by 0.5 first; residual Adds are swapped.
    """
    e, t = _Exporter(), {}
    x = "hidden_states"
    d = HIDDEN // HEADS
    t["ln1"] = h = e.layer_norm(x, w["ln1.scale"], w["ln1.bias"])
    heads = [e.const(np.array([HEADS], np.int64)), e.const(np.array([d], np.int64))]
    to_2d = [e.const(np.array([-1], np.int64)), e.const(np.array([HIDDEN], np.int64))]
    if qkv == "gemm":
        flat = e.reshape(h, to_2d)
        projected = {p: e.op("Gemm", [flat, e.const(np.ascontiguousarray(w[f"{p}.weight"].T)), e.const(w[f"{p}.bias"])],
                             transB=1) for p in "qkv"}
        t.update({f"{p}_bias": projected[p] for p in "qkv"})  # [8, 32] for [1, 8, 32]: the same values
    elif qkv == "fused":
        fused = e.op("MatMul", [h, e.const(np.concatenate([w[f"{p}.weight"] for p in "qkv"], axis=1))])
        fused = e.op("Add", [fused, e.const(np.concatenate([w[f"{p}.bias"] for p in "qkv"]))])
        projected = dict(zip("qkv", e.op("Split", [fused, e.const(np.array([HIDDEN] * 3, np.int64))], outputs=3, axis=-1)))
        t.update({f"{p}_bias": projected[p] for p in "qkv"})
    else:
        for p in "qkv":
            t[f"{p}_proj"] = e.op("MatMul", [h, e.const(w[f"{p}.weight"])])
            t[f"{p}_bias"] = e.op("Add", [e.const(w[f"{p}.bias"]), t[f"{p}_proj"]])
        projected = {p: t[f"{p}_bias"] for p in "qkv"}
    for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        t[f"{p}_reshape"] = e.reshape(projected[p], [*e.dims(h, [0, 1]), *heads])
        t[f"{p}_transpose"] = e.op("Transpose", [t[f"{p}_reshape"]], perm=perm)
    t["qk_matmul"] = e.op("MatMul", [t["q_transpose"], t["k_transpose"]])
    t["qk_scale"] = scores = e.op("Mul", [t["qk_matmul"], e.const(np.array(1.0 / math.sqrt(d), np.float32))])
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", "sequence", HIDDEN])]
    if mask == "where":  # no position masked: the Where keeps every score
        keep = e.const(np.ones((1, 1, SEQ, SEQ), bool))
        scores = e.op("Where", [keep, scores, e.const(np.array(-1e9, np.float32))])
    elif mask == "input":  # (1 - mask) * -10000, broadcast over heads and queries
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]))
        ones = e.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
        masked = e.op("Mul", [e.op("Sub", [e.const(np.array(1.0, np.float32)), ones]),
                              e.const(np.array(-10000.0, np.float32))])
        extended = e.op("Unsqueeze", [masked, e.const(np.array([1, 2], np.int64))])
        scores = e.op("Add", [scores, extended])
    t["softmax"] = e.op("Softmax", [scores], axis=-1)
    t["attn_v"] = e.op("MatMul", [t["softmax"], t["v_transpose"]])
    t["attn_transpose"] = e.op("Transpose", [t["attn_v"]], perm=[0, 2, 1, 3])
    t["attn_reshape 2-D"] = flat = e.reshape(t["attn_transpose"], to_2d)
    t["o_bias 2-D"] = out = e.op("Gemm", [flat, e.const(np.ascontiguousarray(w["o.weight"].T)), e.const(w["o.bias"])],
                                 transB=1)
    t["o_bias"] = e.reshape(out, [*e.dims(x, [0, 1]), e.const(np.array([HIDDEN], np.int64))])
    t["residual1"] = r1 = e.op("Add", [t["o_bias"], x])
    t["ln2"] = e.layer_norm(r1, w["ln2.scale"], w["ln2.bias"])
    t["ffn1_proj"] = f = e.op("MatMul", [t["ln2"], e.const(w["ffn1.weight"])])
    t["ffn1_bias"] = f = e.op("Add", [e.const(w["ffn1.bias"]), f])
    t["gelu_div"] = g = e.op("Div", [f, e.const(np.array(math.sqrt(2.0), np.float32))])
    t["gelu_erf"] = g = e.op("Erf", [g])
    t["gelu_add"] = g = e.op("Add", [e.const(np.array(1.0, np.float32)), g])
    t["gelu_half"] = g = e.op("Mul", [e.op("Mul", [f, e.const(np.array(0.5, np.float32))]), g])
    flat = e.reshape(g, [e.const(np.array([-1], np.int64)), e.const(np.array([4 * HIDDEN], np.int64))])
    t["ffn2_bias 2-D"] = out = e.op("Gemm", [flat, e.const(np.ascontiguousarray(w["ffn2.weight"].T)),
                                             e.const(w["ffn2.bias"])], transB=1)
    t["ffn2_bias"] = e.reshape(out, [*e.dims(r1, [0, 1]), e.const(np.array([HIDDEN], np.int64))])
    t["y"] = e.op("Add", [t["ffn2_bias"], r1])
    graph = helper.make_graph(
        e.nodes, "second_export", inputs,
        [helper.make_tensor_value_info(t["y"], TensorProto.FLOAT, ["batch", "sequence", HIDDEN])], e.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model)
    return model, t


def shuffled(weights: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """A copy of ``weights`` with ``name``'s values shuffled (its statistics kept)."""
    copy = dict(weights)
    copy[name] = np.random.default_rng(1).permutation(weights[name].ravel()).reshape(weights[name].shape)
    return copy


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def correspondence(names: dict[str, str], reverse: bool = False) -> dict[str, tuple[str, set[str]]]:
    """``export_second``'s map as {float tensor: (its layer, the other model's tensors holding
    its values)}, the first model the float one unless ``reverse`` (``make_transformer``
    names each tensor after its node, which is the layer here)."""
    first: dict[str, set[str]] = {}
    for layer, tensor in names.items():
        first.setdefault(layer.removesuffix(" 2-D"), set()).add(tensor)
    if reverse:
        return {tensor: (layer, {layer}) for layer, tensors in first.items() for tensor in tensors}
    return {layer: (layer, tensors) for layer, tensors in first.items()}


def paired_share(alignment: Alignment, truth: dict[str, tuple[str, set[str]]]) -> float:
    """Assert that no pair is wrong (each float tensor paired is one of ``truth`` and paired
    with one of its counterparts); return the share of ``truth``'s layers that are paired."""
    for pair in alignment.pairs:
        assert pair.quant_tensor in truth.get(pair.float_tensor, ("", set()))[1], pair
    paired = {truth[pair.float_tensor][0] for pair in alignment.pairs}
    return len(paired) / len({layer for layer, _ in truth.values()})


X = np.random.default_rng(0).standard_normal((1, SEQ, HIDDEN)).astype(np.float32)


MASKS, PROJECTIONS = ["where", "input", "none"], ["matmul", "gemm", "fused"]


def feeds(mask: str) -> dict[str, np.ndarray]:
    """The inputs of both models: ``X``, and an attention mask of ones where it is one."""
    return {"x": X, "attention_mask": np.ones((1, SEQ), np.int64)} if mask == "input" else {"x": X}


@pytest.mark.parametrize("qkv", PROJECTIONS)
@pytest.mark.parametrize("mask", MASKS)
def test_the_second_export_computes_the_same_function(mask, qkv):
    first = make_transformer()
    second, _ = export_second(transformer_weights(first), mask, qkv)
    inputs = {"hidden_states" if name == "x" else name: value for name, value in feeds(mask).items()}
    np.testing.assert_allclose(run(second, inputs), run(first, {"x": X}), atol=1e-5)


@pytest.mark.parametrize("qkv", PROJECTIONS)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("direction", ["first->second", "second->first"])
def test_two_exports_of_one_transformer_align_value_for_value(direction, mask, qkv):
    first = make_transformer()
    second, names = export_second(transformer_weights(first), mask, qkv)
    reverse = direction == "second->first"
    a, b = (second, first) if reverse else (first, second)
    share = paired_share(align(build_graph(a), build_graph(b)), correspondence(names, reverse))
    assert share >= PAIRED


@pytest.mark.parametrize("qkv", PROJECTIONS)
@pytest.mark.parametrize("mask", ["where", "input"])
@pytest.mark.parametrize("faulty", ["ffn1", "q", "o"])
def test_a_weight_shuffled_in_the_second_export_is_named(faulty, mask, qkv):
    first = make_transformer()
    second, names = export_second(shuffled(transformer_weights(first), f"{faulty}.weight"), mask, qkv)
    report = find_first_bad_layer(first, second, feeds(mask), quiet=True)
    truth = correspondence(names)
    expected = truth.get(f"{faulty}_proj", ("", set()))[1] | truth[f"{faulty}_bias"][1]
    assert report.culprit.quant_tensor in expected and report.culprit.isolated_cosine < 0.9
    assert report.first_bad.index == report.culprit.index
    assert all(layer.cosine > 0.9999 for layer in report.layers[: report.first_bad.index])


def shuffled_initializer(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """A copy with the initializer ``name`` shuffled."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    init = next(i for i in copy.graph.initializer if i.name == name)
    values = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(np.random.default_rng(1).permutation(values.ravel()).reshape(values.shape), name))
    return copy


def same_nodes_share(alignment: Alignment) -> float:
    """For a model rewritten in place (its operations keep their names): assert that every
    pair is one operation with its own rewritten self; return the share of operations paired."""
    for pair in alignment.pairs:
        assert pair.quant_nodes == pair.float_nodes and len(pair.float_nodes) == 1, pair
    return len(alignment.pairs) / alignment.float_ops


REWRITTEN = {"cnn": (make_cnn, "conv2", "conv2.weight"), "transformer": (make_transformer, "ffn1_proj", "ffn1.weight")}


@pytest.mark.parametrize("name", REWRITTEN)
def test_weight_only_int8_in_the_graph_pairs_by_its_dequantized_weights(name):
    make, faulty, weight = REWRITTEN[name]
    model = make()
    int8 = weight_only_int8(model)
    assert {node.op_type for node in int8.graph.node} >= {"Cast", "Mul"}
    inputs = random_inputs(model)
    np.testing.assert_allclose(run(int8, inputs), run(model, inputs), atol=1e-5)
    float_graph, int8_graph = build_graph(model), build_graph(int8)
    assert not {"Cast", "Mul"} & {int8_graph.op(n).op_type for n in int8_graph} - {
        float_graph.op(n).op_type for n in float_graph}  # the dequantization is no layer
    weighted = [n for n in float_graph if is_weighted(float_graph.op(n))]
    for node in weighted:  # the fingerprint is the dequantized weight
        np.testing.assert_allclose(int8_graph.op(node).fingerprint, float_graph.op(node).fingerprint, rtol=1e-6)
    alignment = align(float_graph, int8_graph)
    assert same_nodes_share(alignment) >= PAIRED and alignment.weighted_paired == len(weighted)
    assert alignment.weight_agreement > 0.999
    report = find_first_bad_layer(model, shuffled_initializer(int8, f"{weight}.int8"), inputs, quiet=True)
    assert report.culprit.float_nodes == (faulty,) and report.first_bad.index == report.culprit.index


def fp16(model: onnx.ModelProto, kept_in_float32: list[str]) -> onnx.ModelProto:
    """``models.float16``, skipped where onnxconverter-common is not installed."""
    pytest.importorskip("onnxconverter_common.float16")
    return float16(model, kept_in_float32)


FP32_KEPT = {"none": [], "some": ["Softmax", "LayerNormalization", "GlobalAveragePool", "Add"]}


@pytest.mark.parametrize("kept", FP32_KEPT)
@pytest.mark.parametrize("name", REWRITTEN)
def test_fp16_conversion_with_cast_glue_pairs_op_for_op(name, kept):
    make, faulty, weight = REWRITTEN[name]
    model = make()
    half = fp16(model, FP32_KEPT[kept])
    assert "Cast" in {node.op_type for node in half.graph.node}
    alignment = align(build_graph(model), build_graph(half))
    assert same_nodes_share(alignment) >= PAIRED and alignment.weight_agreement > 0.999
    inputs = random_inputs(model)
    report = find_first_bad_layer(model, shuffled_initializer(half, weight), inputs, quiet=True)
    assert report.culprit.float_nodes == (faulty,) and report.first_bad.index == report.culprit.index
