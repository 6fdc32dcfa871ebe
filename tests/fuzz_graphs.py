"""Random valid ONNX graphs, rewritten as a quantizer or an optimizer would, with a fault
planted at one layer, and the check that layerbisect names that layer.

Plain module (no pytest or hypothesis): ``tests/test_fuzz.py`` draws a few cases with
hypothesis, ``benchmarks/fuzz.py`` runs many. A case is reproducible from its ``repr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from layerbisect import LayerbisectError, Report, find_first_bad_layer
from layerbisect.run import ort_optimized

from models import float16, quantize, weight_only_int8

OPS = ("conv", "bn", "relu", "sigmoid", "add", "mul", "matmul", "concat", "transpose", "reshape",
       "maxpool", "gap", "softmax")
REWRITES = ("rename", "fold", "qdq", "qoperator", "dynamic", "optimized", "paddle", "int4", "fp16", "fp16mixed",
            "int8w", "foldqdq")
# "optimized": QDQ as onnxruntime runs it; "int4": MatMul weights in int4 blocks (MatMulNBits);
# "fp16": onnxconverter-common's fp16 conversion, Cast glue at the inputs and outputs;
# "fp16mixed": the same with the ops of FP32_KEPT kept in float32 (Cast glue around each);
# "int8w": weight-only int8, Conv and MatMul weights dequantized in the graph (Cast + Mul);
# "foldqdq": BatchNorms folded into the Convs, then QDQ
QUANTIZED = ("qdq", "qoperator", "dynamic", "optimized", "int4", "int8w", "foldqdq")
FP32_KEPT = ("BatchNormalization", "Add", "Softmax", "GlobalAveragePool")
THRESHOLD = 0.98
IDENTICAL = 0.99999  # the cosine of a value with itself, within float tolerance
CLEAR_MARGIN = 0.9  # a fault is planted to be found when its reference cosine is below this
MIN_QUANTIZED_SIZE = 16  # elements of a quantized value for its cosine to tell a fault from noise


@dataclass(frozen=True)
class Case:
    """A float graph (``ops`` in order, weights and shapes from ``seed``), how it is
    rewritten, and the fault: its kind (``fault`` even: the weight negated, odd: its values
    shuffled) and which weighted node gets it (``fault // 2`` modulo their number)."""

    seed: int
    ops: tuple[str, ...]
    rewrite: str
    fault: int


def random_model(seed: int, ops: tuple[str, ...]) -> onnx.ModelProto:
    """A valid float model applying ``ops`` to x[1,C,H,W]; each op reads the latest value or,
    now and then, an earlier one. Every value no op reads is a graph output."""
    rng = np.random.default_rng(seed)
    values: list[tuple[str, tuple[int, ...]]] = [("x", (1, *map(int, rng.integers([1, 3, 3], [5, 7, 7]))))]
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array.astype(np.float32) if array.dtype.kind == "f" else array, name))
        return name

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    def same(shape: tuple[int, ...], exclude: str = "") -> list[str]:
        return [name for name, other in values if other == shape and name != exclude]

    for index, op in enumerate(ops):
        src, shape = values[-1] if rng.random() < 0.6 else values[rng.integers(len(values))]
        _, c, h, w = shape
        name = f"{op}{index}"
        inputs, attrs, out = [src], {}, shape
        if op == "conv":
            k, cout = int(rng.choice([1, 3])), int(rng.integers(1, 7))
            inputs += [const(f"{name}.w", normal(cout, c, k, k) / np.sqrt(c * k * k)),
                       const(f"{name}.b", 0.1 * normal(cout))]
            attrs = {"kernel_shape": [k, k], "pads": [k // 2] * 4}
            out = (1, cout, h, w)
        elif op == "bn":
            inputs += [const(f"{name}.scale", rng.uniform(0.5, 1.5, c).astype(np.float32)),
                       const(f"{name}.bias", 0.1 * normal(c)), const(f"{name}.mean", 0.1 * normal(c)),
                       const(f"{name}.var", rng.uniform(0.5, 1.5, c).astype(np.float32))]
        elif op == "add":
            others = same(shape, exclude=src)
            inputs.append(others[rng.integers(len(others))] if others else const(f"{name}.c", normal(1, c, 1, 1)))
        elif op == "mul":
            inputs.append(const(f"{name}.k", rng.uniform(0.5, 1.5, (1, c, 1, 1)).astype(np.float32)))
        elif op == "matmul":
            w2 = int(rng.integers(2, 7))
            inputs.append(const(f"{name}.w", normal(w, w2) / np.sqrt(w)))
            out = (1, c, h, w2)
        elif op == "concat":
            others = [n for n, s in values if s[2:] == (h, w)]
            other = others[rng.integers(len(others))]
            attrs = {"axis": 1}
            inputs.append(other)
            out = (1, c + dict(values)[other][1], h, w)
        elif op == "transpose":
            attrs = {"perm": [0, 1, 3, 2]}
            out = (1, c, w, h)
        elif op == "reshape":
            inputs.append(const(f"{name}.shape", np.array([1, c, w, h], np.int64)))
            out = (1, c, w, h)
        elif op == "maxpool":
            attrs = {"kernel_shape": [2, 2], "pads": [0, 0, 1, 1]}
        elif op == "gap":
            out = (1, c, 1, 1)
        elif op == "softmax":
            attrs = {"axis": -1}
        op_type = {"conv": "Conv", "bn": "BatchNormalization", "relu": "Relu", "sigmoid": "Sigmoid",
                   "add": "Add", "mul": "Mul", "matmul": "MatMul", "concat": "Concat",
                   "transpose": "Transpose", "reshape": "Reshape", "maxpool": "MaxPool",
                   "gap": "GlobalAveragePool", "softmax": "Softmax"}[op]
        nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        values.append((name, out))
    read = {name for node in nodes for name in node.input}
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in values[1:] if n not in read]
    graph = helper.make_graph(
        nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(values[0][1]))], outputs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def weighted_nodes(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(node, float weight initializer) for each node that reads one: where faults go."""
    floats = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and i.dims}
    return [(n.name, n.input[1]) for n in model.graph.node if len(n.input) > 1 and n.input[1] in floats]


def corrupt(model: onnx.ModelProto, initializer: str, shuffle: bool) -> onnx.ModelProto:
    """A copy of ``model`` with one initializer negated, or its values shuffled."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    init = next(i for i in copy.graph.initializer if i.name == initializer)
    value = numpy_helper.to_array(init)
    if shuffle:
        value = np.random.default_rng(0).permutation(value.ravel()).reshape(value.shape)
    init.CopyFrom(numpy_helper.from_array(value if shuffle else -value, initializer))
    return copy


def rename(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where every node, tensor and initializer has a new, meaningless name."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    names = [i.name for i in graph.input] + [i.name for i in graph.initializer] + [
        out for node in graph.node for out in node.output
    ]
    new = {name: f"t{index}" for index, name in enumerate(dict.fromkeys(names))}
    for index, node in enumerate(graph.node):
        node.name = f"op{index}"
        node.input[:] = [new.get(n, n) for n in node.input]
        node.output[:] = [new[n] for n in node.output]
    for item in [*graph.input, *graph.output, *graph.initializer]:
        item.name = new[item.name]
    return copy


def fold_batchnorms(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where each BatchNormalization that alone reads a Conv is folded into
    that Conv's weights, as exporters and optimizers do."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    for bn in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        conv = producers.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or readers[bn.input[0]] > 1 or bn.input[0] in outputs:
            continue
        scale, bias, mean, var = (numpy_helper.to_array(inits[n]) for n in bn.input[1:])
        factor = scale / np.sqrt(var + 1e-5)
        weight, conv_bias = (numpy_helper.to_array(inits[n]) for n in conv.input[1:3])
        folded = (weight * factor[:, None, None, None], (conv_bias - mean) * factor + bias)
        for name, value in zip(conv.input[1:3], folded):
            inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
        conv.output[0] = bn.output[0]
        graph.node.remove(bn)
    return copy


class Unquantizable(Exception):
    """onnxruntime's quantizer does not take every valid graph."""


def unknown_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose dimensions but the channels are written as -1 wherever a shape
    is declared, as Paddle2ONNX writes dynamic ones."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for info in [*copy.graph.input, *copy.graph.output, *copy.graph.value_info]:
        for axis, dim in enumerate(info.type.tensor_type.shape.dim):
            if axis != 1:
                dim.Clear()
                dim.dim_value = -1
    return copy


def int4_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its MatMul weights in int4 blocks of 16 by onnxruntime's
    MatMulNBitsQuantizer (com.microsoft MatMulNBits)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    quantizer = MatMulNBitsQuantizer(copy, block_size=16, is_symmetric=False)
    quantizer.process()
    return quantizer.model.model


def rewrite(model: onnx.ModelProto, how: str) -> onnx.ModelProto:
    """``model`` renamed, folded (and renamed), with dimensions written as -1 (and renamed),
    in fp16 (all of it or some ops kept in float32), with int8 weights dequantized in the
    graph, with int4 MatMul weights, or quantized to int8 (QDQ, QOperator, dynamic; QDQ after
    BatchNorm folding)."""
    if how == "rename":
        return rename(model)
    if how == "fold":
        return rename(fold_batchnorms(model))
    if how == "paddle":
        return rename(unknown_dims(model))
    if how in ("fp16", "fp16mixed"):
        return float16(model, FP32_KEPT if how == "fp16mixed" else ())
    if how == "int8w":
        return weight_only_int8(model)
    try:
        if how == "int4":
            return int4_weights(model)
        if how == "foldqdq":
            return quantize(fold_batchnorms(model), "qdq", num_samples=16)
        return quantize(model, "qdq" if how == "optimized" else how, num_samples=16)
    except Exception as exc:
        raise Unquantizable(str(exc)) from exc


def reference_cosines(float_model, faulty_model, tensors: list[str], feeds) -> dict[str, float]:
    """Cosine of each tensor between the float model and its faulty copy, run here with
    onnxruntime directly: what a correct answer must be based on."""
    runs = []
    for model in (float_model, faulty_model):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        listed = {o.name for o in copy.graph.output}
        copy.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in listed)
        session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
        runs.append(dict(zip(tensors, session.run(tensors, feeds))))
    return {t: _cosine(runs[0][t], runs[1][t]) for t in tensors}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if norms == 0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(np.dot(a, b) / norms)


def _feeds(case: Case, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The case's sample for ``model``'s one input (renamed or not, its dimensions maybe
    written as -1: the shape is the float model's)."""
    shape = [d.dim_value for d in random_model(case.seed, case.ops).graph.input[0].type.tensor_type.shape.dim]
    name = model.graph.input[0].name
    return {name: np.random.default_rng(case.seed + 1).standard_normal(shape).astype(np.float32)}


def identical_model(case: Case) -> onnx.ModelProto:
    """The case's model rewritten (``fault`` unused); for "optimized", the graph onnxruntime
    runs for its QDQ model."""
    model = rewrite(random_model(case.seed, case.ops), case.rewrite)
    return ort_optimized(model, "model") if case.rewrite == "optimized" else model


def check_identity(case: Case) -> str:
    """Compare the case's rewritten model with itself; return "identical" (every float
    operation aligned with itself, every value read from the same tensor on both sides, every
    cosine, isolated ones included, at least ``IDENTICAL``), "unquantizable" or "error:
    <message>" (a LayerbisectError). Anything else raises AssertionError."""
    try:
        model = identical_model(case)
        report = find_first_bad_layer(model, model, _feeds(case, model), THRESHOLD, quiet=True)
    except Unquantizable:
        return "unquantizable"
    except LayerbisectError as exc:
        return f"error: {exc}"
    assert report.coverage == 1.0, f"unaligned: {report.unaligned}"
    for layer in report.layers:
        assert (layer.float_nodes, layer.float_tensor) == (layer.quant_nodes, layer.quant_tensor), (
            f"{layer.describe()} pairs {layer.float_nodes} {layer.float_tensor!r} with "
            f"{layer.quant_nodes} {layer.quant_tensor!r}")
        assert layer.cosine >= IDENTICAL, layer.describe()
        assert math.isnan(layer.isolated_cosine) or layer.isolated_cosine >= IDENTICAL, (
            f"{layer.describe()}: isolated cosine {layer.isolated_cosine}")
    assert report.first_bad is None
    return "identical"


def check(case: Case) -> str:
    """Run layerbisect on ``case`` and check its answer; return what happened:

    "found" (the faulty layer was named), "healthy" (no weighted node to fault: the rewritten
    model passes), "hidden" (the fault changes no compared value, and none was named),
    "marginal" (the fault is too faint, or its value too small, to require finding), "noisy" (quantization alone fails
    a layer at or before the fault), "unquantizable" (onnxruntime's quantizer refused the
    graph), or "error: <message>" (a LayerbisectError, which is an allowed answer). A wrong
    answer raises AssertionError.
    """
    model = random_model(case.seed, case.ops)
    feeds = _feeds(case, model)
    weighted = weighted_nodes(model)
    optimized = case.rewrite == "optimized"
    try:
        healthy = find_first_bad_layer(model, rewrite(model, case.rewrite), feeds, THRESHOLD, ort_optimized=optimized)
        if case.rewrite not in QUANTIZED:
            assert healthy.first_bad is None, f"healthy rewrite fails at {healthy.first_bad.describe()}"
        if not weighted:
            return "healthy"
        node, weight = weighted[case.fault // 2 % len(weighted)]
        faulty_float = corrupt(model, weight, shuffle=case.fault % 2 == 1)
        quant = rewrite(faulty_float, case.rewrite)
        report = find_first_bad_layer(model, quant, feeds, THRESHOLD, ort_optimized=optimized)
        # bisection, with passes resumed from saved values, on a budget that forces several
        bisected = find_first_bad_layer(model, quant, feeds, THRESHOLD, ort_optimized=optimized,
                                        strategy="bisect", memory_budget=max(1, report.peak_bytes // 4))
        _agrees(report, bisected)
    except Unquantizable:
        return "unquantizable"
    except LayerbisectError as exc:
        return f"error: {exc}"
    return _judge(case, model, faulty_float, node, healthy, report, feeds)


def _agrees(scan: Report, bisected: Report) -> None:
    """Bisection names the scan's first bad layer wherever the answer is clear: every layer
    before it well above the threshold, it well below, and every layer after it failing
    (bisection assumes that)."""
    bad = scan.first_bad
    if bad is None or bad.cosine >= CLEAR_MARGIN:
        return
    position = scan.layers.index(bad)
    before, after = scan.layers[:position], scan.layers[position:]
    if all(layer.cosine >= 0.99 for layer in before) and not any(layer.passes(THRESHOLD) for layer in after):
        assert bisected.first_bad is not None and bisected.first_bad.index == bad.index, (
            f"scan names {bad.describe()}, bisection "
            f"{bisected.first_bad.describe() if bisected.first_bad else 'nothing'}"
        )


def _judge(case, model, faulty_float, node: str, healthy: Report, report: Report, feeds) -> str:
    tensors = [layer.float_tensor for layer in report.layers]
    reference = reference_cosines(model, faulty_float, tensors, feeds)
    expected = next((layer for layer in report.layers if reference[layer.float_tensor] < THRESHOLD), None)
    named = report.first_bad
    if expected is None:
        if case.rewrite not in QUANTIZED:
            assert named is None, f"named {named.float_nodes} though the fault changes no compared value"
        return "hidden"
    if reference[expected.float_tensor] >= CLEAR_MARGIN:
        return "marginal"
    if case.rewrite in QUANTIZED and np.prod(expected.shape) < MIN_QUANTIZED_SIZE:
        return "marginal"  # over a few elements, quantization noise alone can flip a cosine
    if case.rewrite in QUANTIZED and healthy.first_bad is not None and healthy.first_bad.index <= expected.index:
        return "noisy"
    assert named is not None, f"fault at {node!r} not found (expected {expected.float_nodes})"
    assert named.float_tensor == expected.float_tensor or node in named.float_nodes, (
        f"fault at {node!r}: named {named.float_nodes}, expected {expected.float_nodes}"
    )
    return "found"
