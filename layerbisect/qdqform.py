"""The QDQ form of a QOperator or dynamic model: the same quantizers, written as
QuantizeLinear/DequantizeLinear around float operations.

A QOperator model computes in integers: ``QLinearConv(x_q, x_scale, x_zp, w_q, w_scale,
w_zp, y_scale, y_zp, bias_q)`` is the float ``Conv`` of the dequantized input and weights,
its result quantized with ``y_scale``/``y_zp``. Its QDQ form writes exactly that:
``DequantizeLinear`` of each integer input (the int32 bias with scale ``x_scale * w_scale``),
the float operation, ``QuantizeLinear`` of its result, with the model's own scales, zero
points and integers. A dynamic model's ``DynamicQuantizeLinear`` stays (its scale and zero
point are computed from each input at run time); the ``ConvInteger``/``MatMulInteger``, the
``Cast`` and the ``Mul`` by the two scales after it become ``DequantizeLinear`` of the
quantized input and weight and the float operation; onnxruntime's fused
``DynamicQuantizeMatMul`` and ``MatMulIntegerToFloat`` likewise. An operation that only moves
integers (a MaxPool, Reshape, Transpose ... reading a quantized tensor) is written between a
DequantizeLinear and a QuantizeLinear with that tensor's scale and zero point, as a QDQ model
writes it (exact): every quantized activation is then read through a DequantizeLinear.

Each float operation keeps the name of the integer operation it replaces, and each tensor
the rest of the graph reads keeps its name, so an alignment made on the model pairs the same
names in its QDQ form. The two compute the same values up to the integer kernels' own
rounding (requantizing with a float multiplier, accumulating in int32), and, on x86 CPUs
without VNNI, their clipping of int8 products (``layerbisect.kernels``). Operations not
listed here (QAttention, QLinearWhere ...) stay as they are.

>>> from layerbisect import demo
>>> qdq, rewritten = qdq_form(demo.quantized_model(quant_format="QOperator"))
>>> rewritten[:2]
('conv1_quant', 'conv2_quant')
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from layerbisect.fallback import _drop_unread
from layerbisect.load import tensor_array
from layerbisect.wiring import consumers, producers

_CONTRIB = "com.microsoft"
# QOperator op -> float op, its (value, scale, zero point) input triples, the (scale, zero
# point) of its output, attributes the float op lacks
_STATIC: dict[str, tuple[str, tuple[tuple[int, int, int], ...], tuple[int, int] | None, tuple[str, ...]]] = {
    "QLinearConv": ("Conv", ((0, 1, 2), (3, 4, 5)), (6, 7), ()),
    "QLinearMatMul": ("MatMul", ((0, 1, 2), (3, 4, 5)), (6, 7), ()),
    "QGemm": ("Gemm", ((0, 1, 2), (3, 4, 5)), (7, 8), ()),
    "QLinearAdd": ("Add", ((0, 1, 2), (3, 4, 5)), (6, 7), ()),
    "QLinearMul": ("Mul", ((0, 1, 2), (3, 4, 5)), (6, 7), ()),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", ((0, 1, 2),), (3, 4), ("channels_last",)),
    "QLinearAveragePool": ("AveragePool", ((0, 1, 2),), (3, 4), ("channels_last",)),
    "QLinearSigmoid": ("Sigmoid", ((0, 1, 2),), (3, 4), ()),
    "QLinearLeakyRelu": ("LeakyRelu", ((0, 1, 2),), (3, 4), ()),
    "QLinearSoftmax": ("Softmax", ((0, 1, 2),), (3, 4), ("opset",)),
}
_INTEGER = {"ConvInteger": "Conv", "MatMulInteger": "MatMul"}
# operations that move or pick integers without computing: on a quantized tensor, the same
# operation between DequantizeLinear and QuantizeLinear with its scale and zero point is exact
MOVES = frozenset({"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Expand",
                   "Gather", "Identity", "DepthToSpace", "SpaceToDepth"})


def qdq_form(model: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    """A copy of ``model`` with its QOperator and dynamic operations written as
    QuantizeLinear/DequantizeLinear around float operations (see the module's docstring), and
    the names of the operations rewritten. ``model`` is not changed.

    >>> from layerbisect import demo
    >>> qdq, rewritten = qdq_form(demo.quantized_model(quant_format="QOperator"))
    >>> "QLinearConv" in {node.op_type for node in qdq.graph.node}
    False
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    constants = {init.name: init for init in graph.initializer}
    producer, readers = producers(graph), consumers(graph)
    rewritten: list[str] = []
    nodes: list[onnx.NodeProto] = []
    replaced: set[int] = set()  # the Cast and Mul after a ConvInteger/MatMulInteger rewritten
    grids: dict[str, tuple[str, str]] = {}  # integer tensor -> the names of its scale and zero point
    for node in graph.node:
        if id(node) in replaced:
            continue
        replacement = _rewrite(node, constants, producer, readers, graph, replaced)
        if replacement is None and node.op_type in MOVES and node.input[0] in grids and len(node.output) == 1:
            replacement = _moved(node, grids[node.input[0]])
        if replacement is None:
            nodes.append(node)
        else:
            nodes.extend(replacement)
            rewritten.append(node.name)
        for made in replacement or [node]:
            if made.op_type == "QuantizeLinear":
                grids[made.output[0]] = (made.input[1], _at(made, 2))
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unread(graph)
    opset = next((o.version for o in copy.opset_import if o.domain in ("", "ai.onnx")), 0)
    axes = [node for node in graph.node if node.op_type == "DequantizeLinear" and node.attribute]
    if opset < 13 and axes:  # DequantizeLinear takes an axis from opset 13; onnxruntime's own always
        for node in axes:
            node.domain = _CONTRIB
        if not any(o.domain == _CONTRIB for o in copy.opset_import):
            copy.opset_import.append(helper.make_opsetid(_CONTRIB, 1))
    return copy, tuple(rewritten)


def _rewrite(node, constants, producer, consumers, graph, replaced: set[int]) -> list[onnx.NodeProto] | None:
    """The nodes standing for ``node`` in the QDQ form, or None to keep it."""
    if node.op_type in _STATIC and node.domain in ("", _CONTRIB):
        return _static(node, constants, graph)
    if node.op_type == "QLinearConcat":
        return _concat(node)
    if node.op_type in _INTEGER:
        return _integer(node, constants, producer, consumers, replaced)
    if node.op_type == "MatMulIntegerToFloat":
        a = _dq(f"{node.name}__layerbisect_dq0", [node.input[0], node.input[2], _at(node, 4)], None)
        b = _dq(f"{node.name}__layerbisect_dq1", [node.input[1], node.input[3], _at(node, 5)],
                _per_column(node.input[3], constants))
        return _fused(node, [a, b], _at(node, 6))
    if node.op_type == "DynamicQuantizeMatMul":
        base = f"{node.name}__layerbisect"
        dynamic = helper.make_node("DynamicQuantizeLinear", [node.input[0]],
                                   [f"{base}_a_q", f"{base}_a_scale", f"{base}_a_zero_point"], name=f"{base}_a_dynamic")
        a = _dq(f"{base}_a_dq", [f"{base}_a_q", f"{base}_a_scale", f"{base}_a_zero_point"], None)
        b = _dq(f"{base}_b_dq", [node.input[1], node.input[2], _at(node, 3)], _per_column(node.input[2], constants))
        return [dynamic, *_fused(node, [a, b], _at(node, 4))]
    return None


def _static(node, constants, graph) -> list[onnx.NodeProto] | None:
    op, triples, output, dropped = _STATIC[node.op_type]
    attrs = {a.name: a for a in node.attribute}
    if "channels_last" in attrs and attrs["channels_last"].i:
        return None  # a layout the float operation does not take
    if op == "Softmax" and "opset" in attrs and attrs["opset"].i < 13:
        return None  # the old Softmax flattens to 2-D first: not the float op of this opset
    transposed = op == "Gemm" and "transB" in attrs and attrs["transB"].i
    inputs, prefix = [], []
    for position, (value, scale, zero_point) in enumerate(triples):
        axis = None
        if op in ("Conv", "MatMul", "Gemm") and position == 1:
            axis = _weight_axis(op, bool(transposed), node.input[value], constants)
        triple = [node.input[value], node.input[scale], _at(node, zero_point)]
        dq = _dq(f"{node.name}__layerbisect_dq{position}", triple,
                 axis if _size(node.input[scale], constants) > 1 else None)
        prefix.append(dq)
        inputs.append(dq.output[0])
    bias = {"Conv": 8, "Gemm": 6}.get(op)
    if bias is not None and _at(node, bias):
        bias_scale = _bias_scale(node, triples, constants,
                                 beta=attrs["beta"].f if "beta" in attrs and op == "Gemm" else 1.0)
        if bias_scale is None:
            return None
        name = f"{node.name}__layerbisect_bias"
        graph.initializer.extend([numpy_helper.from_array(bias_scale, f"{name}_scale"),
                                  numpy_helper.from_array(np.zeros(bias_scale.shape, np.int32), f"{name}_zero_point")])
        dq = _dq(f"{node.name}__layerbisect_dq_bias", [node.input[bias], f"{name}_scale", f"{name}_zero_point"],
                 0 if bias_scale.size > 1 else None)
        prefix.append(dq)
        inputs.append(dq.output[0])
    kept = [a for a in node.attribute if a.name not in dropped]
    has_output = output is not None and _at(node, output[0])
    result = f"{node.output[0]}__qdq_result" if has_output else node.output[0]
    float_node = helper.make_node(op, inputs, [result], name=node.name)
    float_node.attribute.extend(kept)
    if output is None or not has_output:
        return [*prefix, float_node]
    q = helper.make_node("QuantizeLinear", [result, node.input[output[0]], _at(node, output[1])], [node.output[0]],
                         name=f"{node.name}__layerbisect_q")
    return [*prefix, float_node, q]


def _moved(node, grid: tuple[str, str]) -> list[onnx.NodeProto]:
    """An operation moving integers (``MOVES``) between DequantizeLinear and QuantizeLinear
    with the ``grid`` (scale, zero point names) of the tensor it reads."""
    dq = _dq(f"{node.name}__layerbisect_dq0", [node.input[0], *grid], None)
    result = f"{node.output[0]}__qdq_result"
    moved = helper.make_node(node.op_type, [dq.output[0], *node.input[1:]], [result], name=node.name,
                             domain=node.domain)
    moved.attribute.extend(node.attribute)
    q = helper.make_node("QuantizeLinear", [result, *grid], [node.output[0]], name=f"{node.name}__layerbisect_q")
    return [dq, moved, q]


def _concat(node) -> list[onnx.NodeProto]:
    """QLinearConcat(y_scale, y_zp, x0, s0, z0, x1, s1, z1, ...) as Concat between Q/DQ."""
    prefix = [_dq(f"{node.name}__layerbisect_dq{i}", [node.input[start], node.input[start + 1], node.input[start + 2]],
                  None) for i, start in enumerate(range(2, len(node.input) - 2, 3))]
    result = f"{node.output[0]}__qdq_result"
    concat = helper.make_node("Concat", [dq.output[0] for dq in prefix], [result], name=node.name)
    concat.attribute.extend(node.attribute)
    q = helper.make_node("QuantizeLinear", [result, node.input[0], node.input[1]], [node.output[0]],
                         name=f"{node.name}__layerbisect_q")
    return [*prefix, concat, q]


def _integer(node, constants, producer, consumers, replaced: set[int]) -> list[onnx.NodeProto] | None:
    """ConvInteger/MatMulInteger -> Cast -> Mul by (input scale x weight scale), as onnxruntime's
    quantize_dynamic writes it, into DequantizeLinear of both inputs and the float op making the
    Mul's output. None when the pattern is not that one."""
    dynamic = producer.get(node.input[0])
    cast = _only(consumers.get(node.output[0], []), "Cast")
    mul = _only(consumers.get(cast.output[0], []), "Mul") if cast is not None else None
    if (dynamic is None or dynamic.op_type != "DynamicQuantizeLinear" or cast is None or mul is None
            or node.input[1] not in constants):
        return None
    scales = producer.get(next(name for name in mul.input if name != cast.output[0]))
    if scales is None or scales.op_type != "Mul" or dynamic.output[1] not in scales.input:
        return None
    weight_scale = next(name for name in scales.input if name != dynamic.output[1])
    op = _INTEGER[node.op_type]
    a = _dq(f"{node.name}__layerbisect_dq0", [node.input[0], dynamic.output[1], _at(node, 2)], None)
    axis = _weight_axis(op, False, node.input[1], constants)
    b = _dq(f"{node.name}__layerbisect_dq1", [node.input[1], weight_scale, _at(node, 3)],
            axis if _size(weight_scale, constants) > 1 else None)
    float_node = helper.make_node(op, [a.output[0], b.output[0]], [mul.output[0]], name=node.name)
    float_node.attribute.extend(node.attribute)
    replaced.update((id(cast), id(mul)))  # the Mul of the two scales, no longer read, is dropped
    return [a, b, float_node]


def _fused(node, dequantized: Sequence[onnx.NodeProto], bias: str) -> list[onnx.NodeProto]:
    """The float MatMul of ``dequantized`` named as ``node`` (and its bias added), making
    ``node``'s output."""
    product = f"{node.output[0]}__layerbisect_product" if bias else node.output[0]
    nodes = [*dequantized, helper.make_node("MatMul", [dq.output[0] for dq in dequantized], [product], name=node.name)]
    if bias:
        nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{node.name}__layerbisect_bias"))
    return nodes


def _dq(name: str, inputs: list[str], axis: int | None) -> onnx.NodeProto:
    while inputs and not inputs[-1]:
        inputs = inputs[:-1]
    node = helper.make_node("DequantizeLinear", inputs, [f"{name}_output"], name=name)
    if axis is not None:
        node.attribute.append(helper.make_attribute("axis", axis))
    return node


def _at(node: onnx.NodeProto, position: int) -> str:
    return node.input[position] if position < len(node.input) else ""


def _only(nodes: Sequence[onnx.NodeProto], op_type: str) -> onnx.NodeProto | None:
    return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op_type else None


def _size(name: str, constants) -> int:
    return int(tensor_array(constants[name]).size) if name in constants else 1


def _weight_axis(op: str, transposed: bool, weight: str, constants) -> int:
    """The axis of a per-channel weight scale: output channels (0 for Conv and a transposed
    Gemm's B, the last for MatMul and Gemm's B)."""
    if op == "Conv" or transposed:
        return 0
    rank = tensor_array(constants[weight]).ndim if weight in constants else 2
    return rank - 1


def _per_column(scale: str, constants) -> int | None:
    return 1 if _size(scale, constants) > 1 else None


def _bias_scale(node, triples, constants, beta: float) -> np.ndarray | None:
    """The int32 bias's scale: the input's times the weight's (per channel or not), times
    Gemm's beta, as onnxruntime's quantizer wrote it. None when a scale is not a constant."""
    (_, x_scale, _), (_, w_scale, _) = triples
    if node.input[x_scale] not in constants or node.input[w_scale] not in constants:
        return None
    scale = tensor_array(constants[node.input[x_scale]]).astype(np.float64) * \
        tensor_array(constants[node.input[w_scale]]).astype(np.float64) * beta
    return np.asarray(scale, np.float32).reshape(-1) if scale.size > 1 else np.asarray(scale, np.float32).reshape(())
