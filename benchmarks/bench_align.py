"""Alignment time against graph size.

Builds residual CNN-like float graphs of about 100 to 10,000 nodes and a rewritten copy of each,
and times graph building and alignment, for two rewrites:

- folded: Conv, BatchNormalization, Relu, Add blocks against a copy with BatchNorm folded away,
  every tensor renamed and every node unnamed;
- islands: Conv, HardSwish, Add blocks against a copy with every tensor renamed, HardSwish
  decomposed into x * HardSigmoid(x) and the activation and the Add computed channels-last
  (NHWC) between Transposes: regions, and values compared through a permutation.

Prints nodes, seconds, and microseconds per node, which stays about flat when the cost grows
linearly.

    python benchmarks/bench_align.py
"""

import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from layerbisect.align import align
from layerbisect.graph import build_graph
from layerbisect.load import load_model


def residual_net(blocks: int, folded: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    name = (lambda text: "") if folded else (lambda text: text)
    tensor = (lambda text: f"r{len(nodes)}") if folded else (lambda text: text)
    for b in range(blocks):
        w = numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), f"w{b}")
        inits.append(w)
        conv = tensor(f"conv{b}")
        nodes.append(helper.make_node("Conv", [x, f"w{b}"], [conv], name=name(f"conv{b}"), pads=[1, 1, 1, 1]))
        if not folded:
            for stat in ("s", "b", "m", "v"):
                inits.append(numpy_helper.from_array(np.ones(8, np.float32), f"{stat}{b}"))
            bn = f"bn{b}"
            nodes.append(helper.make_node("BatchNormalization", [conv, f"s{b}", f"b{b}", f"m{b}", f"v{b}"], [bn], name=bn))
            conv = bn
        relu = tensor(f"relu{b}")
        nodes.append(helper.make_node("Relu", [conv], [relu], name=name(f"relu{b}")))
        add = tensor(f"add{b}")
        nodes.append(helper.make_node("Add", [relu, x], [add], name=name(f"add{b}")))
        x = add
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def islands_net(blocks: int, islands: bool) -> onnx.ModelProto:
    """Blocks of Conv -> HardSwish -> Add(block input) on a [1,8,6,10] input; with ``islands``,
    the rewritten copy described in the module docstring."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"

    def add(op: str, inputs: list[str], **attrs) -> str:
        out = f"t{len(nodes)}" if islands else f"{op.lower()}{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [out], name="" if islands else out, **attrs))
        return out

    for b in range(blocks):
        inits.append(numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), f"w{b}"))
        conv = add("Conv", [x, f"w{b}"], pads=[1, 1, 1, 1])
        if islands:
            nhwc = add("Transpose", [conv], perm=[0, 2, 3, 1])
            swish = add("Mul", [nhwc, add("HardSigmoid", [nhwc], alpha=1.0 / 6, beta=0.5)])
            x = add("Transpose", [add("Add", [swish, add("Transpose", [x], perm=[0, 2, 3, 1])])], perm=[0, 3, 1, 2])
        else:
            x = add("Add", [add("HardSwish", [conv]), x])
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 10])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def main() -> None:
    workloads = [
        ("folded", residual_net, "folded", (25, 100, 250, 1000, 2500)),
        ("islands", islands_net, "islands", (33, 133, 333, 1333, 3333)),
    ]
    for title, build, flag, sizes in workloads:
        print(f"{title}\n{'float nodes':>11}  {'build s':>8}  {'align s':>8}  {'total s':>8}  {'us/node':>8}  coverage")
        for blocks in sizes:
            float_model = load_model(build(blocks, **{flag: False}))
            other = load_model(build(blocks, **{flag: True}))
            start = time.perf_counter()
            float_graph, other_graph = build_graph(float_model), build_graph(other)
            built = time.perf_counter()
            alignment = align(float_graph, other_graph)
            done = time.perf_counter()
            n = len(float_model.graph.node)
            print(f"{n:>11}  {built - start:>8.3f}  {done - built:>8.3f}  {done - start:>8.3f}  "
                  f"{(done - start) / n * 1e6:>8.1f}  {alignment.coverage:.0%}")


if __name__ == "__main__":
    main()
