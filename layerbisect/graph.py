"""A model as a networkx graph of operations in their float meaning.

Quantization leaves the float computation in place but wraps it: QuantizeLinear/DequantizeLinear
shells (QDQ), integer operators that carry their own scales (QOperator: QLinearConv, QGemm, ...),
or dynamic quantization (DynamicQuantizeLinear + MatMulInteger + Cast + Mul). This module sees
through all three. Each node of the graph built here is one operation with a *role* (its float
op type: QLinearConv -> Conv, MatMulInteger -> MatMul), and each edge is a value flowing between
operations. Quantization plumbing, constants and weights are not nodes: they are folded into the
*readout* of a value (which tensor holds it and how to dequantize it) and into the *fingerprint*
of a node's weight.

The same function builds the graph of the float model and of the quantized one, so that the
aligner (``layerbisect.align``) compares like with like. This module knows what quantized
operators mean; the aligner knows which float operations may be folded or replaced.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np
import onnx
from onnx import helper

from layerbisect.grid import dequantize, unpack
from layerbisect.layouts import Perm, inverse, to_channels_first
from layerbisect.load import tensor_array, tensor_nbytes
from layerbisect.vocabulary import INTERMEDIATES, MASK_INPUTS, MASK_OUTPUTS, ROLES
from layerbisect.wiring import consumers, producer_positions, producers

ValueRef = tuple[str, int]
"""A value: (graph node id, output index). Graph inputs are nodes with a single output."""


# Operators that compute in channels-last layout (NHWC), like any op with channels_last=1.
CHANNELS_LAST_OPS = {"NhwcConv", "NhwcFusedConv", "NhwcMaxPool"}
# Operators whose output depends on their input's shape only: their results (and what is
# computed from them alone, such as Shape -> Gather -> Unsqueeze -> Concat) are constants here.
SHAPE_OPS = {"Shape", "Size"}

# Input positions of the output scale and zero point of QOperator nodes whose output is integer.
OUTPUT_QPARAMS = {
    "QLinearConv": (6, 7),
    "QLinearMatMul": (6, 7),
    "QLinearAdd": (6, 7),
    "QLinearMul": (6, 7),
    "QGemm": (7, 8),
    "QLinearGlobalAveragePool": (3, 4),
    "QLinearAveragePool": (3, 4),
    "QLinearSigmoid": (3, 4),
    "QLinearLeakyRelu": (3, 4),
    "QLinearSoftmax": (3, 4),
    "QLinearReduceMean": (3, 4),
    "QLinearConcat": (0, 1),
    "QLinearWhere": (7, 8),
}

# Input positions of (quantized weight, its scale, its zero point) of integer operators.
WEIGHT_QPARAMS = {
    "QLinearConv": (3, 4, 5),
    "QLinearMatMul": (3, 4, 5),
    "QGemm": (3, 4, 5),
    "ConvInteger": (1, None, 3),
    "MatMulInteger": (1, None, 3),
    "DynamicQuantizeMatMul": (1, 2, 3),
    "MatMulIntegerToFloat": (1, 3, 5),
}

# Operators that move integers around without rescaling them: their output keeps the
# quantization parameters of their first input.
INTEGER_PASSTHROUGH = {
    "MaxPool", "NhwcMaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather",
    "Split", "Resize", "Pad", "Expand", "Tile", "DepthToSpace", "SpaceToDepth",
}
INTEGER_OPS = {"MatMulInteger", "ConvInteger"}
# Input position of the bias that operators add inside themselves.
BIAS_INPUT = {
    "Conv": 2, "ConvTranspose": 2, "Gemm": 2, "QLinearConv": 8, "QGemm": 6,
    "DynamicQuantizeMatMul": 4, "MatMulIntegerToFloat": 6, "FusedConv": 2, "FusedGemm": 2, "MatMulNBits": 5,
}
SHELL_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Identity", "Dropout"}
FLOAT_DTYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16}
FINGERPRINT_SIZE = 4096
CONST, SCALE = "const", "scale"
MASK = "mask"  # an attention mask in a fused operator's own form (``vocabulary.MASK_INPUTS``)
LARGE_INITIALIZER = 1024  # bytes; smaller ones (shapes, axes) may be read by shape inference
NOT_A_TENSOR = -1  # the dtype of a sequence, map or optional value: never compared
# Arithmetic on constants that a weight's value is computed through, folded here with Cast:
# the dequantization of weight-only int8 in the graph, (Cast(q) - zero point) * scale.
FOLDED = {"Mul": np.multiply, "Sub": np.subtract}
FOLD_DEPTH = 4  # Cast, Sub, Mul: three steps from the stored integers, one to spare


@dataclass(frozen=True)
class Readout:
    """Where a value can be read, and how to turn it into float.

    ``scale``/``zero_point`` are set when ``tensor`` holds integers (a QOperator output);
    ``axis`` is the channel axis of per-channel parameters. ``perm`` is set when the tensor
    holds the value in another layout than the float model's (NHWC for NCHW): the float value
    is ``numpy.transpose(tensor, perm)``.
    """

    tensor: str
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    axis: int = 1
    perm: Perm = None

    def dequantize(self, array: np.ndarray) -> np.ndarray:
        """Return ``array`` as float values in the float model's layout: dequantized (unless
        already float), then permuted by ``perm`` (unless its rank does not fit)."""
        scale = self.scale
        values = array if scale is None or np.issubdtype(array.dtype, np.floating) else \
            dequantize(array, scale, self.zero_point, self.axis)
        if self.perm is None or values.ndim != len(self.perm):
            return values
        return np.ascontiguousarray(values.transpose(self.perm))

    def to_tensor_layout(self, array: np.ndarray) -> np.ndarray:
        """Return ``array``, in the float model's layout, in the layout of ``tensor``: the
        inverse of the permutation ``dequantize`` applies."""
        if self.perm is None or array.ndim != len(self.perm):
            return array
        return np.ascontiguousarray(array.transpose(inverse(self.perm)))


@dataclass(frozen=True, eq=False)
class Op:
    """One node of the graph: a graph input (``kind`` "input") or an operation ("op").

    ``name`` and ``op_type`` are the ONNX node's (an input's name; op type "Input"), ``role``
    its float meaning (QLinearConv -> Conv), ``order`` its position in the model, ``sources``
    the ValueRef of each data input, in input order, ``outputs`` the tensors it computes (an
    input: itself), and per output its ``readouts``, ``shapes`` and ``dtypes`` (None where
    unknown). ``fingerprint`` is a sample of the dequantized weight (in MatMul orientation for
    a Gemm with transB) and ``weight_shape`` that weight's shape in the same orientation (both
    None without one), ``bias`` whether the operation adds a bias inside itself, ``perm`` a
    Transpose's permutation (None for other operations and where unknown) and ``layout``, for
    an operation that computes channels-last, the permutation that brings its tensors to
    channels-first."""

    kind: str
    name: str
    op_type: str
    role: str
    order: float
    sources: tuple[ValueRef, ...]
    outputs: tuple[str, ...]
    readouts: tuple[Readout, ...]
    shapes: tuple[tuple[int | None, ...] | None, ...]
    dtypes: tuple[int | None, ...]
    fingerprint: np.ndarray | None = None
    weight_shape: tuple | None = None
    bias: bool = False
    perm: Perm = None
    layout: Perm = None


class OpGraph(nx.DiGraph):
    """The graph ``build_graph`` makes: networkx's, with each node's ``Op`` and what the whole
    graph declares, typed. Subgraph views of it are OpGraphs too, sharing these."""

    def op(self, node: str) -> Op:
        """The ``Op`` of ``node``."""
        return self.nodes[node]["op"]

    def ops(self) -> Iterator[tuple[str, Op]]:
        """Each node and its ``Op``, in insertion order (inputs, then operations in order)."""
        for node, data in self.nodes(data=True):
            yield node, data["op"]

    def in_order(self) -> Iterator[str]:
        """The nodes in a topological order, ties broken by the model's order (networkx's
        lexicographical topological sort)."""
        return nx.lexicographical_topological_sort(self, key=lambda n: self.op(n).order)

    @property
    def tensors(self) -> Mapping[str, ValueRef]:
        """The ValueRef of each tensor that holds a data value, by name."""
        return self.graph["tensors"]

    @property
    def outputs(self) -> tuple[ValueRef | None, ...]:
        """The ValueRef of each declared output, in order (None for a constant)."""
        return self.graph["outputs"]

    @property
    def mask_inputs(self) -> frozenset[str]:
        """The graph inputs a fused operator reads as its attention mask."""
        return self.graph["mask_inputs"]

    @property
    def types(self) -> Mapping[str, onnx.TypeProto]:
        """The type of every tensor of the model that shape inference could tell."""
        return self.graph["types"]


def build_graph(model: onnx.ModelProto, types: Mapping[str, onnx.TypeProto] | None = None) -> OpGraph:
    """Return the graph of operations of ``model`` (nodes named, shapes inferred if possible):
    an ``Op`` per node (``OpGraph.op``), an edge from each operation to those reading it.

    An attention mask that a fused operator reads or passes on in its own form (a mask index,
    sequence lengths: ``vocabulary.MASK_INPUTS`` and ``MASK_OUTPUTS``) is no data value here,
    like a constant: the float graph computes its additive mask otherwise, and the two are
    not compared.

    Values computed from shapes alone (Shape, and what follows from it without other data) are
    constants here: a Reshape whose target shape one exporter computes and another folds reads
    the same data either way.

    ``types`` are ``inferred_types(model)``, where the caller has them already (default:
    inferred here); the graph keeps them (``OpGraph.types``).
    """
    return _Builder(model, types).build()


def _shape_stand_ins(node: onnx.NodeProto, dims: Mapping[str, Sequence[int]]) -> list[onnx.NodeProto]:
    """For shape inference, an onnxruntime fusion as the standard operations whose outputs have
    the same shapes: FusedMatMul (untransposed) as MatMul, FusedConv as Conv, FusedGemm as Gemm,
    a Gelu as an Identity, SkipLayerNormalization's normalized value and residual sum as
    Identities of its input, an Attention of square projections, a GroupQueryAttention or
    MultiHeadAttention of separate query, key and value as an Identity of its input (the query),
    EmbedLayerNormalization's embedding as the Gather of its word embeddings (``dims``: the
    initializers' shapes, which tell the square projections). Outputs with no
    stand-in (an attention's cache, a mask index) stay unknown; other operations are left as
    they are. Without this, a float value after a FusedMatMul had no shape, and paired with a
    Gemm's flattened input ([8, 128] for [1, 8, 128]), where a cut then fed the float value to a
    Gemm that takes 2-D only; after an EmbedLayerNormalization no value of a BERT had one."""
    if node.domain != "com.microsoft":
        return [node]
    plain = [a for a in node.attribute if not a.name.startswith("activation")]
    op, inputs, outputs = node.op_type, node.input, node.output
    if op == "FusedMatMul" and not any(a.name.startswith("trans") and a.i for a in plain):
        return [helper.make_node("MatMul", inputs[:2], outputs)]
    if op in ("FusedConv", "FusedGemm"):
        stand_in = helper.make_node(op[len("Fused"):], inputs[:3], outputs)
        stand_in.attribute.extend(plain)
        return [stand_in]
    same_as_input = {
        "Gelu": (0,), "FastGelu": (0,), "QuickGelu": (0,), "BiasGelu": (0,), "RotaryEmbedding": (0,),
        "SkipLayerNormalization": (0, 3), "SkipSimplifiedLayerNormalization": (0, 3),
        "Attention": (0,) if _square_projections(node, dims) else (),
        # with key and value given apart, the attention's value has the query's shape
        "GroupQueryAttention": (0,) if len(inputs) > 2 and inputs[1] and inputs[2] else (),
        "MultiHeadAttention": (0,) if len(inputs) > 2 and inputs[1] and inputs[2] else (),
    }
    if op in same_as_input:
        return [helper.make_node("Identity", inputs[:1], [outputs[i]])
                for i in same_as_input[op] if i < len(outputs) and outputs[i]]
    if op == "EmbedLayerNormalization" and len(inputs) > 2:
        return [helper.make_node("Gather", [inputs[2], inputs[0]], outputs[:1])]
    if op == "MatMulNBits" and _attr(node, "K") and _attr(node, "N"):  # a MatMul by a [K, N] weight (_stand_in_weights)
        return [helper.make_node("MatMul", [inputs[0], _stand_in_weight(node)], outputs[:1])]
    return [node]


def _stand_in_weight(node: onnx.NodeProto) -> str:
    return f"{node.output[0]}#weight_shape"


def _stand_in_weights(nodes: Sequence[onnx.NodeProto]) -> list[onnx.TensorProto]:
    """Shape-only initializers that the stand-ins of ``_shape_stand_ins`` read: the [K, N]
    weight of each MatMulNBits."""
    return [
        onnx.TensorProto(name=_stand_in_weight(node), data_type=onnx.TensorProto.FLOAT, dims=[k, n])
        for node in nodes if node.op_type == "MatMulNBits" and node.domain == "com.microsoft"
        for k, n in [(_attr(node, "K"), _attr(node, "N"))] if k and n
    ]


def _square_projections(attention: onnx.NodeProto, dims: Mapping[str, Sequence[int]]) -> bool:
    """Whether an Attention's packed weight ``[hidden, 3 * hidden]`` keeps its input's width."""
    weight = list(dims.get(attention.input[1], ())) if len(attention.input) > 1 else []
    plain = not any(a.name == "qkv_hidden_sizes" for a in attention.attribute)
    return plain and len(weight) == 2 and weight[1] == 3 * weight[0]


def _with_used_domains(model: onnx.ModelProto) -> list[onnx.OperatorSetIdProto]:
    """The model's opset imports, and version 1 of any domain its nodes use without one (an
    onnxruntime-optimized model taken from the optimizer in memory imports no com.microsoft,
    and onnx shape inference refuses the whole model then)."""
    imports = list(model.opset_import)
    declared = {entry.domain for entry in imports}
    for domain in sorted({node.domain for node in model.graph.node} - declared - {"ai.onnx"}):
        imports.append(helper.make_opsetid(domain, 1))
    return imports


def _shape_only(init: onnx.TensorProto) -> onnx.TensorProto:
    """``init`` without its bytes: what shape inference needs of a weight."""
    return onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims)


def inferred_types(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, onnx.TypeProto]:
    """The type of every tensor onnx shape inference can tell, as ``{name: TypeProto}``;
    ``input_shapes`` fixes the dynamic dimensions of the inputs it names.

    Inference runs on a light copy of the model whose large initializers hold their shapes but
    not their bytes: it copies no weights, and ``model`` is left as it was (clearing and
    restoring a field in place would grow its memory by the weights' size). onnxruntime's
    float fusions stand there as the standard operations of the same shapes, which onnx
    infers (it knows no com.microsoft operator, and every shape after one would be unknown).
    """
    graph = model.graph
    dims = {init.name: init.dims for init in graph.initializer}
    light = onnx.ModelProto(
        ir_version=model.ir_version, opset_import=_with_used_domains(model), functions=model.functions,
        graph=onnx.GraphProto(
            node=[stand_in for node in graph.node for stand_in in _shape_stand_ins(node, dims)],
            output=graph.output, value_info=graph.value_info,
            initializer=[*(_shape_only(init) if tensor_nbytes(init) > LARGE_INITIALIZER else init
                           for init in graph.initializer), *_stand_in_weights(graph.node)],
        ),
    )
    for info in graph.input:
        declared = light.graph.input.add()
        declared.CopyFrom(info)
        if input_shapes and info.name in input_shapes:
            shape = declared.type.tensor_type.shape
            shape.ClearField("dim")
            for size in input_shapes[info.name]:
                shape.dim.add().dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception:  # shape inference is a help, never a requirement
        inferred = light
    graph = inferred.graph
    return {info.name: info.type for info in [*graph.input, *graph.value_info, *graph.output]}


class _Builder:
    def __init__(self, model: onnx.ModelProto, types: Mapping[str, onnx.TypeProto] | None) -> None:
        self.types = inferred_types(model) if types is None else types
        self.graph_proto = model.graph
        self.initializers = {init.name: init for init in model.graph.initializer}
        self.constant_nodes = {
            node.output[0]: node for node in model.graph.node if node.op_type == "Constant"
        }
        self.producer, self.consumers = producers(model.graph), consumers(model.graph)
        self.source: dict[str, ValueRef | str] = {}
        self.mask_reads: list[ValueRef] = []
        self.graph = OpGraph()
        # The fields of each operation's Op but its readouts, which are known once every node
        # is in the graph (a shell node is one that did not become a graph node).
        self.op_fields: dict[str, dict] = {}

    def build(self) -> OpGraph:
        for init in self.graph_proto.initializer:
            self.source[init.name] = CONST
        for position, info in enumerate(self.graph_proto.input):
            if info.name in self.source:
                continue
            node_id = f"input:{info.name}"
            self.graph.add_node(node_id, op=Op(
                kind="input", name=info.name, op_type="Input", role="Input",
                order=-len(self.graph_proto.input) + position, sources=(), outputs=(info.name,),
                readouts=(Readout(info.name),), shapes=(self._shape(info.name),), dtypes=(self._dtype(info.name),),
            ))
            self.source[info.name] = (node_id, 0)
        nodes = self.graph_proto.node
        reads = [[*node.input, *outer_scope_reads(node)] for node in nodes]  # If/Loop/Scan bodies read outer values
        for order, node in _topological(nodes, reads):
            self._add(node, order, reads[order])
        for node_id, fields in self.op_fields.items():
            readouts = tuple(self._readout(out) for out in fields["outputs"])
            self.graph.nodes[node_id]["op"] = Op(**fields, readouts=readouts)
        self.graph.graph["tensors"] = {
            name: ref for name, ref in self.source.items() if isinstance(ref, tuple)
        }
        self.graph.graph["outputs"] = tuple(self.source.get(info.name) for info in self.graph_proto.output)
        self.graph.graph["mask_inputs"] = self._mask_inputs()
        self.graph.graph["types"] = self.types
        return self.graph

    def _mask_inputs(self) -> frozenset[str]:
        """The graph inputs that a fused operator reads as its attention mask: each the only
        graph input behind one value read at a ``MASK_INPUTS`` position."""
        found = set()
        for node, _ in self.mask_reads:
            behind = {n for n in nx.ancestors(self.graph, node) | {node} if self.graph.op(n).kind == "input"}
            if len(behind) == 1:
                found |= behind
        return frozenset(found)

    def _add(self, node: onnx.NodeProto, order: int, names: list[str]) -> None:
        """Add ``node``, at position ``order`` in the model, reading ``names`` (its inputs,
        then what its subgraphs read from outside)."""
        inputs = [self.source.get(name, CONST) if name else CONST for name in names]
        for position in MASK_INPUTS.get(node.op_type, ()):
            read = inputs[position] if position < len(inputs) else None
            if isinstance(read, tuple):
                self.mask_reads.append(read)
                inputs[position] = MASK
        data = [ref for ref in inputs if isinstance(ref, tuple)]
        if not data or node.op_type in SHAPE_OPS:
            kind = SCALE if SCALE in inputs or node.op_type == "DynamicQuantizeLinear" else CONST
            kind = MASK if MASK in inputs and kind == CONST and node.op_type not in SHAPE_OPS else kind
            for out in node.output:
                self.source[out] = kind
            return
        if self._is_shell(node, inputs):
            first = next(ref for ref in inputs if isinstance(ref, tuple))
            self.source[node.output[0]] = first
            for out in node.output[1:]:
                self.source[out] = SCALE
            return
        outputs = tuple(node.output)
        if node.op_type in MASK_OUTPUTS:
            for out in outputs[MASK_OUTPUTS[node.op_type]:]:
                self.source[out] = MASK
            outputs = outputs[: MASK_OUTPUTS[node.op_type]]
        intermediate = INTERMEDIATES.get(node.op_type)
        if intermediate is not None and len(outputs) > intermediate[0] and outputs[intermediate[0]]:
            index, role = intermediate
            step = f"{node.name}#{role}"  # one onnx node, two operations: ids differ, names do not
            self._add_op(step, node, order - 0.5, role, data, (outputs[index],), weight=(None, None))
            data, outputs = [(step, 0)], outputs[:index]
        self._add_op(node.name, node, order, ROLES.get(node.op_type, node.op_type), data, outputs)

    def _add_op(self, node_id: str, node: onnx.NodeProto, order: float, role: str, data: list,
                outputs: tuple[str, ...], weight: tuple[np.ndarray | None, tuple | None] | None = None) -> None:
        """Add the operation ``node_id``: ``node`` (or one step of it) computing ``outputs``
        from the values ``data``, in the role ``role`` (``weight``: its fingerprint and weight
        shape, when not ``node``'s)."""
        shapes = tuple(self._shape(out) for out in outputs)
        fingerprint, weight_shape = self._fingerprint(node) if weight is None else weight
        self.graph.add_node(node_id)  # its Op once its readouts are known (build)
        self.op_fields[node_id] = dict(
            kind="op", name=node.name, op_type=node.op_type, role=role, order=order, sources=tuple(data),
            outputs=outputs, shapes=shapes, dtypes=tuple(self._dtype(out) for out in outputs),
            fingerprint=fingerprint, weight_shape=weight_shape, bias=_has_input(node, BIAS_INPUT.get(node.op_type)),
            perm=self._perm(node, shapes[0]) if node.op_type == "Transpose" else None,
            layout=_channels_last(node, shapes[0]),
        )
        for src, _ in dict.fromkeys(data):
            self.graph.add_edge(src, node_id)
        for index, out in enumerate(outputs):
            self.source[out] = (node_id, index)

    def _is_shell(self, node: onnx.NodeProto, inputs: list) -> bool:
        """Whether ``node`` only carries a value along (quantization plumbing, identities)."""
        if node.op_type in SHELL_OPS:
            return True
        if node.op_type == "Cast":  # between float types (fp16 conversion's glue, a same-type
            # cast), or integer accumulator to float: the value, rounded at most, carried on
            dtype = self._dtype(node.input[0])
            return (dtype in FLOAT_DTYPES and _attr(node, "to") in FLOAT_DTYPES) or self._accumulator_cast(node)
        if node.op_type == "Mul" and len(inputs) == 2:  # rescaling after that Cast
            for value, other in ((0, 1), (1, 0)):
                cast = self.producer.get(node.input[value])
                if cast is not None and inputs[other] in (CONST, SCALE) and self._accumulator_cast(cast):
                    return True
        return False

    def _accumulator_cast(self, node: onnx.NodeProto) -> bool:
        """Whether ``node`` casts the integer result of MatMulInteger/ConvInteger to float."""
        if node.op_type != "Cast" or not node.input:
            return False
        produced_by = self.producer.get(node.input[0])
        return produced_by is not None and produced_by.op_type in INTEGER_OPS

    def _readout(self, tensor: str) -> Readout:
        """Follow a value through its quantization shell to the last tensor holding it: the
        value the next operation sees (after QuantizeLinear, or the Cast and rescaling Mul of an
        integer op). An integer result is read with its scale, before any DequantizeLinear:
        reading the integers leaves onnxruntime free to fuse the quantized operation (as it
        does when the model is deployed), and holds a quarter of the bytes."""
        current = tensor
        for _ in range(8):
            step = self._shell_consumer(current)
            if step is None:
                break
            if step.op_type == "DequantizeLinear":
                qparams = self._qparams(current)
                if qparams[0] is not None:
                    return Readout(current, *qparams)
            current = step.output[0]
        return Readout(current, *self._qparams(current))

    def _shell_consumer(self, tensor: str) -> onnx.NodeProto | None:
        """The quantization-shell node that carries ``tensor`` on, if any (shell nodes are the
        ones that did not become graph nodes)."""
        for node in self.consumers.get(tensor, []):
            op_type = node.op_type
            plumbing = op_type in ("QuantizeLinear", "DequantizeLinear", "Mul") or self._accumulator_cast(node)
            if plumbing and (op_type == "Mul" or node.input[0] == tensor) and not self.graph.has_node(node.name):
                return node
        return None

    def _qparams(self, tensor: str, depth: int = 0) -> tuple:
        """Scale and zero point of an integer tensor produced by a quantized operator."""
        node = self.producer.get(tensor)
        if node is None or depth > 8:
            return None, None, 1
        if node.op_type in OUTPUT_QPARAMS:
            scale_at, zp_at = OUTPUT_QPARAMS[node.op_type]
            return self._const(node, scale_at), self._const(node, zp_at), 1
        if node.op_type == "QuantizeLinear":
            return self._const(node, 1), self._const(node, 2), _axis(node)
        if node.op_type in INTEGER_PASSTHROUGH or node.op_type in SHELL_OPS:
            return self._qparams(node.input[0], depth + 1)
        return None, None, 1

    def _const(self, node: onnx.NodeProto, index: int) -> np.ndarray | None:
        if index >= len(node.input) or not node.input[index]:
            return None
        return self._value(node.input[index])

    def _value(self, name: str, depth: int = 0) -> np.ndarray | None:
        """The value of a constant tensor: an initializer, a Constant, a dequantized one, or
        one dequantized in the graph by Cast and Mul (weight-only int8: Cast(to float) of the
        integers, then Mul by a per-tensor or per-channel scale; a Sub of the zero point) or
        cast between float types (fp16 weights of an operation kept in float32)."""
        if name in self.initializers:
            return tensor_array(self.initializers[name])
        if name in self.constant_nodes:
            attr = self.constant_nodes[name].attribute
            tensors = [a.t for a in attr if a.name == "value"]
            return tensor_array(tensors[0]) if tensors else None
        node = self.producer.get(name)
        if node is not None and node.op_type == "DequantizeLinear":
            raw = self._value(node.input[0])
            if raw is None:
                return None
            block = _attr(node, "block_size")
            scale = self._const(node, 1)
            if block:  # each run of block elements along the axis has a scale of its own
                if scale is None or scale.ndim != raw.ndim:
                    return None
                return dequantize(raw, scale, self._const(node, 2), _axis(node), block)
            readout = Readout(name, scale, self._const(node, 2), _axis(node))
            return readout.dequantize(raw) if scale is not None else raw
        if node is None or depth >= FOLD_DEPTH or node.op_type not in {"Cast", *FOLDED}:
            return None
        values = [self._value(operand, depth + 1) for operand in node.input]
        operands = [value for value in values if value is not None]
        if len(operands) < len(values):
            return None
        if node.op_type == "Cast":
            to = _attr(node, "to")
            return None if to is None else operands[0].astype(helper.tensor_dtype_to_np_dtype(to))
        return FOLDED[node.op_type](*operands)

    def _weight(self, name: str) -> tuple[np.ndarray, Readout] | None:
        """A constant as it is stored, with the readout that dequantizes it when it is read
        through a DequantizeLinear. An initializer in an external file is memory-mapped: the
        caller reads only the part it needs."""
        readout = Readout(name)
        node = self.producer.get(name)
        if node is not None and node.op_type == "DequantizeLinear" and _attr(node, "block_size"):
            value = self._value(name)  # blocked (int4 weights): dequantized here, whole
            return None if value is None else (value, readout)
        if node is not None and node.op_type == "DequantizeLinear":
            readout = Readout(name, self._const(node, 1), self._const(node, 2), _axis(node))
            name = node.input[0]
        if name in self.initializers:
            return tensor_array(self.initializers[name], mapped=True), readout
        value = self._value(name)
        return None if value is None else (value, readout)

    def _fingerprint(self, node: onnx.NodeProto) -> tuple[np.ndarray | None, tuple | None]:
        """A sample of the node's (dequantized) weight, to tell similar nodes apart, and the
        weight's shape in the sample's orientation (None, None without a weight)."""
        if node.op_type == "MatMulNBits":
            head = self._blocked_head(node)
            return (None, None) if head is None else (head, (_attr(node, "K"), _attr(node, "N")))
        if node.op_type in WEIGHT_QPARAMS:
            w_at, scale_at, zp_at = WEIGHT_QPARAMS[node.op_type]
            weight = self._weight(node.input[w_at]) if w_at < len(node.input) and node.input[w_at] else None
            if weight is None:
                return None, None
            zero_point = self._const(node, zp_at) if zp_at is not None else None
            zp = 0.0 if zero_point is None or zero_point.size != 1 else float(zero_point.ravel()[0])
            transposed = _transposed(node)
            return _head(*weight, transposed) - zp, _oriented(weight[0].shape, transposed)
        candidates = [self._weight(name) for name in node.input if self.source.get(name) == CONST]
        weights = [
            (array, readout) for array, readout in filter(None, candidates)
            if array.size > 1 and (array.dtype.kind == "f" or readout.scale is not None)
        ]
        if not weights:
            return None, None
        array, readout = max(weights, key=lambda weight: weight[0].size)
        transposed = _transposed(node)
        return _head(array, readout, transposed), _oriented(array.shape, transposed)

    def _blocked_head(self, node: onnx.NodeProto) -> np.ndarray | None:
        """The head of a MatMulNBits weight (onnxruntime's int4 quantizer, the ONNX LLM
        builders), dequantized in MatMul orientation ([K, N], as ``_head`` gives it): B is
        stored transposed, [N, K / block, block * bits / 8] bytes, low bits first, with a
        scale and a zero point (default 2^(bits-1)) per block. Only the blocks holding the
        first rows are unpacked."""
        bits, block, k, n = (_attr(node, key) for key in ("bits", "block_size", "K", "N"))
        bits = bits or 4
        packed = self._weight(node.input[1]) if len(node.input) > 2 else None
        scales = self._const(node, 2)
        if packed is None or scales is None or not (block and k and n) or 8 % bits:
            return None
        blocks = -(-k // block)
        rows = min(k, -(-FINGERPRINT_SIZE // n))
        used = -(-rows // block)
        data = np.asarray(packed[0]).reshape(n, blocks, -1)[:, :used].astype(np.int32)
        values = unpack(data, bits).reshape(n, used, -1)[:, :, :block].reshape(n, -1)
        zero_point = self._const(node, 3)
        if zero_point is None:
            zero_point = np.full((n, used), 2.0 ** (bits - 1))
        elif zero_point.dtype == np.uint8:  # packed like the weight
            zero_point = unpack(zero_point.reshape(n, -1).astype(np.int32), bits).reshape(n, -1)
        weight = dequantize(values, scales.reshape(n, -1)[:, :used], zero_point.reshape(n, -1)[:, :used],
                            axis=1, block=block, dtype=np.float64)
        return weight[:, :rows].T.ravel()[:FINGERPRINT_SIZE]

    def _perm(self, node: onnx.NodeProto, shape: tuple | None) -> Perm:
        """A Transpose's permutation (reversed axes by default), or None if unknown."""
        for attr in node.attribute:
            if attr.name == "perm":
                return tuple(attr.ints)
        input_shape = self._shape(node.input[0])
        rank = len(input_shape) if input_shape is not None else len(shape) if shape is not None else None
        return None if rank is None else tuple(reversed(range(rank)))

    def _dtype(self, name: str) -> int | None:
        """The element type, None where unknown, NOT_A_TENSOR for sequences, maps, optionals."""
        typ = self.types.get(name)
        if typ is None or typ.WhichOneof("value") is None:
            return None
        if not typ.HasField("tensor_type"):
            return NOT_A_TENSOR
        return typ.tensor_type.elem_type or None

    def _shape(self, name: str) -> tuple | None:
        return known_shape(self.types.get(name))


def known_shape(typ: onnx.TypeProto | None) -> tuple[int | None, ...] | None:
    """The dimensions shape inference tells, None for each unknown one: symbolic, missing,
    or written as -1 or 0 (Paddle2ONNX writes -1 for a dynamic dimension, and inference
    carries it on); None where it does not tell the rank."""
    if typ is None or not typ.HasField("tensor_type") or not typ.tensor_type.HasField("shape"):
        return None
    return tuple(
        dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None
        for dim in typ.tensor_type.shape.dim
    )


def _head(array: np.ndarray, readout: Readout, transposed: bool) -> np.ndarray:
    """The first ``FINGERPRINT_SIZE`` values of ``array`` (of its transpose when ``transposed``
    and it is a matrix), dequantized by ``readout``, as a float64 copy. Only the rows holding
    them are read (of a memory map, only those are read from disk)."""
    scale, zero_point, axis = readout.scale, readout.zero_point, readout.axis % max(array.ndim, 1)
    if transposed and array.ndim == 2:
        array, axis = array.T, 1 - axis
    if array.ndim:
        array = array[: -(-FINGERPRINT_SIZE // max(1, math.prod(array.shape[1:])))]
        if axis == 0 and scale is not None and scale.size > 1:  # per-channel along the rows
            scale = scale[: len(array)]
            zero_point = None if zero_point is None else zero_point[: len(array)]
    values = Readout(readout.tensor, scale, zero_point, axis).dequantize(np.array(array))
    return values.ravel()[:FINGERPRINT_SIZE].astype(np.float64)


def _transposed(node: onnx.NodeProto) -> bool:
    """Whether ``node`` reads its weight transposed: a Gemm with transB computes x @ B.T."""
    return _attr(node, "transB") == 1


def _oriented(shape: tuple, transposed: bool) -> tuple:
    """A weight's shape as ``_head`` samples it: a matrix's transposed when ``transposed``."""
    return tuple(reversed(shape)) if transposed and len(shape) == 2 else tuple(shape)


def _topological(nodes, reads: Sequence[Sequence[str]]) -> list[tuple[int, onnx.NodeProto]]:
    """``(position, node)`` in an order where every node follows what it reads (``reads``, per
    node: its inputs and its subgraphs' outer-scope reads, which files are sorted without),
    and otherwise file order."""
    producer = producer_positions(nodes)
    waits_on = [{producer[name] for name in names if name in producer} - {i} for i, names in enumerate(reads)]
    readers: dict[int, list[int]] = {}
    for i, needed in enumerate(waits_on):
        for j in needed:
            readers.setdefault(j, []).append(i)
    ready = [i for i, needed in enumerate(waits_on) if not needed]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append((i, nodes[i]))
        for reader in readers.get(i, ()):
            waits_on[reader].discard(i)
            if not waits_on[reader]:
                heapq.heappush(ready, reader)
    placed = {i for i, _ in order}
    return order + [(i, node) for i, node in enumerate(nodes) if i not in placed]  # cycles: as given


def outer_scope_reads(node: onnx.NodeProto) -> list[str]:
    """Names the subgraphs of ``node`` read from the enclosing graph, in first-read order."""
    reads: dict[str, None] = {}
    for attr in node.attribute:
        for graph in [attr.g] if attr.HasField("g") else list(attr.graphs):
            local = {i.name for i in graph.input} | {i.name for i in graph.initializer}
            for inner in graph.node:
                for name in [*inner.input, *outer_scope_reads(inner)]:
                    if name and name not in local:
                        reads[name] = None
                local.update(inner.output)
    return list(reads)


def _has_input(node: onnx.NodeProto, index: int | None) -> bool:
    return index is not None and index < len(node.input) and bool(node.input[index])


def _axis(node: onnx.NodeProto) -> int:
    axis = _attr(node, "axis")
    return 1 if axis is None else axis


def _attr(node: onnx.NodeProto, name: str) -> int | None:
    """An integer attribute of ``node``, or None when it is absent."""
    for attr in node.attribute:
        if attr.name == name:
            return attr.i
    return None


def _channels_last(node: onnx.NodeProto, shape: tuple | None) -> Perm:
    """For an operation computing channels-last, the permutation from its layout to NCHW."""
    if node.op_type not in CHANNELS_LAST_OPS and _attr(node, "channels_last") != 1:
        return None
    return to_channels_first(len(shape) if shape is not None else 4)
