"""Alignment time against graph size.

Builds residual CNN-like float graphs of about 100 to 10,000 nodes (Conv, BatchNormalization,
Relu, Add), a rewritten copy of each (BatchNorm folded away, every tensor renamed, every node
unnamed), and times graph building and alignment. Prints nodes, seconds, and microseconds per
node, which stays about flat when the cost grows linearly.

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


def main() -> None:
    print(f"{'float nodes':>11}  {'build s':>8}  {'align s':>8}  {'total s':>8}  {'us/node':>8}  coverage")
    for blocks in (25, 100, 250, 1000, 2500):
        float_model = load_model(residual_net(blocks, folded=False))
        other = load_model(residual_net(blocks, folded=True))
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
