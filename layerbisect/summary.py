"""What a report says about the models themselves: a summary of each, and the nodes around a layer.

>>> from onnx import helper
>>> nodes = [helper.make_node("Relu", ["x"], ["a"], name="r1"), helper.make_node("Relu", ["a"], ["y"], name="r2")]
>>> model = helper.make_model(helper.make_graph(nodes, "g", [], []))
>>> summarize(model, "m.onnx")
ModelSummary(path='m.onnx', nodes=2, op_types=(('Relu', 2),))
>>> [node.name for node in neighbourhood(model, ["r2"], hops=1)]
['r1', 'r2']
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable

import onnx

from layerbisect.report import GraphNode, ModelSummary
from layerbisect.vocabulary import QUANTIZATION_OPS
from layerbisect.wiring import consumer_positions, producer_positions

# Operators that only carry a value along: crossing them does not count as a hop.
CARRIERS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Identity", "Cast"}


def summarize(model: onnx.ModelProto, path: str) -> ModelSummary:
    """Node count and op-type counts (most frequent first) of ``model``'s main graph."""
    counts = Counter(node.op_type for node in model.graph.node)
    return ModelSummary(path=path, nodes=len(model.graph.node), op_types=tuple(counts.most_common()))


def quantization(model: onnx.ModelProto) -> str:
    """What of quantization ``model`` holds, in words ("" if nothing): its quantization
    operators, or half or more of its float weights in 16 bits.

    >>> from onnx import helper
    >>> node = helper.make_node("DequantizeLinear", ["q", "s"], ["x"])
    >>> quantization(helper.make_model(helper.make_graph([node], "g", [], [])))
    '1 DequantizeLinear'
    """
    counts = Counter(node.op_type for node in model.graph.node if node.op_type in QUANTIZATION_OPS)
    if counts:
        return ", ".join(f"{count} {op}" for op, count in counts.most_common(3)) + (", ..." if len(counts) > 3 else "")
    floats = [t.data_type for t in model.graph.initializer if t.data_type in FLOAT_TYPES and len(t.dims) > 1]
    halves = sum(kind != onnx.TensorProto.FLOAT for kind in floats)
    return f"{halves} of its {len(floats)} weights in 16 bits" if floats and 2 * halves >= len(floats) else ""


FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def neighbourhood(
    model: onnx.ModelProto, centre: Iterable[str], hops: int = 2, limit: int = 30
) -> tuple[GraphNode, ...]:
    """The nodes within ``hops`` of the nodes named in ``centre``, in the model's order.

    Edges are tensors from producer to consumer, followed both ways. Quantize/Dequantize,
    Identity and Cast nodes are free to cross, so a quantized graph shows the same operations
    as its float original (with their Q/DQ shells). Nodes that read only initializers (the
    dequantization of a weight) are kept for the centre nodes only. At most ``limit`` nodes are
    kept, nearest first.
    """
    nodes = list(model.graph.node)
    producers, consumers = producer_positions(nodes), consumer_positions(nodes)
    constants = {init.name for init in model.graph.initializer}
    wanted = set(centre)
    distance = {i: 0 for i, node in enumerate(nodes) if node.name in wanted}
    queue = [(0, i) for i in distance]
    while queue:
        dist, i = heapq.heappop(queue)
        if dist > distance[i] or dist >= hops:
            continue
        around = [producers[t] for t in nodes[i].input if t in producers
                  and (nodes[i].name in wanted or not set(nodes[producers[t]].input) <= constants)]
        around += [j for t in nodes[i].output for j in consumers.get(t, ())]
        for j in around:
            step = dist + (nodes[j].op_type not in CARRIERS)
            if step <= hops and step < distance.get(j, hops + 1):
                distance[j] = step
                heapq.heappush(queue, (step, j))
    kept = sorted(sorted(distance, key=lambda i: (distance[i], i))[:limit])
    return tuple(
        GraphNode(nodes[i].name, nodes[i].op_type, tuple(nodes[i].input), tuple(nodes[i].output), distance[i])
        for i in kept
    )
