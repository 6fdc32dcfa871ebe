"""Alignment through what optimizers and runtimes do to a graph: folds, fusions, replaced ops,
renaming. Each rewrite is built here, so the true correspondence is known by construction."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from layerbisect import find_first_bad_layer

from models import corrupt_weights, make_cnn, make_transformer, quant_node_for, quantize, random_inputs


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def fold_batchnorm(model: onnx.ModelProto, *, flip: str | None = None) -> onnx.ModelProto:
    """Fold every Conv -> BatchNormalization pair into the Conv (numpy); ``flip`` negates the
    folded weights of one conv, a planted fault."""
    out = copy(model)
    inits = {i.name: i for i in out.graph.initializer}
    value = lambda name: numpy_helper.to_array(inits[name])  # noqa: E731
    producer = {o: n for n in out.graph.node for o in n.output}
    for bn in [n for n in out.graph.node if n.op_type == "BatchNormalization"]:
        conv = producer[bn.input[0]]
        scale, bias, mean, var = (value(name) for name in bn.input[1:])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        factor = scale / np.sqrt(var + eps)
        weight = value(conv.input[1]) * factor[:, None, None, None]
        conv_bias = value(conv.input[2]) if len(conv.input) > 2 else 0.0
        new_bias = (conv_bias - mean) * factor + bias
        if conv.name == flip:
            weight = -weight
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array(weight.astype(np.float32), conv.input[1]))
        bias_name = conv.name + ".folded_bias"
        out.graph.initializer.append(numpy_helper.from_array(new_bias.astype(np.float32), bias_name))
        del conv.input[2:]
        conv.input.append(bias_name)
        conv.output[0] = bn.output[0]
        out.graph.node.remove(bn)
    return out


def rename_everything(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Rename every tensor but the inputs, and unname every node."""
    out = copy(model)
    keep = {i.name for i in out.graph.input}
    names = {}
    for node in out.graph.node:
        for name in node.output:
            names[name] = f"t{len(names)}"
    for init in out.graph.initializer:
        names.setdefault(init.name, f"w{len(names)}")
        init.name = names[init.name]
    for node in out.graph.node:
        node.name = ""
        node.input[:] = [names.get(n, n) if n not in keep else n for n in node.input]
        node.output[:] = [names[n] for n in node.output]
    for info in [*out.graph.output, *out.graph.value_info]:
        info.name = names.get(info.name, info.name)
    return out, names


def replace_ops(model: onnx.ModelProto, *, reduce_mean: bool) -> onnx.ModelProto:
    """GlobalAveragePool <-> ReduceMean over H, W; Flatten <-> Reshape."""
    out = copy(model)
    out.graph.initializer.append(numpy_helper.from_array(np.array([1, -1], np.int64), "flat_shape"))
    for index, node in enumerate(out.graph.node):
        if node.op_type == "GlobalAveragePool" and reduce_mean:
            new = helper.make_node("ReduceMean", list(node.input), list(node.output), name=node.name, axes=[2, 3], keepdims=1)
        elif node.op_type == "Flatten":
            new = helper.make_node("Reshape", [node.input[0], "flat_shape"], list(node.output), name=node.name)
        else:
            continue
        out.graph.node[index].CopyFrom(new)
    return out


def test_folded_batchnorm_pairs_conv_and_bn_as_one_span():
    folded = fold_batchnorm(make_cnn())
    report = find_first_bad_layer(make_cnn(), folded, random_inputs(make_cnn()))
    assert report.first_bad is None and report.coverage == 1.0
    spans = [layer.float_nodes for layer in report.layers]
    assert ("conv1", "bn1") in spans and ("conv2", "bn2") in spans
    assert min(layer.cosine for layer in report.layers) > 0.99999


def test_fault_in_a_folded_conv_is_found():
    report = find_first_bad_layer(make_cnn(), fold_batchnorm(make_cnn(), flip="conv2"), random_inputs(make_cnn()))
    assert report.first_bad.float_nodes == ("conv2", "bn2")


