"""The optimizer story: a graph optimizer folds BatchNorm and swaps ops, and one fold is wrong.

A small classifier (Conv+BatchNorm+Relu blocks, ReduceMean over H and W, Gemm) goes through a
home-made "optimizer" like those in deployment toolchains: it folds every BatchNormalization
into the Conv before it, replaces ReduceMean with GlobalAveragePool, and renames every tensor.
Its fold has a bug, dividing by the variance instead of its square root, which only bites
where the variance is far from 1: in the second block. Names are of no help (none survive);
layerbisect pairs the graphs by structure and names the broken fused layer.

    python examples/optimizer_story.py
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from layerbisect import find_first_bad_layer

rng = np.random.default_rng(0)
CHANNELS = [3, 16, 16, 32]


def build_classifier() -> onnx.ModelProto:
    nodes, weights, x = [], [], "image"

    def add(name, value):
        weights.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    for i, (cin, cout) in enumerate(zip(CHANNELS, CHANNELS[1:]), start=1):
        w = add(f"conv{i}.w", rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9)))
        b = add(f"conv{i}.b", rng.standard_normal(cout) * 0.1)
        variance = rng.uniform(4.0, 9.0, cout) if i == 2 else rng.uniform(0.9, 1.1, cout)
        stats = [add(f"bn{i}.scale", rng.uniform(0.5, 1.5, cout)), add(f"bn{i}.bias", rng.standard_normal(cout) * 0.1),
                 add(f"bn{i}.mean", rng.standard_normal(cout) * 0.1), add(f"bn{i}.var", variance)]
        nodes += [helper.make_node("Conv", [x, w, b], [f"conv{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"conv{i}", *stats], [f"bn{i}"], name=f"bn{i}"),
                  helper.make_node("Relu", [f"bn{i}"], [f"relu{i}"], name=f"relu{i}")]
        x = f"relu{i}"
    nodes += [helper.make_node("ReduceMean", [x], ["pooled"], name="pool", axes=[2, 3], keepdims=0),
              helper.make_node("Gemm", ["pooled", add("fc.w", rng.standard_normal((10, 32)) * 0.3),
                                        add("fc.b", np.zeros(10))], ["logits"], name="fc", transB=1)]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32])
    graph = helper.make_graph(nodes, "classifier", [image],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold BatchNorm into Conv (with the bug), ReduceMean -> GlobalAveragePool + Flatten,
    rename every tensor and node."""
    value = {w.name: numpy_helper.to_array(w) for w in model.graph.initializer}
    nodes, weights, names = [], [], {"image": "image"}

    def name(tensor):
        return names.setdefault(tensor, f"t{len(names)}")

    for node in model.graph.node:
        if node.op_type == "Conv":
            conv = node
        elif node.op_type == "BatchNormalization":
            scale, bias, mean, var = (value[i] for i in node.input[1:])
            factor = scale / var  # the bug: should be scale / sqrt(var + epsilon)
            w = value[conv.input[1]] * factor[:, None, None, None]
            b = (value[conv.input[2]] - mean) * factor + bias
            weights += [numpy_helper.from_array(w, name(conv.input[1])),
                        numpy_helper.from_array(b, name(conv.input[2]))]
            nodes.append(helper.make_node("Conv", [name(conv.input[0]), name(conv.input[1]), name(conv.input[2])],
                                          [name(node.output[0])], pads=[1, 1, 1, 1]))
        elif node.op_type == "ReduceMean":
            nodes += [helper.make_node("GlobalAveragePool", [name(node.input[0])], ["gap"]),
                      helper.make_node("Flatten", ["gap"], [name(node.output[0])])]
        elif node.op_type == "Gemm":
            weights += [numpy_helper.from_array(value[i], name(i)) for i in node.input[1:]]
            nodes.append(helper.make_node("Gemm", [name(i) for i in node.input], ["logits"], transB=1))
        else:
            nodes.append(helper.make_node(node.op_type, [name(i) for i in node.input], [name(o) for o in node.output]))
    graph = helper.make_graph(nodes, "optimized", list(model.graph.input), list(model.graph.output), weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


float_model = build_classifier()
optimized = optimize(float_model)
image = {"image": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)}
report = find_first_bad_layer(float_model, optimized, image)
print(report)
