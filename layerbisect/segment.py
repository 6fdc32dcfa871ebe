"""Run a model piece by piece: segments that start from saved values instead of the inputs.

A search that runs a long model many times need not start from its inputs each time. Values
saved at a *boundary* become the inputs of the next *segment*, which holds only the nodes
between them and the values wanted. This module knows ONNX graphs, not layers or metrics.

>>> from onnx import helper, TensorProto
>>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
>>> chain = [helper.make_node(op, [a], [b]) for op, a, b in
...          [("Relu", "x", "a"), ("Neg", "a", "b"), ("Abs", "b", "c"), ("Neg", "c", "y")]]
>>> model = helper.make_model(helper.make_graph(chain, "g", [x], [x]))
>>> segments = Segments(model)
>>> segments.boundary(["b"])
('b',)
>>> piece = segments.extract(["y"], {"b": np.dtype("float32")})
>>> [n.op_type for n in piece.graph.node], [i.name for i in piece.graph.input]
(['Abs', 'Neg'], ['b'])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from layerbisect.errors import LayerbisectError
from layerbisect.graph import inferred_types, outer_scope_reads
from layerbisect.load import tensor_nbytes
from layerbisect.run import placeholder
from layerbisect.wiring import produced, producer_positions

DETACHED = 64 << 10  # bytes: a weight this large is held once, out of the segments (Segments)


class Segments:
    """The nodes of ``model`` indexed once, to cut out any number of segments quickly.

    ``model`` is never modified; a segment shares nothing with it (nodes and initializers
    are copied, only those the segment needs). Extracted ``detached``, a segment holds a
    placeholder (``run.placeholder``) of each large in-memory weight (``DETACHED`` bytes or
    more) instead, and ``buffers`` the arrays, read once, which sessions take without a copy
    (``run.Session(..., buffers=)``). Copying them into every segment, then serializing each
    for onnxruntime, cost MiniLM's scan 0.25 s of its 0.7 s.
    """

    def __init__(self, model: onnx.ModelProto, types: Mapping[str, onnx.TypeProto] | None = None) -> None:
        self.model = model
        if types is not None:  # inferred already (OpGraph.types)
            self.types = types
        graph = model.graph
        self.reads = [[*node.input, *outer_scope_reads(node)] for node in graph.node]
        self.producer = producer_positions(graph.node)
        self.readers: dict[str, set[int]] = {}
        for i, names in enumerate(self.reads):
            for name in names:
                self.readers.setdefault(name, set()).add(i)

    @cached_property
    def buffers(self) -> dict[str, np.ndarray]:
        """The model's in-memory initializers of ``DETACHED`` bytes or more, by name, as arrays."""
        return {
            init.name: numpy_helper.to_array(init) for init in self.model.graph.initializer
            if not uses_external_data(init) and tensor_nbytes(init) >= DETACHED
        }

    @cached_property
    def types(self) -> Mapping[str, onnx.TypeProto]:
        """The type of each value of the model that shape inference can tell (inferred once)."""
        return inferred_types(self.model)

    def needed(self, outputs: Iterable[str], starts: Iterable[str] = ()) -> set[int]:
        """Positions of the nodes that compute ``outputs`` when ``starts`` are given."""
        given = set(starts)
        stack = [self.producer[name] for name in outputs if name in self.producer and name not in given]
        seen: set[int] = set()
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            stack.extend(
                self.producer[name] for name in self.reads[i]
                if name in self.producer and name not in given
            )
        return seen

    def boundary(self, computed: Iterable[str], later: Iterable[str] = ()) -> tuple[str, ...]:
        """The values to save after computing ``computed`` so that the rest of the model can
        resume from them: each value made on the way to ``computed`` that a node off that way
        reads, and each of ``later`` made on the way."""
        way = self.needed(computed)
        made = {out for i in way for out in self.model.graph.node[i].output if out}
        wanted = set(later)
        crossing = [
            name for name in made
            if name in wanted or self.readers.get(name, set()) - way
        ]
        return tuple(sorted(crossing, key=lambda name: self.producer[name]))

    def extract(
        self, outputs: Sequence[str], starts: Mapping[str, np.dtype], *, detached: bool = False
    ) -> onnx.ModelProto:
        """A model computing ``outputs`` from ``starts`` (values fed as inputs, by name and
        dtype) and the model's own inputs, with only the nodes and initializers it needs.
        Inputs the segment does not read are left out; the caller feeds what it declares.
        ``detached``: large weights as placeholders of ``buffers``."""
        source = self.model.graph
        missing = [name for name in outputs if name in starts]
        if missing:
            raise LayerbisectError(f"internal: segment output {missing[0]!r} is also one of its inputs")
        kept = sorted(self.needed(outputs, starts))
        read = {name for i in kept for name in self.reads[i]} | set(outputs)
        model = onnx.ModelProto()
        for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
            setattr(model, field, getattr(self.model, field))
        model.opset_import.extend(self.model.opset_import)
        model.functions.extend(self.model.functions)
        graph = model.graph
        graph.name = source.name
        graph.node.extend(source.node[i] for i in kept)
        graph.initializer.extend(
            placeholder(init) if detached and init.name in self.buffers else init
            for init in source.initializer if init.name in read
        )
        graph.sparse_initializer.extend(init for init in source.sparse_initializer if init.values.name in read)
        initializers = {init.name for init in graph.initializer}
        graph.input.extend(i for i in source.input if i.name in read and i.name not in starts)
        graph.input.extend(
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), None)
            for name, dtype in starts.items() if name in read and name not in initializers
        )
        made = produced(graph.node)
        graph.value_info.extend(v for v in source.value_info if v.name in made and v.name not in outputs)
        declared = {v.name: v for v in [*source.output, *source.value_info]}
        for name in outputs:
            info = graph.output.add()
            if name in declared:
                info.CopyFrom(declared[name])
            else:
                info.name = name
        return model