@pytest.mark.parametrize("name,build", [("cnn", make_cnn), ("transformer", make_transformer)])
def test_renamed_and_unnamed_graph_pairs_every_value_correctly(name, build):
    float_model = build()
    renamed, names = rename_everything(float_model)
    report = find_first_bad_layer(float_model, renamed, random_inputs(float_model))
    assert report.coverage == 1.0 and report.first_bad is None
    for layer in report.layers:  # the true correspondence, by construction
        assert layer.quant_tensor == names[layer.float_tensor]
        assert layer.cosine > 0.99999


def test_renamed_quantized_graph_with_fault():
    float_model = make_transformer()
    quant = quantize(float_model, "qdq")
    broken = corrupt_weights(quant, quant_node_for(quant, "q_proj"))
    renamed, names = rename_everything(broken)
    report = find_first_bad_layer(float_model, renamed, random_inputs(float_model))
    assert report.first_bad.float_nodes == ("q_proj",)
    assert report.first_bad.evidence == "weights"  # q, k and v read the same input
    k_proj = next(layer for layer in report.layers if layer.float_nodes == ("k_proj",))
    assert k_proj.quant_tensor == names["k_proj_QuantizeLinear_Output"] and k_proj.cosine > 0.999  # read as int8


@pytest.mark.parametrize("reduce_mean", [True, False])
def test_replaced_ops_pair_with_what_they_replace(reduce_mean):
    float_model = make_cnn()
    replaced = replace_ops(float_model, reduce_mean=reduce_mean)
    forward = find_first_bad_layer(float_model, replaced, random_inputs(float_model))
    backward = find_first_bad_layer(replaced, float_model, random_inputs(float_model))
    for report in (forward, backward):
        assert report.coverage == 1.0 and report.first_bad is None
    gap = next(layer for layer in forward.layers if layer.float_nodes == ("gap",))
    assert gap.cosine > 0.99999


def mlp(fused: bool, sign: float = 1.0) -> onnx.ModelProto:
    """x[4,16] -> MatMul+Add (or Gemm) -> Relu -> MatMul+Add (or Gemm) -> y."""
    rng = np.random.default_rng(3)
    nodes, inits, x = [], [], "x"
    for i, (a, b) in enumerate([(16, 32), (32, 8)]):
        w, bias = rng.standard_normal((a, b)).astype(np.float32), rng.standard_normal(b).astype(np.float32)
        if i == 1:
            w = w * np.float32(sign)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        out = "y" if i == 1 else f"h{i}"
        if fused:
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [out], name=f"gemm{i}"))
        else:
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"matmul{i}"),
                      helper.make_node("Add", [f"mm{i}", f"b{i}"], [out], name=f"add{i}")]
        if i == 0:
            nodes.append(helper.make_node("Relu", [out], ["r0"], name="relu0"))
            x = "r0"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_matmul_add_fused_into_gemm():
    x = {"x": np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)}
    report = find_first_bad_layer(mlp(fused=False), mlp(fused=True), x)
    assert report.coverage == 1.0 and report.first_bad is None
    assert [layer.float_nodes for layer in report.layers] == [("matmul0", "add0"), ("relu0",), ("matmul1", "add1")]
    assert [layer.quant_nodes for layer in report.layers] == [("gemm0",), ("relu0",), ("gemm1",)]
    broken = find_first_bad_layer(mlp(fused=False), mlp(fused=True, sign=-1.0), x)
    assert broken.first_bad.float_nodes == ("matmul1", "add1")


@pytest.mark.parametrize("fmt", ["qdq", "dynamic"])
def test_ort_optimized_graph_with_fused_gelu_and_attention_scale(fmt):
    float_model = make_transformer()
    quant = quantize(float_model, fmt)
    report = find_first_bad_layer(float_model, quant, random_inputs(float_model), ort_optimized=True)
    assert report.first_bad is None and report.coverage == 1.0
    if fmt == "dynamic":
        gelu = next(layer for layer in report.layers if "gelu_erf" in layer.float_nodes)
        assert gelu.float_nodes == ("gelu_div", "gelu_erf", "gelu_add", "gelu_mul", "gelu_half")
        assert gelu.evidence == "region" and gelu.cosine > 0.999
    broken = corrupt_weights(quant, quant_node_for(quant, "ffn1_proj"))
    report = find_first_bad_layer(float_model, broken, random_inputs(float_model), ort_optimized=True)
    assert report.first_bad.float_nodes[0] == "ffn1_proj"
