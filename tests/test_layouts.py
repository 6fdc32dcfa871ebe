"""Alignment through layout changes: Transposes that run part or all of a network channels-last
(NHWC). Each rewrite is built here (or by onnxruntime's own NHWC transformer), so the true
correspondence is known by construction."""

import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from test_exports import X, export_tf, export_torch, weights

from layerbisect import find_first_bad_layer
from layerbisect.align import align
from layerbisect.graph import build_graph

from models import corrupt_weights, make_cnn, quant_node_for, quantize, random_inputs
from test_rewrites import copy, fold_batchnorm

TO_NHWC, TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)
ISLANDS = ("relu1", "relu2", "add1", "relu3")  # make_cnn's elementwise operations between convs


def nhwc_islands(model: onnx.ModelProto, island: tuple[str, ...] = ISLANDS) -> onnx.ModelProto:
    """Run the nodes named in ``island`` channels-last: a Transpose to NHWC before each input
    coming from outside, their outputs renamed ``<name>_nhwc``, and a Transpose back to NCHW
    (producing the original tensor name) where a node outside the island or the graph's output
    reads it."""
    out = copy(model)
    constants = {init.name for init in out.graph.initializer}
    read_outside = {o.name for o in out.graph.output} | {
        name for node in out.graph.node if node.name not in island for name in node.input
    }
    nodes, to_nhwc, nhwc = [], {}, set()
    for node in out.graph.node:
        if node.name not in island:
            nodes.append(node)
            continue
        for position, name in enumerate(node.input):
            if name in nhwc:
                node.input[position] = f"{name}_nhwc"
            elif name not in constants:
                if name not in to_nhwc:
                    to_nhwc[name] = f"{name}_to_nhwc"
                    nodes.append(helper.make_node("Transpose", [name], [to_nhwc[name]], name=f"T_{name}", perm=TO_NHWC))
                node.input[position] = to_nhwc[name]
        nhwc.update(node.output)
        back = [helper.make_node("Transpose", [f"{t}_nhwc"], [t], name=f"B_{t}", perm=TO_NCHW)
                for t in node.output if t in read_outside]
        node.output[:] = [f"{t}_nhwc" for t in node.output]
        nodes += [node, *back]
    out.graph.ClearField("node")
    out.graph.node.extend(nodes)
    out.graph.ClearField("value_info")
    return out


def test_nhwc_islands_pair_each_op_and_compare_in_the_float_layout():
    float_model = make_cnn()
    report = find_first_bad_layer(float_model, nhwc_islands(float_model), random_inputs(float_model))
    assert report.first_bad is None and report.coverage == 1.0
    by_float = {layer.float_tensor: layer for layer in report.layers}
    for name in ISLANDS:
        assert by_float[name].quant_tensor == f"{name}_nhwc"  # the island's own value, permuted back
        assert by_float[name].shape == (1, 8, 16, 16)
    assert all(layer.cosine > 0.99999 for layer in report.layers)
    assert not any(node.startswith(("T_", "B_")) for layer in report.layers for node in layer.quant_nodes)


def test_layout_permutation_is_in_the_readout():
    float_model = make_cnn()
    alignment = align(build_graph(float_model), build_graph(nhwc_islands(float_model)))
    perms = {pair.float_tensor: pair.quant_readout.perm for pair in alignment.pairs}
    assert all(perms[name] == TO_NCHW for name in ISLANDS)
    assert perms["conv2"] is None and perms["y"] is None


def test_float_side_transposes_without_counterpart_are_seen_through():
    float_model = make_cnn()
    islands = nhwc_islands(float_model)
    report = find_first_bad_layer(islands, float_model, random_inputs(float_model))
    assert report.first_bad is None and report.coverage == 1.0
    assert all(layer.cosine > 0.99999 for layer in report.layers)
    by_float = {layer.float_tensor: layer for layer in report.layers}
    assert by_float["relu1_nhwc"].quant_tensor == "relu1" and by_float["relu1_nhwc"].shape == (1, 16, 16, 8)
    assert not any(layer.float_tensor.endswith("to_nhwc") for layer in report.layers)


def test_fault_behind_a_layout_island_is_found():
    float_model = make_cnn()
    broken = nhwc_islands(fold_batchnorm(float_model, flip="conv2"))
    report = find_first_bad_layer(float_model, broken, random_inputs(float_model))
    assert report.first_bad.float_nodes == ("conv2", "bn2")
    assert all(layer.cosine > 0.9999 for layer in report.layers[: report.first_bad.index])


def test_transposes_that_do_not_restore_the_layout_do_not_pair():
    """A wrong permutation back (NHWC read as if it were NCHW) must not pass for the value."""
    float_model = make_cnn()
    wrong = nhwc_islands(float_model)
    for node in wrong.graph.node:
        if node.name == "B_relu3":
            node.attribute[0].CopyFrom(helper.make_attribute("perm", [0, 3, 2, 1]))
    alignment = align(build_graph(float_model), build_graph(wrong))
    pool = [pair for pair in alignment.pairs if pair.float_tensor == "pool1"]
    assert pool == [] and "pool1" in alignment.unaligned


