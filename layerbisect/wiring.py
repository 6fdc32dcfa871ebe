"""Who makes and who reads each tensor of an ONNX graph: the one index of its wiring.

Empty names (an optional input or output left out) are no tensor: no node makes or reads them.

>>> from onnx import helper
>>> graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["y"], ["z"])],
...                           "g", [], [])
>>> producers(graph)["z"].op_type, [node.op_type for node in consumers(graph)["y"]]
('Neg', ['Neg'])
>>> sorted(produced(graph.node))
['y', 'z']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """The node that makes each tensor, by name."""
    return {out: node for node in graph.node for out in node.output if out}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes that read each tensor, in graph order (a node reading it twice, twice)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                readers.setdefault(name, []).append(node)
    return readers


def produced(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """The names of the tensors ``nodes`` make (a graph's ``node``, or some of them)."""
    return {out for node in nodes for out in node.output if out}


def constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """The constant tensors of ``graph`` by name: its initializers and the values of its
    Constant nodes (paddle2onnx exports hold their weights there)."""
    found = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            found[node.output[0]] = node.attribute[0].t
    return found


def producer_positions(nodes: Sequence[onnx.NodeProto]) -> dict[str, int]:
    """The position in ``nodes`` of the node that makes each tensor, by name."""
    return {out: i for i, node in enumerate(nodes) for out in node.output if out}


def consumer_positions(nodes: Sequence[onnx.NodeProto]) -> dict[str, list[int]]:
    """The positions in ``nodes`` of the nodes that read each tensor, in order."""
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            if name:
                readers.setdefault(name, []).append(i)
    return readers
