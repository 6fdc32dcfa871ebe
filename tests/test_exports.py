"""Two independent exports of one network: the same weights, but no name in common and
different export styles (fused vs decomposed operations, computed vs constant shapes, extra
Identity, Dropout and Cast). The true correspondence of values is known by construction."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from layerbisect import find_first_bad_layer
from layerbisect.align import Alignment, align
from layerbisect.graph import build_graph

EPS = 1e-5


def weights(seed: int = 5) -> dict[str, np.ndarray]:
    """The network's parameters: conv1 [8,3,3,3], conv2 [8,8,3,3], two heads [16,8] (Gemm
    layout, out x in), LayerNorm scale and bias [16], the output layer [10,16]."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape, gain=1.0: (rng.standard_normal(shape) * gain).astype(np.float32)  # noqa: E731
    return {
        "conv1.w": normal(8, 3, 3, 3, gain=0.4), "conv1.b": normal(8, gain=0.1),
        "conv2.w": normal(8, 8, 3, 3, gain=0.2), "conv2.b": normal(8, gain=0.1),
        "head_a.w": normal(16, 8, gain=0.5), "head_a.b": normal(16, gain=0.1),
        "head_b.w": normal(16, 8, gain=0.5), "head_b.b": normal(16, gain=0.1),
        "ln.scale": (1 + normal(16, gain=0.1)), "ln.bias": normal(16, gain=0.1),
        "out.w": normal(10, 16, gain=0.3), "out.b": normal(10, gain=0.1),
    }


class _Export:
    """Accumulates nodes and initializers; every tensor and node named by ``style``."""

    def __init__(self, style: str) -> None:
        self.style, self.nodes, self.inits, self.count = style, [], [], 0

    def name(self, what: str) -> str:
        self.count += 1
        return f"/{what}/{self.count}" if self.style == "torch" else f"model_{self.count}/{what}:0"

    def const(self, value: np.ndarray) -> str:
        name = self.name("const")
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self.name(op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out.rsplit(":", 1)[0] + "_node", **attrs))
        return out

    def model(self, inp: str, out: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, self.style, [helper.make_tensor_value_info(inp, TensorProto.FLOAT, [1, 3, 16, 16])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 10])], self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        onnx.checker.check_model(model)
        return model