def conv_chain() -> onnx.ModelProto:
    """x[1,3,16,16] -> conv0 relu0 conv1 relu1 pool conv2 relu2 gap -> y[1,16,1,1]."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i, (cin, cout) in enumerate([(3, 8), (8, 8), (8, 16)]):
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"conv{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}")]
        x = f"relu{i}"
        if i == 1:
            nodes.append(helper.make_node("MaxPool", [x], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
            x = "pool"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["y"], name="gap"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 16, 1, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def ort_all_optimized(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as onnxruntime runs it on this machine at its highest level: QLinearConv and
    pooling channels-last (com.microsoft, channels_last=1) between inserted Transposes."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def channels_last_ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node
            if any(a.name == "channels_last" and a.i == 1 for a in n.attribute) or n.op_type.startswith("Nhwc")]


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_whole_body_channels_last_between_two_transposes(fmt):
    float_model = conv_chain()
    optimized = ort_all_optimized(quantize(float_model, fmt, activation_type="uint8"))
    transposes = [n for n in optimized.graph.node if n.op_type == "Transpose"]
    assert len(transposes) == 2 and len(channels_last_ops(optimized)) == 5  # the premise
    report = find_first_bad_layer(float_model, optimized, random_inputs(float_model))
    assert report.first_bad is None and report.coverage == 1.0
    spans = [layer.float_nodes for layer in report.layers]
    assert spans == [("conv0", "relu0"), ("conv1", "relu1"), ("pool",), ("conv2", "relu2"), ("gap",)]
    assert all(layer.cosine > 0.99 for layer in report.layers)

    quant = quantize(float_model, fmt, activation_type="uint8")
    broken = ort_all_optimized(corrupt_weights(quant, quant_node_for(quant, "conv1", float_model)))
    report = find_first_bad_layer(float_model, broken, random_inputs(float_model))
    assert report.first_bad.float_nodes == ("conv1", "relu1")


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_cnn_with_channels_last_islands_from_onnxruntime(fmt):
    float_model = make_cnn()
    optimized = ort_all_optimized(quantize(float_model, fmt))
    assert channels_last_ops(optimized)  # the premise: onnxruntime inserted NHWC islands
    report = find_first_bad_layer(float_model, optimized, random_inputs(float_model))
    assert report.first_bad is None and report.coverage == 1.0
    assert all(layer.cosine > 0.99 for layer in report.layers)


def test_decomposed_activations_inside_layout_islands():
    """The other export's elementwise operations, decomposed HardSwishes included, run NHWC:
    a region of the other graph (Transpose, HardSigmoid, Mul) stands for one float HardSwish."""
    torch_model, names = export_torch(weights())
    tf_model, tf_names = export_tf(weights())
    body = []
    for node in tf_model.graph.node:
        if node.op_type == "ReduceMean":
            break
        if node.op_type in ("HardSigmoid", "Mul", "Relu", "Add", "Clip", "Div"):
            body.append(node.name)
    islands = nhwc_islands(tf_model, tuple(body))
    report = find_first_bad_layer(torch_model, islands, {"input": X})
    assert report.first_bad is None and report.coverage == 1.0
    assert all(layer.cosine > 0.9999 for layer in report.layers)
    by_float = {layer.float_tensor: layer for layer in report.layers}
    for layer in ("hswish1", "relu2", "add", "hswish2"):
        assert by_float[names[layer]].quant_tensor == tf_names[layer] + "_nhwc"
    assert by_float[names["hswish1"]].evidence == "region"


@pytest.mark.parametrize("fmt", ["qdq", "qoperator", "dynamic"])
def test_float_model_with_layout_islands_against_a_quantized_plain_model(fmt):
    """Float-only Transposes around activations that the quantized graph folds away."""
    islands = nhwc_islands(make_cnn())
    quant = quantize(make_cnn(), fmt)
    report = find_first_bad_layer(islands, quant, random_inputs(islands))
    assert report.first_bad is None and report.coverage == 1.0
    assert all(layer.cosine > 0.99 for layer in report.layers)
    broken = corrupt_weights(quant, quant_node_for(quant, "conv2", make_cnn()))
    report = find_first_bad_layer(islands, broken, random_inputs(islands))
    assert report.first_bad.float_nodes == ("conv2",)


def cancelling_transposes() -> onnx.ModelProto:
    """x -> relu0 -> t1 (swap H, W) -> sigmoid2 -> y; t1 -> t4 (swap back) -> z: t4 holds relu0's
    value again, as a Transpose back from an NHWC island does."""
    nodes = [
        helper.make_node("Relu", ["x"], ["relu0"], name="relu0"),
        helper.make_node("Transpose", ["relu0"], ["t1"], name="t1", perm=[0, 1, 3, 2]),
        helper.make_node("Sigmoid", ["t1"], ["sigmoid2"], name="sigmoid2"),
        helper.make_node("Transpose", ["t1"], ["t4"], name="t4", perm=[0, 1, 3, 2]),
    ]
    info = lambda name, shape: helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)  # noqa: E731
    graph = helper.make_graph(nodes, "t", [info("x", [1, 2, 3, 5])], [info("sigmoid2", [1, 2, 5, 3]), info("t4", [1, 2, 3, 5])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_transposes_that_cancel_out_do_not_take_another_transposes_place():
    plain = cancelling_transposes()
    islands = nhwc_islands(plain, ("relu0", "sigmoid2"))
    forward = {p.float_tensor: p.quant_tensor for p in align(build_graph(plain), build_graph(islands)).pairs}
    assert forward == {"relu0": "relu0_nhwc", "t1": "t1", "sigmoid2": "sigmoid2_nhwc", "t4": "t4"}
    backward = {p.float_tensor: p.quant_tensor for p in align(build_graph(islands), build_graph(plain)).pairs}
    assert backward == {"relu0_nhwc": "relu0", "t1": "t1", "sigmoid2_nhwc": "sigmoid2", "t4": "t4"}
