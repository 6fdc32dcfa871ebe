"""Load a model from a path or a ModelProto and give every node a stable, readable name.

The caller's file and ModelProto are never modified: a path is only read, and a ModelProto
is copied before names are filled in.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Union

import numpy as np
import onnx
from onnx import helper
from google.protobuf.message import DecodeError

from layerbisect.errors import LayerbisectError, first_line
from layerbisect.inputs import InputSpec

ModelLike = Union[str, PathLike, onnx.ModelProto]


def load_model(model: ModelLike, *, role: str = "model") -> onnx.ModelProto:
    """Return a private copy of ``model`` with every node named.

    ``role`` ("float model", "quantized model") is used in error messages.

    >>> node = onnx.helper.make_node("Relu", ["x"], ["y"])  # no name
    >>> m = load_model(onnx.helper.make_model(onnx.helper.make_graph([node], "g", [], [])))
    >>> m.graph.node[0].name, node.name
    ('Relu_0', '')
    """
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
    elif isinstance(model, (str, PathLike)):
        copy = _read(Path(model), role)
    else:
        raise LayerbisectError(
            f"{role}: expected a path to an .onnx file or an onnx.ModelProto, "
            f"got {type(model).__name__}"
        )
    if not copy.graph.node:
        raise LayerbisectError(f"{role} has no nodes: is it the right file?")
    name_nodes(copy.graph)
    return copy


def declared_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a model declares, initializers excluded, as ``InputSpec``.

    Dynamic dimensions are given by name (``"batch"``) or None.
    """
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for info in model.graph.input:
        if info.name in initializers:
            continue
        if not info.type.HasField("tensor_type"):
            raise LayerbisectError(f"input {info.name!r} is not a tensor; only tensor inputs are supported")
        tensor = info.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
        )
        specs.append(InputSpec(info.name, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)), dims))
    return specs


def _read(path: Path, role: str) -> onnx.ModelProto:
    if not path.is_file():
        raise LayerbisectError(f"{role} file not found: {path}")
    try:
        model = onnx.load(str(path))
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise LayerbisectError(
            f"{role} {path} is not a readable ONNX file ({first_line(exc)}); "
            "check that it is a complete .onnx file, not truncated or in another format"
        ) from None
    if not model.HasField("graph"):
        raise LayerbisectError(f"{role} {path} is not an ONNX model: it holds no graph")
    return model


def name_nodes(graph: onnx.GraphProto) -> None:
    """Name unnamed nodes ``<OpType>_<index>`` and make duplicate names unique, in place.

    Indexes count nodes of the graph in file order, so the same file always gets the same names.
    """
    seen: set[str] = {node.name for node in graph.node if node.name}
    used: set[str] = set()
    for index, node in enumerate(graph.node):
        name = node.name
        if not name or name in used:
            base = node.name or f"{node.op_type}_{index}"
            name, suffix = base, 1
            while name in used or (name != node.name and name in seen):
                name = f"{base}_{suffix}"
                suffix += 1
            node.name = name
        used.add(name)