def export_torch(w: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Fused style: HardSwish, Flatten, Gemm (transB), LayerNormalization, a same-type Cast.
    Returns the model and its tensor for each layer of the network."""
    e, t = _Export("torch"), {}
    t["conv1"] = e.op("Conv", ["input", e.const(w["conv1.w"]), e.const(w["conv1.b"])], pads=[1, 1, 1, 1])
    t["hswish1"] = e.op("HardSwish", [t["conv1"]])
    t["conv2"] = e.op("Conv", [t["hswish1"], e.const(w["conv2.w"]), e.const(w["conv2.b"])], pads=[1, 1, 1, 1])
    t["relu2"] = e.op("Relu", [t["conv2"]])
    t["add"] = e.op("Add", [t["relu2"], t["hswish1"]])
    t["hswish2"] = e.op("HardSwish", [t["add"]])
    t["gap"] = e.op("GlobalAveragePool", [t["hswish2"]])
    t["flatten"] = e.op("Flatten", [t["gap"]], axis=1)
    for head in ("head_a", "head_b"):
        t[head] = e.op("Gemm", [t["flatten"], e.const(w[f"{head}.w"]), e.const(w[f"{head}.b"])], transB=1)
    t["sum"] = e.op("Add", [t["head_a"], t["head_b"]])
    t["ln"] = e.op("LayerNormalization", [t["sum"], e.const(w["ln.scale"]), e.const(w["ln.bias"])], axis=-1, epsilon=EPS)
    cast = e.op("Cast", [t["ln"]], to=TensorProto.FLOAT)
    t["relu"] = e.op("Relu", [cast])
    t["out"] = e.op("Gemm", [t["relu"], e.const(w["out.w"]), e.const(w["out.b"])], transB=1)
    return e.model("input", t["out"]), t


def export_tf(w: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Decomposed style: x * HardSigmoid(x) and x * Relu6(x + 3) / 6 for HardSwish,
    ReduceMean for GlobalAveragePool, Reshape to a shape computed from Shape, MatMul + Add with
    the weight stored transposed (heads in the other order), a decomposed LayerNorm, Identity
    and Dropout. Returns the model and its tensor for each layer the other export also has."""
    e, t = _Export("tf"), {}
    t["conv1"] = e.op("Conv", ["x:0", e.const(w["conv1.w"]), e.const(w["conv1.b"])], pads=[1, 1, 1, 1])
    gate = e.op("HardSigmoid", [t["conv1"]], alpha=1.0 / 6, beta=0.5)
    t["hswish1"] = e.op("Mul", [t["conv1"], gate])
    t["conv2"] = e.op("Conv", [t["hswish1"], e.const(w["conv2.w"]), e.const(w["conv2.b"])], pads=[1, 1, 1, 1])
    t["relu2"] = e.op("Relu", [t["conv2"]])
    kept = e.op("Identity", [t["relu2"]])
    t["add"] = e.op("Add", [kept, t["hswish1"]])
    shifted = e.op("Add", [t["add"], e.const(np.array(3.0, np.float32))])
    relu6 = e.op("Clip", [shifted, e.const(np.array(0.0, np.float32)), e.const(np.array(6.0, np.float32))])
    scaled = e.op("Mul", [t["add"], relu6])
    t["hswish2"] = e.op("Div", [scaled, e.const(np.array(6.0, np.float32))])
    t["gap"] = e.op("ReduceMean", [t["hswish2"]], axes=[2, 3], keepdims=1)
    batch = e.op("Unsqueeze", [e.op("Gather", [e.op("Shape", [t["gap"]]), e.const(np.array(0, np.int64))]),
                               e.const(np.array([0], np.int64))])
    target = e.op("Concat", [batch, e.const(np.array([-1], np.int64))], axis=0)
    t["flatten"] = e.op("Reshape", [t["gap"], target])
    for head in ("head_b", "head_a"):
        product = e.op("MatMul", [t["flatten"], e.const(np.ascontiguousarray(w[f"{head}.w"].T))])
        t[head] = e.op("Add", [product, e.const(w[f"{head}.b"])])
    t["sum"] = e.op("Add", [t["head_a"], t["head_b"]])
    mean = e.op("ReduceMean", [t["sum"]], axes=[-1], keepdims=1)
    centered = e.op("Sub", [t["sum"], mean])
    variance = e.op("ReduceMean", [e.op("Pow", [centered, e.const(np.array(2.0, np.float32))])], axes=[-1], keepdims=1)
    std = e.op("Sqrt", [e.op("Add", [variance, e.const(np.array(EPS, np.float32))])])
    normed = e.op("Div", [centered, std])
    t["ln"] = e.op("Add", [e.op("Mul", [normed, e.const(w["ln.scale"])]), e.const(w["ln.bias"])])
    dropped = e.op("Dropout", [t["ln"]])
    t["relu"] = e.op("Relu", [dropped])
    product = e.op("MatMul", [t["relu"], e.const(np.ascontiguousarray(w["out.w"].T))])
    t["out"] = e.op("Add", [product, e.const(w["out.b"])])
    return e.model("x:0", t["out"]), t


def correspondence(source: dict[str, str], target: dict[str, str]) -> dict[str, str]:
    """Each tensor of one export mapped to the tensor holding the same value in the other."""
    return {source[layer]: target[layer] for layer in source}


def check(alignment: Alignment, truth: dict[str, str]) -> float:
    """Assert that no pair is wrong; return the share of ``truth`` that is aligned."""
    for pair in alignment.pairs:
        assert pair.float_tensor in truth, f"{pair.float_tensor} has no counterpart, yet paired"
        assert pair.quant_tensor == truth[pair.float_tensor], pair
    return len({pair.float_tensor for pair in alignment.pairs} & set(truth)) / len(truth)


X = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("direction", ["torch->tf", "tf->torch"])
def test_independent_exports_align_value_for_value(direction):
    (a, names_a), (b, names_b) = export_torch(weights()), export_tf(weights())
    if direction == "tf->torch":
        (a, names_a), (b, names_b) = (b, names_b), (a, names_a)
    alignment = align(build_graph(a), build_graph(b))
    assert check(alignment, correspondence(names_a, names_b)) >= 0.95
    report = find_first_bad_layer(a, b, {a.graph.input[0].name: X})
    assert report.first_bad is None and all(layer.cosine > 0.9999 for layer in report.layers)


def test_sibling_heads_pair_by_their_weights_stored_transposed():
    """The heads read the same input; the other export stores their weights transposed and
    lists them in the other order, so neither names nor order could pair them."""
    (a, names_a), (b, names_b) = export_torch(weights()), export_tf(weights())
    alignment = align(build_graph(a), build_graph(b))
    heads = {pair.float_tensor: pair for pair in alignment.pairs if pair.float_tensor in (names_a["head_a"], names_a["head_b"])}
    assert heads[names_a["head_a"]].evidence == "weights"
    assert heads[names_a["head_a"]].quant_tensor == names_b["head_a"] and heads[names_a["head_b"]].quant_tensor == names_b["head_b"]


def test_decompositions_are_regions_in_both_directions():
    torch_graph, tf_graph = build_graph(export_torch(weights())[0]), build_graph(export_tf(weights())[0])
    forward, backward = align(torch_graph, tf_graph), align(tf_graph, torch_graph)
    ln = next(pair for pair in forward.pairs if pair.op_type == "LayerNormalization")
    assert ln.evidence == "region" and len(ln.quant_nodes) == 9  # ReduceMean ... Add
    ln_back = next(pair for pair in backward.pairs if pair.quant_nodes[0].startswith("/LayerNormalization/"))
    assert ln_back.evidence == "region" and len(ln_back.float_nodes) == 9
    swish = [pair for pair in forward.pairs if pair.op_type == "HardSwish"]
    assert [len(pair.quant_nodes) for pair in swish] == [2, 4]  # Mul(HardSigmoid), Div(Mul(Clip(Add)))
    assert forward.unaligned == ()


def test_weight_changed_in_the_second_export_is_found_at_its_layer():
    w = weights()
    torch_model, names = export_torch(w)
    w["conv2.w"] = -w["conv2.w"]
    tf_model, _ = export_tf(w)
    report = find_first_bad_layer(torch_model, tf_model, {"input": X})
    assert report.first_bad is not None and report.first_bad.float_tensor == names["conv2"]
    assert all(layer.cosine > 0.9999 for layer in report.layers[: report.first_bad.index])


def tail_model(decomposed: bool) -> onnx.ModelProto:
    """x -> Conv -> HardSwish, the graph's output: fused, or x * HardSigmoid(x)."""
    w = weights()
    e = _Export("tf" if decomposed else "torch")
    conv = e.op("Conv", ["x", e.const(w["conv1.w"]), e.const(w["conv1.b"])], pads=[1, 1, 1, 1])
    if decomposed:
        out = e.op("Mul", [conv, e.op("HardSigmoid", [conv], alpha=1.0 / 6, beta=0.5)])
    else:
        out = e.op("HardSwish", [conv])
    graph = helper.make_graph(e.nodes, "tail", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 8, 16, 16])], e.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("decomposed_float", [False, True])
def test_region_that_ends_the_graph(decomposed_float):
    float_model, other = tail_model(decomposed_float), tail_model(not decomposed_float)
    report = find_first_bad_layer(float_model, other, {"x": X})
    assert report.coverage == 1.0 and report.first_bad is None
    assert report.layers[-1].evidence == "region" and report.layers[-1].float_tensor == float_model.graph.output[0].name
    assert report.layers[-1].quant_tensor == other.graph.output[0].name
