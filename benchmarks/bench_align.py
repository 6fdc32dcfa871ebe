"""Alignment time against graph size.

Builds residual CNN-like float graphs of about 100 to 10,000 nodes and a rewritten copy of each,
and times graph building and alignment, for two rewrites:

- folded: Conv, BatchNormalization, Relu, Add blocks against a copy with BatchNorm folded away,
  every tensor renamed and every node unnamed;
- islands: Conv, HardSwish, Add blocks against a copy with every tensor renamed, HardSwish
  decomposed into x * HardSigmoid(x) and the activation and the Add computed channels-last
  (NHWC) between Transposes: regions, and values compared through a permutation;
- decoder: LLM decoder blocks (RMSNorm decomposed, Q/K/V attention, SiLU-gated MLP) up to
  about 50,000 nodes against a copy quantized by hand as onnxruntime's QDQ format would (int8
  weights behind DequantizeLinear, every MatMul input through QuantizeLinear/DequantizeLinear),
  every tensor renamed.

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


def decoder_net(blocks: int, quantized: bool) -> onnx.ModelProto:
    """``blocks`` decoder blocks on x [1,16,8] (see the module docstring), 34 float ops each."""
    rng = np.random.default_rng(0)
    hidden, heads, seq = 8, 2, 16
    nodes, inits = [], []
    count = [0]

    def const(array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array, f"c{len(inits)}"))
        return inits[-1].name

    def add(op: str, inputs: list[str], **attrs) -> str:
        count[0] += 1
        out = f"t{count[0]}" if quantized else f"{op.lower()}{count[0]}"
        nodes.append(helper.make_node(op, inputs, [out], name="" if quantized else out, **attrs))
        return out

    def shell(value: str, scale: float = 0.05) -> str:
        """The value through QuantizeLinear/DequantizeLinear, in the quantized copy."""
        if not quantized:
            return value
        s, z = const(np.array(scale, np.float32)), const(np.array(0, np.int8))
        return add("DequantizeLinear", [add("QuantizeLinear", [value, s, z]), s, z])

    def matmul(x: str, fin: int, fout: int) -> str:
        w = (rng.standard_normal((fin, fout)) / np.sqrt(fin)).astype(np.float32)
        if quantized:
            scale = np.abs(w).max() / 127
            q = const(np.round(w / scale).astype(np.int8))
            weight = add("DequantizeLinear", [q, const(np.array(scale, np.float32)), const(np.array(0, np.int8))])
        else:
            weight = const(w)
        return add("MatMul", [shell(x), weight])

    def rms_norm(x: str) -> str:
        mean = add("ReduceMean", [add("Pow", [x, const(np.array(2.0, np.float32))])], axes=[-1])
        root = add("Sqrt", [add("Add", [mean, const(np.array(1e-6, np.float32))])])
        return add("Mul", [add("Div", [x, root]), const(np.ones(hidden, np.float32))])

    heads_shape = const(np.array([1, seq, heads, hidden // heads], np.int64))
    flat_shape = const(np.array([1, seq, hidden], np.int64))
    x = "x"
    for _ in range(blocks):
        h = rms_norm(x)
        q, k, v = (add("Transpose", [add("Reshape", [matmul(h, hidden, hidden), heads_shape])], perm=perm)
                   for perm in ([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3]))
        scores = add("Softmax", [add("Mul", [add("MatMul", [shell(q), shell(k)]), const(np.array(0.5, np.float32))])],
                     axis=-1)
        attention = add("Reshape", [add("Transpose", [add("MatMul", [shell(scores), shell(v)])], perm=[0, 2, 1, 3]),
                                    flat_shape])
        x = add("Add", [x, matmul(attention, hidden, hidden)])
        h = rms_norm(x)
        gate = matmul(h, hidden, 2 * hidden)
        mlp = add("Mul", [add("Mul", [gate, add("Sigmoid", [gate])]), matmul(h, hidden, 2 * hidden)])
        x = add("Add", [x, matmul(mlp, 2 * hidden, hidden)])
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, hidden])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def main() -> None:
    workloads = [
        ("folded", residual_net, "folded", (25, 100, 250, 1000, 2500)),
        ("islands", islands_net, "islands", (33, 133, 333, 1333, 3333)),
        ("decoder", decoder_net, "quantized", (3, 30, 150, 1500)),
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
            n = len(float_model.graph.node)  # the float model's ops (the rewritten copy may hold more)
            print(f"{n:>11}  {built - start:>8.3f}  {done - built:>8.3f}  {done - start:>8.3f}  "
                  f"{(done - start) / n * 1e6:>8.1f}  {alignment.coverage:.0%}")


if __name__ == "__main__":
    main()
